"""Throughput of a bigpt run on GPUs against the planner: tokens/s, TFLOP/s per GPU, MFU, and the
measured peak memory against the planner's estimate (bigpt.memory.peak_memory).

    python bench/gpu/throughput.py [--recipe R] [--gpus N] [--steps S] [--warmup W] [--out DIR]
                                   [--dry-run] [table.key=value ...]

Runs the recipe as a user does (``python launchers/run.py`` for one GPU, torchrun for more) on
megatron-core's mock data for S steps, reads its TensorBoard scalars back (the Throughput
callback's tokens_per_s, tflops, mfu, memory_gib: the same FLOPs model as the planner) and prints
medians over the steps after the W warmup steps. ``--dry-run`` prints the plan and the planner's
numbers without a GPU. Writes ``DIR/throughput.json`` and the run's output to ``DIR/run.log``.
Default: bench/gpu/llama3_1b_mock.toml (recipes/llama3_1b.toml's Llama-3.2-1B shape, seq 4096,
bf16, selective recompute) with a global batch of 16.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_RECIPE = Path(__file__).resolve().parent / "llama3_1b_mock.toml"
SCALARS = ("tokens_per_s", "tflops", "mfu", "memory_gib", "step_time")


def benchmark_overrides(steps: int, run_dir: Path) -> list[str]:
    """Mock data (a recipe's own tokenizer and blend stay: a mock run leaves them unused, but they
    must exist), no checkpoints, no evaluation, a log line and scalars every step."""
    return [
        "data.source=mock",
        f"train.train_iters={steps}",
        "schedule.warmup_iters=1",
        f"schedule.decay_iters={steps}",
        "checkpoint.load=none",
        "checkpoint.save_interval=0",
        "eval.interval=0",
        "logging.interval=1",
        "logging.tensorboard=true",
        f"run_dir={run_dir}",
    ]


def plan(recipe_path: Path, overrides: list[str], gpus: int) -> dict:
    from bigpt.flops import flops_per_step
    from bigpt.layout import Layout
    from bigpt.memory import peak_memory
    from bigpt.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    layout = Layout.from_recipe(recipe, gpus)
    peak = peak_memory(recipe, layout)
    return {
        "recipe": str(recipe_path),
        "overrides": overrides,
        "gpus": gpus,
        "layout": f"TP {layout.tp} x PP {layout.pp} (VPP {layout.vpp}) x CP {layout.cp} x DP {layout.dp}",
        "tokens_per_step": layout.global_batch_size * recipe.model.seq_length,
        "flops_per_step": flops_per_step(recipe, layout.global_batch_size),
        "estimated_peak_gib": peak.total / 2**30,
        "estimated_peak_stage": peak.stage,
    }


def read_scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.value for event in sorted(accumulator.Scalars(tag), key=lambda e: e.step)]


def run(recipe_path: Path, overrides: list[str], gpus: int, log: Path) -> int:
    launcher = [sys.executable]
    if gpus > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    command = [*launcher, str(REPO / "launchers/run.py"), str(recipe_path), *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode


def summarise(planned: dict, run_dir: Path, warmup: int, log: Path) -> dict:
    measured = {tag: read_scalars(run_dir, f"train/{tag}") for tag in SCALARS}
    timed = {tag: values[warmup:] or values for tag, values in measured.items()}
    result = dict(planned)
    result.update({f"median_{tag}": statistics.median(values) for tag, values in timed.items() if values})
    result["steps_timed"] = len(timed["step_time"])
    result["measured_peak_gib"] = max(measured["memory_gib"])  # torch.cuda.max_memory_allocated
    result["measured_over_estimate"] = result["measured_peak_gib"] / planned["estimated_peak_gib"]
    notes = [line for line in log.read_text().splitlines() if "transformer layers:" in line]
    result["transformer_layers"] = notes[-1].split("transformer layers:", 1)[1].strip() if notes else "unknown"
    return result


def describe(result: dict) -> str:
    lines = [
        f"recipe      {result['recipe']} {' '.join(result['overrides'])}",
        f"layout      {result['gpus']} GPU(s) = {result['layout']}; {result['tokens_per_step']:,} tokens/step, "
        f"{result['flops_per_step']:.3e} FLOPs/step",
        f"planner     peak memory {result['estimated_peak_gib']:.2f} GiB (stage {result['estimated_peak_stage']})",
    ]
    if "median_step_time" in result:
        mfu = result["median_mfu"]
        lines += [
            f"layers      {result['transformer_layers']}",
            f"measured    median of {result['steps_timed']} steps: {result['median_step_time']:.3f} s/step, "
            f"{result['median_tokens_per_s']:,.0f} tokens/s, {result['median_tflops']:.1f} TFLOP/s per GPU, "
            f"MFU {'n/a' if math.isnan(mfu) else f'{mfu:.1%}'}",
            f"memory      peak allocated {result['measured_peak_gib']:.2f} GiB = "
            f"{result['measured_over_estimate']:.2f} x the planner's estimate",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--gpus", type=int, default=1, help="processes (one per GPU); default 1")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    parser.add_argument("--out", type=Path, default=REPO / "runs/gpu-bench/throughput")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the planner's numbers only")
    parser.add_argument("overrides", nargs="*", help="table.key=value, after the benchmark's own")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must be more than --warmup {args.warmup}")
    run_dir = args.out / "run"
    overrides = [*benchmark_overrides(args.steps, run_dir), *args.overrides]
    planned = plan(args.recipe, overrides, args.gpus)
    if args.dry_run:
        print(describe(planned))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "run.log"
    code = run(args.recipe, overrides, args.gpus, log)
    if code != 0:
        print(f"the run failed (exit {code}); its output: {log}\n" + log.read_text()[-4000:], file=sys.stderr)
        return 1
    result = summarise(planned, run_dir, args.warmup, log)
    (args.out / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
