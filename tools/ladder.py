"""A model ladder for your own scaling law: plan a grid of model sizes × compute budgets from a
base recipe, run it, and fit L(N, D) = E + A / N^α + B / D^β to the final validation losses.

    python tools/ladder.py plan recipes/llama3_1b.toml --out ladder/ --budgets 1e18,3e18,1e19,3e19
    python tools/ladder.py run ladder/                                # here, one run after another
    python tools/ladder.py run ladder/ --slurm --nodes 1 --partition gpu   # one SLURM job per run
    python tools/ladder.py fit ladder/ --budget 1e22                  # or a CSV: params,tokens,loss
    python tools/plan.py recipes/llama3_8b.toml --gpus 256 --law ladder/fit.json

plan: widths (multiples of the base's head width; default five, √2 apart, from the base's down)
sized by one rule (bigpt/ladder.py), each trained at every budget C = 6ND that gives it a tokens-
per-parameter ratio in --tokens-per-parameter, with its cosine schedule fitted to its own length.
run: skips finished runs and resumes a stopped one; a world of one trains in this process, more
ranks under torchrun; --slurm submits each unfinished run through launchers/slurm.py (the options
after --slurm are its own). fit: approach 3 (Huber on log loss, L-BFGS from the paper's grid of
starts) with 95% bootstrap intervals, approach 2 (IsoFLOP parabolas), --budget's compute-optimal N
and D and predicted loss; writes PREFIX.json (what plan.py --law reads) and PREFIX.png.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import Parser, add_overwrite  # noqa: E402
from bigpt.errors import BigptError  # noqa: E402
from bigpt.runtime import console  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def numbers(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item]


parser = Parser(__doc__)
commands = parser.add_subparsers(dest="command", required=True)
plan_parser = commands.add_parser("plan", help="write the ladder's recipes and manifest", description=__doc__)
plan_parser.add_argument("recipe", help="the base recipe (data, vocabulary, batch, optimizer)")
plan_parser.add_argument("overrides", nargs="*", metavar="table.key=value", help="dotted overrides of the base")
plan_parser.add_argument("--out", type=Path, required=True, help="the ladder's directory")
plan_parser.add_argument("--widths", type=lambda t: [int(v) for v in numbers(t)], help="model widths, comma-separated")
plan_parser.add_argument("--budgets", type=numbers, help="compute budgets in FLOPs, comma-separated")
plan_parser.add_argument(
    "--tokens-per-parameter",
    type=numbers,
    default=None,
    metavar="LOW,HIGH",
    help="the range of D/N a budget's sizes train for (default 1,400)",
)
plan_parser.add_argument(
    "--wsd",
    type=float,
    metavar="DECAY_FRACTION",
    help="warmup-stable-decay: one constant-rate run per size, and per budget a decay of this fraction of its "
    "length (e.g. 0.2) branched from that run's checkpoint: several budgets for little more than one run",
)
plan_parser.add_argument("--gpus", type=int, default=8, help="GPUs per run, for the time estimate (default 8)")
plan_parser.add_argument("--gpu", default="h100-80gb", help="GPU for the time estimate (default h100-80gb)")
plan_parser.add_argument("--mfu", type=float, default=0.4, help="MFU for the time estimate (default 0.4)")
add_overwrite(plan_parser, "recipes or a manifest in --out that bigpt did not write")

run_parser = commands.add_parser("run", help="train the ladder's unfinished runs")
run_parser.add_argument("ladder", type=Path, help="the ladder's directory")
run_parser.add_argument(
    "--slurm",
    nargs="...",
    metavar="SLURM_OPTION",
    help="submit each unfinished run with launchers/slurm.py and these of its options (--nodes 1 ...)",
)
add_overwrite(
    run_parser, "a run's outputs that bigpt did not write (its recipe.toml, its checkpoints' latest, a job script)"
)

fit_parser = commands.add_parser("fit", help="fit the scaling law to a ladder or a CSV")
fit_parser.add_argument("source", type=Path, help="a ladder's directory, or a CSV with columns params,tokens,loss")
fit_parser.add_argument("--budget", type=float, help="a compute budget (FLOPs): its compute-optimal N, D and loss")
fit_parser.add_argument("--json", action="store_true", help="print the fit as JSON, not text")
fit_parser.add_argument(
    "--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (default 200)"
)
fit_parser.add_argument(
    "--output-prefix", help="write PREFIX.json and PREFIX.png (default: fit in the ladder, or beside the CSV)"
)
add_overwrite(fit_parser, "PREFIX.json or PREFIX.png that bigpt did not write")


def plan(args) -> None:
    from bigpt.ladder import TOKENS_PER_PARAMETER, default_widths, plan_ladder, table, write_ladder
    from bigpt.plan import make_plan
    from bigpt.recipe import load_recipe

    def estimate(recipe):
        try:
            planned = make_plan(recipe, args.gpus, args.gpu, mfu=args.mfu, headroom=0.1, gpus_per_node=8)
        except BigptError:
            return None
        return planned.step_seconds(planned.chosen) * recipe.train.train_iters / 3600

    low_high = args.tokens_per_parameter or TOKENS_PER_PARAMETER
    if len(low_high) != 2 or not 0 < low_high[0] < low_high[1]:
        raise BigptError("--tokens-per-parameter takes LOW,HIGH with 0 < LOW < HIGH, e.g. 1,400.")
    if args.wsd is not None and not 0 < args.wsd < 1:
        raise BigptError(f"--wsd {args.wsd}: the decay's fraction of each run must be between 0 and 1, e.g. 0.2.")
    base = load_recipe(args.recipe, args.overrides)
    widths = args.widths or default_widths(base)
    budgets = args.budgets or default_budgets(base, widths)
    rungs = plan_ladder(
        args.recipe,
        args.out,
        widths=widths,
        budgets=budgets,
        overrides=args.overrides,
        tokens_per_parameter=(low_high[0], low_high[1]),
        wsd_decay=args.wsd,
        estimate=estimate,
    )
    write_ladder(args.recipe, args.out, rungs, args.overwrite)
    points = [rung for rung, _ in rungs if rung.kind != "stable"]
    sizes, lengths = len({rung.width for rung in points}), len({rung.tokens for rung in points})
    if len(points) <= 5 or sizes < 3 or lengths < 3:
        console.warn(
            f"this ladder has {len(points)} points, {sizes} sizes and {lengths} token counts: the fit needs more than "
            "5 points, 3 sizes and 3 token counts (and dozens of points to pin the law); add --widths or --budgets."
        )
    console.say(table([rung for rung, _ in rungs], f" on {args.gpus} × {args.gpu} at MFU {args.mfu:g}"))
    console.say(f"wrote {len(rungs)} recipes in {args.out / 'recipes'}; next: tools/ladder.py run {args.out}")


def default_budgets(base, widths: list[int]) -> list[float]:
    """Three budgets 4× apart around the one at which the middle width is compute-optimal by
    Chinchilla's 20 tokens per parameter."""
    import dataclasses

    from bigpt.ladder import size_model
    from bigpt.scaling import scaling_parameters

    middle = scaling_parameters(dataclasses.replace(base.model, **size_model(base, sorted(widths)[len(widths) // 2])))
    centre = 6 * middle * 20 * middle
    return [centre / 4, centre, centre * 4]


def run(args) -> None:
    from bigpt.ladder import launching_locally, read_ladder, run_ladder

    rungs = read_ladder(args.ladder)
    overwrite = ["--overwrite"] if args.overwrite else []
    run_ladder(
        rungs, launching_locally(args.overwrite) if args.slurm is None else submitting([*args.slurm, *overwrite])
    )


def submitting(slurm_options: list[str]):
    """A launch that submits the run with launchers/slurm.py (it checks the layout against the nodes)."""
    import subprocess

    def submit(rung, world_size) -> str:
        command = [sys.executable, str(REPO / "launchers" / "slurm.py"), rung.recipe, *slurm_options, "--submit"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise BigptError(
                f"submitting {rung.name} failed: {result.stderr.strip()[-2000:]}; fix the SLURM options, then "
                "run again."
            )
        return f"submitted ({result.stdout.strip()})"

    return submit


def fit(args) -> None:
    from bigpt.ladder import plot, plot_is_ours, points_of, read_ladder
    from bigpt.paths import check_output_file, write_atomically
    from bigpt.scaling import LAW_FORMAT, fit_law, read_points_csv

    source = args.source
    if source.is_dir():
        points, unfinished = points_of(read_ladder(source))
        if unfinished:
            console.warn(
                f"{len(unfinished)} run(s) have no final validation loss yet, left out: {', '.join(unfinished)}"
            )
        prefix = Path(args.output_prefix or source / "fit")
    elif source.is_file():
        points = read_points_csv(source)
        prefix = Path(args.output_prefix) if args.output_prefix else source.with_name(f"{source.stem}_fit")
    else:
        raise BigptError(f"{source} does not exist; name a ladder's directory or a CSV of params, tokens and loss.")
    if args.bootstrap < 0:
        raise BigptError("--bootstrap must be 0 or more.")
    json_path, png_path = Path(f"{prefix}.json"), Path(f"{prefix}.png")

    def ours(path):
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("format") == LAW_FORMAT
        except (OSError, ValueError, AttributeError):
            return False

    check_output_file(json_path, "--output-prefix", args.overwrite, ours=ours)
    check_output_file(png_path, "--output-prefix", args.overwrite, ours=plot_is_ours)
    result = fit_law(points, str(source), budget=args.budget, resamples=args.bootstrap)
    document = result.to_json()
    write_atomically(json_path, json.dumps(document, indent=1) + "\n", key="--output-prefix")
    plot(result, png_path)
    if args.json:
        print(json.dumps(document, indent=1))
    else:
        console.say(describe(result))
        console.say(f"wrote {json_path} (tools/plan.py --law reads it) and {png_path}")


def describe(result) -> str:
    from bigpt.numbers import short
    from bigpt.scaling import PARAMETERS_COUNTED

    law, intervals = result.law, result.intervals
    exponents = law.alpha + law.beta

    def value(name, number, digits=".4g"):
        low_high = intervals.get(name)
        return f"{number:{digits}}" + (f" [{low_high[0]:{digits}}, {low_high[1]:{digits}}]" if low_high else "")

    lines = [
        f"L(N, D) = E + A / N^α + B / D^β fitted to {len(result.points)} runs (Huber δ = 1e-3 on log loss, "
        f"L-BFGS); 95% bootstrap intervals over {result.resamples} resamples"
        if result.resamples
        else f"L(N, D) = E + A / N^α + B / D^β fitted to {len(result.points)} runs (no bootstrap)",
        f"  E = {value('E', law.E)}   A = {value('A', law.A)}   B = {value('B', law.B)}",
        f"  α = {value('alpha', law.alpha)}   β = {value('beta', law.beta)}",
        f"  compute-optimal N ∝ C^{law.beta / exponents:.3f}, D ∝ C^{law.alpha / exponents:.3f}",
        f"  ({PARAMETERS_COUNTED})",
    ]
    if result.isoflop:
        lines.append(
            f"approach 2 (IsoFLOP parabolas over {len(result.isoflop.budgets)} budgets): "
            f"N_opt ∝ C^{result.isoflop.a:.3f}"
        )
    else:
        lines.append(f"approach 2: no answer ({result.isoflop_problem})")
    if result.budget:
        b = result.budget
        lines.append(
            f"at C = {b['flops']:.3g} FLOPs: N = {short(b['optimal_parameters'])}"
            + _interval(intervals, "optimal_parameters")
            + f", D = {short(b['optimal_tokens'])}"
            + _interval(intervals, "optimal_tokens")
            + f" tokens ({b['optimal_tokens'] / b['optimal_parameters']:.1f} per parameter), predicted loss "
            f"{value('loss', b['loss'])}"
        )
        if "isoflop_parameters" in b:
            lines.append(
                f"  approach 2 there: N = {short(b['isoflop_parameters'])}, D = {short(b['isoflop_tokens'])} tokens"
            )
    return "\n".join(lines)


def _interval(intervals, name) -> str:
    from bigpt.numbers import short

    return f" [{short(intervals[name][0])}, {short(intervals[name][1])}]" if name in intervals else ""


@console.reports_user_errors
def main(argv=None) -> int:
    args = parser.parse_args(argv)
    if args.command == "plan":
        plan(args)
    elif args.command == "run":
        run(args)
    else:
        fit(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
