"""A model ladder: plan a grid of model sizes × compute budgets from a base recipe, run it, read
each run's final validation loss, and fit a scaling law (bigpt.scaling) with a plot.

The sizing rule (``size_model``): a width d, a multiple of the base's head width; as many heads as
fit (the base's head width), the base's heads-per-query-group ratio, the base's depth-to-width
ratio (layers = d × base layers / base width, at least 1) and FFN-to-width ratio (rounded up to a
multiple of 8). Every other key (vocabulary, sequence length, batch, optimizer, data) is the base's,
so the runs differ only in size and length, and all evaluate on the same validation batches.

Each budget C (FLOPs, C = 6ND with N = bigpt.scaling.scaling_parameters) trains every size whose
tokens per parameter fall in a range (IsoFLOP: several sizes per budget), for D = C / 6N tokens
rounded to whole steps, with its cosine schedule decaying over exactly its own steps: a cycle
longer than the run leaves the learning rate high at the end and biases the fit (Hoffmann et al.).
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bigpt.errors import BigptError
from bigpt.layout import Layout
from bigpt.numbers import short
from bigpt.paths import WRITTEN_BY, check_output_file, write_atomically, written_by_bigpt
from bigpt.recipe import ModelConfig, Recipe, load_recipe, recipe_to_toml
from bigpt.runtime import console
from bigpt.scaling import PARAMETERS_COUNTED, Fit, Point, budgets_of, scaling_parameters

MANIFEST = "ladder.json"
LADDER_FORMAT = "bigpt ladder 1"
TOKENS_PER_PARAMETER = (1.0, 400.0)
"""Default range of tokens per parameter a budget's sizes train for: wide enough to bracket the
optimum on both sides (Chinchilla's is near 20), so each budget's loss curve has its minimum."""
FFN_MULTIPLE = 8


@dataclass(frozen=True)
class Rung:
    """One run of the ladder."""

    name: str
    recipe: str
    """Path of its recipe (absolute)."""
    run_dir: str
    width: int
    layers: int
    parameters: int
    """N as bigpt.scaling counts it."""
    tokens: int
    budget: float
    """The budget C it was planned for (6ND of its rounded tokens is within a step of it)."""
    train_iters: int
    hours: float | None = None
    """The planner's estimate on the GPUs the plan was made for (None: no layout fits there)."""
    kind: str = "cosine"
    """cosine: a run of its own; stable: a warmup-stable-decay ladder's constant-rate run (not a
    point of the fit); decay: a decay branched from the stable run at ``branch_step``."""
    branch_step: int = 0


def size_model(base: Recipe, width: int) -> dict:
    """The [model] keys of a model of ``width`` by the ladder's sizing rule (module docstring)."""
    model = base.model
    head = model.kv_channels or model.hidden_size // model.num_attention_heads
    if width < head or width % head:
        raise BigptError(
            f"--widths: {width} is not a positive multiple of the base recipe's head width {head} "
            f"(model.hidden_size / model.num_attention_heads); choose multiples of {head}."
        )
    heads = width // head
    per_group = model.num_attention_heads // (model.num_query_groups or model.num_attention_heads)
    groups = max(1, heads // per_group)
    while heads % groups:
        groups -= 1
    ffn = math.ceil(model.ffn_hidden_size / model.hidden_size * width / FFN_MULTIPLE) * FFN_MULTIPLE
    return {
        "hidden_size": width,
        "num_layers": max(1, round(width * model.num_layers / model.hidden_size)),
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "ffn_hidden_size": ffn,
    }


def default_widths(base: Recipe, sizes: int = 5) -> list[int]:
    """``sizes`` widths from the base's down, √2 apart (so N about 2.8× apart), as multiples of the head width."""
    model = base.model
    head = model.kv_channels or model.hidden_size // model.num_attention_heads
    widths = {max(head, round(model.hidden_size / 2 ** (k / 2) / head) * head) for k in range(sizes)}
    return sorted(widths)


def plan_ladder(
    base_path: str,
    out: Path,
    *,
    widths: list[int],
    budgets: list[float],
    overrides: Sequence[str] = (),
    tokens_per_parameter: tuple[float, float] = TOKENS_PER_PARAMETER,
    wsd_decay: float | None = None,
    estimate: Callable[[Recipe], float | None] | None = None,
) -> list[tuple[Rung, Recipe]]:
    """The ladder's runs and their recipes (nothing written). ``wsd_decay``: a warmup-stable-decay
    ladder whose decays take this fraction of each run (``_Size.wsd_rungs``); None: a cosine run per
    size and budget. ``estimate(recipe)``: hours of one run, or None."""
    base = load_recipe(base_path, overrides)
    tokens_per_step = _tokens_per_step(base)
    if base.train.rampup_batch_size:
        raise BigptError(
            f"{base_path}: train.rampup_batch_size makes a run's tokens depend on its length; a ladder's runs "
            "need D = steps × global batch × sequence length. Remove the ramp-up for the ladder."
        )
    if not budgets:
        raise BigptError("--budgets: name at least one compute budget in FLOPs, e.g. --budgets 1e15,3e15,1e16.")
    rungs = []
    low, high = tokens_per_parameter
    for width in sorted(set(widths)):
        sized = dataclasses.replace(base.model, **size_model(base, width))
        parameters = scaling_parameters(sized)
        lengths = []  # (budget, steps) of this size
        for budget in sorted(budgets):
            iters = round(budget / (6 * parameters * tokens_per_step))
            if iters >= 1 and low <= iters * tokens_per_step / parameters <= high:
                lengths.append((budget, iters))
        if not lengths:
            continue
        size = _Size(base, sized, width, parameters, out, estimate)
        rungs += size.wsd_rungs(lengths, wsd_decay) if wsd_decay else size.cosine_rungs(lengths)
    if not rungs:
        raise BigptError(
            f"no size of --widths {','.join(map(str, widths))} trains for {low:g} to {high:g} tokens per parameter "
            "at any of --budgets; raise the budgets or use smaller widths."
        )
    return rungs


@dataclass(frozen=True)
class _Size:
    """One model size of the ladder, making its runs' recipes."""

    base: Recipe
    model: ModelConfig
    width: int
    parameters: int
    out: Path
    estimate: Callable[[Recipe], float | None] | None

    def cosine_rungs(self, lengths: list[tuple[float, int]]) -> list[tuple[Rung, Recipe]]:
        """A run per budget, its cosine cycle ending with it."""
        warmup = self.base.schedule.warmup_iters
        return [
            self.rung(
                f"w{self.width}-c{budget:.1e}".replace("+", ""),
                budget,
                iters,
                dataclasses.replace(
                    self.base.schedule,
                    decay_style="cosine",
                    decay_iters=iters,  # the cycle ends with the run
                    warmup_iters=min(warmup, iters // 10),
                    wsd_decay_iters=None,
                ),
            )
            for budget, iters in lengths
        ]

    def wsd_rungs(self, lengths: list[tuple[float, int]], fraction: float) -> list[tuple[Rung, Recipe]]:
        """One run at a constant learning rate (after warmup) as long as the longest budget's
        stable part, saving where each budget's decay branches off; then per budget a decay of
        ``fraction`` of its length to optimizer.min_lr, resumed from that checkpoint (optimizer
        state and data position included)."""
        from bigpt.checkpoint.store import checkpoint_name  # (importing bigpt.checkpoint loads megatron-core)

        decays = [max(1, round(fraction * iters)) for _, iters in lengths]
        # Branch points are multiples of the first (each one is a save of the stable run, and each
        # save costs time): at most half that step away from the exact point.
        interval = max(1, min(iters - decay for (_, iters), decay in zip(lengths, decays)))
        branches = [
            max(interval, round((iters - decay) / interval) * interval) for (_, iters), decay in zip(lengths, decays)
        ]
        warmup = min(self.base.schedule.warmup_iters, branches[0] // 10)
        stable_iters = max(branches)
        stable_name = f"w{self.width}-stable"
        constant = dataclasses.replace(
            self.base.schedule, decay_style="constant", decay_iters=None, warmup_iters=warmup, wsd_decay_iters=None
        )
        stable = self.rung(
            stable_name,
            6 * self.parameters * stable_iters * _tokens_per_step(self.base),
            stable_iters,
            constant,
            kind="stable",
            save_interval=interval,
        )
        rungs = [stable]
        for (budget, _), decay, branch in zip(lengths, decays, branches):
            schedule = dataclasses.replace(
                self.base.schedule,
                decay_style="wsd",
                decay_iters=branch + decay,
                wsd_decay_iters=decay,
                warmup_iters=warmup,
            )
            checkpoint = Path(stable[1].run_dir, "checkpoints", checkpoint_name(branch))
            name = f"w{self.width}-c{budget:.1e}-decay".replace("+", "")
            rungs.append(
                self.rung(name, budget, branch + decay, schedule, kind="decay", branch=branch, load=checkpoint)
            )
        return rungs

    def rung(
        self,
        name: str,
        budget: float,
        iters: int,
        schedule,
        *,
        kind: str = "cosine",
        branch: int = 0,
        load: Path | None = None,
        save_interval: int | None = None,
    ) -> tuple[Rung, Recipe]:
        base = self.base
        run_dir = str(self.out.resolve() / "runs" / name)
        checkpoint = dataclasses.replace(base.checkpoint, dir=None, load=str(load) if load else "auto")
        if save_interval:  # the stable run keeps every checkpoint a decay branches from
            checkpoint = dataclasses.replace(checkpoint, save_interval=save_interval, keep_every=save_interval)
        recipe = dataclasses.replace(
            base,
            name=name,
            run_dir=run_dir,
            model=self.model,
            train=dataclasses.replace(base.train, train_iters=iters),
            schedule=schedule,
            # one evaluation at the end at least: the final validation loss is the point the fit reads
            eval=dataclasses.replace(base.eval, interval=min(base.eval.interval or iters, iters)),
            logging=dataclasses.replace(base.logging, tensorboard=True),
            checkpoint=checkpoint,
        )
        rung = Rung(
            name=name,
            recipe=str(self.out.resolve() / "recipes" / f"{name}.toml"),
            run_dir=run_dir,
            width=self.width,
            layers=self.model.num_layers,
            parameters=self.parameters,
            tokens=iters * _tokens_per_step(base),
            budget=budget,
            train_iters=iters,
            hours=self.estimate(recipe) if self.estimate else None,
            kind=kind,
            branch_step=branch,
        )
        return rung, recipe


def _tokens_per_step(recipe: Recipe) -> int:
    return recipe.train.global_batch_size * recipe.model.seq_length


def write_ladder(base_path: str, out: Path, rungs: list[tuple[Rung, Recipe]], overwrite: bool = False) -> None:
    """The recipes under ``out``/recipes and the manifest ``out``/ladder.json (every path checked
    before the first write: a file bigpt did not write is replaced only with ``overwrite``). Each
    recipe is loaded back as it is written (all of bigpt's checks); the manifest comes last, so a
    refused recipe leaves no ladder to run."""
    texts = {}
    for rung, recipe in rungs:
        text = f"{WRITTEN_BY}: rung {rung.name} of the ladder in {out} (tools/ladder.py plan)\n{recipe_to_toml(recipe)}"
        check_output_file(rung.recipe, "--out", overwrite, ours=written_by_bigpt)
        texts[rung.recipe] = text
    manifest = out / MANIFEST
    check_output_file(manifest, "--out", overwrite, ours=_manifest_is_ours)
    os.makedirs(out / "recipes", exist_ok=True)
    for path, text in texts.items():
        write_atomically(path, text, key="--out")
        try:
            load_recipe(path)
        except BigptError as err:
            raise BigptError(f"the ladder's recipe {path} (from {base_path}) is refused: {err}") from None
    document = {
        "format": LADDER_FORMAT,
        "base": str(Path(base_path).resolve()),
        "parameters_counted": PARAMETERS_COUNTED,
        "runs": [dataclasses.asdict(rung) for rung, _ in rungs],
    }
    write_atomically(manifest, json.dumps(document, indent=1) + "\n", key="--out")


def _manifest_is_ours(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == LADDER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_ladder(directory) -> list[Rung]:
    path = Path(directory) / MANIFEST
    if not _manifest_is_ours(path):
        raise BigptError(
            f"{directory} holds no ladder ({MANIFEST} from `tools/ladder.py plan BASE --out {directory}`); "
            "plan one there first, or fit a CSV of params, tokens and loss."
        )
    runs = json.loads(path.read_text(encoding="utf-8"))["runs"]
    return [Rung(**run) for run in runs]


def table(rungs: list[Rung], gpus_note: str = "") -> str:
    """The ladder as text: one line a run, then the total compute."""
    header = ("run", "width × layers", "N", "D", "D/N", "C = 6ND", "steps", "hours" + gpus_note)
    rows = [header]
    total_flops, total_hours = 0.0, []
    for r in rungs:
        own = (r.train_iters - r.branch_step) / r.train_iters  # a decay branch runs only its own steps
        total_flops += 6 * r.parameters * r.tokens * own
        hours = None if r.hours is None else r.hours * own
        total_hours += [] if hours is None else [hours]
        rows.append(
            (
                r.name,
                f"{r.width} × {r.layers}",
                short(r.parameters),
                short(r.tokens),
                f"{r.tokens / r.parameters:.1f}",
                f"{6 * r.parameters * r.tokens:.2e}",
                f"{r.branch_step}+{r.train_iters - r.branch_step}" if r.branch_step else str(r.train_iters),
                "n/a" if hours is None else f"{hours:.3g}",
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append(
        f"{len(rungs)} runs, {total_flops:.3g} FLOPs in all"
        + (f", {sum(total_hours):.3g} hours{gpus_note}" if total_hours else "")
    )
    decays = [r for r in rungs if r.kind == "decay"]
    if decays:
        steps = sum(r.train_iters for r in rungs if r.kind == "stable") + sum(
            r.train_iters - r.branch_step for r in decays
        )
        alone = sum(r.train_iters for r in decays)
        lines.append(
            f"warmup-stable-decay: {steps:,} steps in all (a stable run per size, a decay per budget) where a run "
            f"per budget would take {alone:,}: {1 - steps / alone:.0%} saved"
        )
    lines.append(PARAMETERS_COUNTED + ".")
    return "\n".join(lines)


def final_loss(rung: Rung) -> float | None:
    """The run's validation loss at its last step (TensorBoard's valid/loss), or None before it has one."""
    events = Path(rung.run_dir) / "tensorboard"
    if not events.is_dir():
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    if "valid/loss" not in accumulator.Tags().get("scalars", ()):
        return None
    last = [event.value for event in accumulator.Scalars("valid/loss") if event.step == rung.train_iters]
    return last[-1] if last else None


def points_of(rungs: list[Rung]) -> tuple[list[Point], list[str]]:
    """(points of the finished runs, names of the others)."""
    points, unfinished = [], []
    for rung in (r for r in rungs if r.kind != "stable"):
        loss = final_loss(rung)
        if loss is None:
            unfinished.append(rung.name)
        else:
            points.append(Point(rung.parameters, rung.tokens, loss, rung.name))
    return points, unfinished


def run_ladder(rungs: list[Rung], launch) -> None:
    """Each unfinished run in turn (``launch(rung, world_size)``), finished ones skipped, a progress
    line each; a run that stopped part-way resumes from its latest checkpoint (checkpoint.load = auto).
    A launch that only submits the run returns what to say of it (a job id); one that trains returns None."""
    for number, rung in enumerate(rungs, 1):
        prefix = f"[{number}/{len(rungs)}] {rung.name} (N {short(rung.parameters)}, D {short(rung.tokens)})"
        loss = final_loss(rung)
        if loss is not None:
            console.say(f"{prefix}: finished before, validation loss {loss:.4f}; skipped")
            continue
        recipe = load_recipe(rung.recipe)
        started = time.monotonic()
        console.say(f"{prefix}: {rung.train_iters} steps")
        submitted = launch(rung, Layout.from_recipe(recipe).world_size)
        if submitted:
            console.say(f"{prefix}: {submitted}")
            continue
        loss = final_loss(rung)
        if loss is None:
            raise BigptError(
                f"{rung.name} ended without a validation loss at step {rung.train_iters} in "
                f"{rung.run_dir}/tensorboard; see its log above, then run the ladder again (it resumes)."
            )
        console.say(f"{prefix}: done in {time.monotonic() - started:.0f} s, validation loss {loss:.4f}")


def launching_locally(overwrite: bool = False) -> Callable[[Rung, int], None]:
    """A launch on this machine: a world of one in this process (no start-up cost per run), more
    ranks under torchrun. ``overwrite``: --overwrite, as launchers/run.py takes it."""

    def launch(rung: Rung, world_size: int) -> None:
        if world_size == 1:
            from bigpt.train.main import train

            recipe = load_recipe(rung.recipe)
            train(recipe, Layout.from_recipe(recipe, 1), overwrite)
            return
        repo = Path(__file__).resolve().parent.parent
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
        command += [str(repo / "launchers" / "run.py"), rung.recipe] + (["--overwrite"] if overwrite else [])
        if subprocess.run(command).returncode:
            raise BigptError(
                f"{rung.name} failed (see its output above); fix the cause, then run the ladder again (it resumes)."
            )

    return launch


def plot(fit: Fit, path) -> None:
    """Loss against N per budget with the law's curves and the compute-optimal frontier (left);
    the optimal N against C by approach 3 and approach 2 (right). A PNG marked as bigpt's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    law = fit.law
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    groups = budgets_of(fit.points)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    sizes = np.array([p.parameters for p in fit.points])
    span = np.geomspace(sizes.min() / 2, sizes.max() * 2, 200)
    for group, colour in zip(groups, colours):
        flops = float(np.exp(np.mean(np.log([p.flops for p in group]))))
        left.scatter([p.parameters for p in group], [p.loss for p in group], color=colour, label=f"C = {flops:.2g}")
        left.plot(span, [law.loss(n, flops / (6 * n)) for n in span], color=colour, lw=1)
    budgets = np.geomspace(min(p.flops for p in fit.points), max(p.flops for p in fit.points), 50)
    optima = [law.optimal(c) for c in budgets]
    left.plot([n for n, _ in optima], [law.loss(n, d) for n, d in optima], "k--", lw=1, label="compute-optimal")
    left.set(xscale="log", xlabel="N (parameters, input embedding excluded)", ylabel="final validation loss")
    left.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3g} + {law.B:.3g}/D^{law.beta:.3g}")
    left.legend(fontsize=7)
    right.plot(budgets, [n for n, _ in optima], "k-", label="approach 3 (fitted law)")
    if fit.isoflop:
        iso = fit.isoflop
        right.scatter([b["flops"] for b in iso.budgets], [b["optimal_parameters"] for b in iso.budgets], color="C1")
        right.plot(budgets, iso.coefficient * budgets**iso.a, "C1--", label=f"approach 2 (IsoFLOP): N ∝ C^{iso.a:.3g}")
    right.set(xscale="log", yscale="log", xlabel="C = 6ND (FLOPs)", ylabel="compute-optimal N")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, metadata={"Description": WRITTEN_BY.lstrip("# ")})
    plt.close(figure)


def plot_is_ours(path) -> bool:
    """A PNG ``plot`` wrote: its text chunk (before the image data) carries bigpt's mark."""
    try:
        with open(path, "rb") as f:
            return WRITTEN_BY.lstrip("# ").encode() in f.read(4096)
    except OSError:
        return False
