"""Entry point: `torchrun --nproc_per_node N launchers/run.py RECIPE [key=value ...]`.

`python launchers/run.py RECIPE --dry-run [--world-size N]` validates the recipe on paper and
prints the plan without touching a device, then every problem a start would refuse (exit 2 if any).
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import add_overwrite, recipe_parser  # noqa: E402
from bigpt.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER_ERROR, BigptError, Preempted  # noqa: E402
from bigpt.runtime import console  # noqa: E402
from bigpt.runtime.process import exit_without_final_gc, skip_torch_compile_without_gpu  # noqa: E402

skip_torch_compile_without_gpu()
console.quiet_dependencies()  # before megatron-core is imported: it warns then

QUIET_RANK_GRACE_S = 30


parser = recipe_parser(__doc__, example="parallel.tensor=4 train.train_iters=200")
parser.add_argument(
    "--dry-run",
    action="store_true",
    help="validate and print the plan, then every problem a start would refuse; exit 0 if none, 2 if any",
)
add_overwrite(parser, "the run's recipe.toml in run_dir, or checkpoint.dir's latest, that bigpt did not write")
parser.add_argument(
    "--world-size",
    type=int,
    default=None,
    help="world size to validate against with --dry-run (default: WORLD_SIZE or the recipe's own layout)",
)


def main(argv=None) -> int:
    args = parser.parse_args(argv)
    try:
        from bigpt.layout import Layout
        from bigpt.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            from bigpt.dryrun import describe

            problems: list[str] = []
            console.say(describe(recipe, Layout.from_recipe(recipe, args.world_size), problems, args.overwrite))
            if not problems:
                return 0
            console.error(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} a start would refuse:")
            for problem in problems:
                console.error(problem)
            return EXIT_USER_ERROR
        layout = Layout.from_recipe(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    except BigptError as err:  # the same on every rank: say it once
        console.error(str(err))
        if not console.speaks():
            # torchrun kills the remaining ranks when the first one exits; were that a silent
            # rank, the speaking one could die before it says why. It fails the same way, so give it time.
            time.sleep(QUIET_RANK_GRACE_S)
        return EXIT_USER_ERROR
    try:
        from bigpt.train.main import train

        train(recipe, layout, args.overwrite)
        return 0
    except BigptError as err:
        console.rank_error(str(err))
        return EXIT_USER_ERROR
    except Preempted as stop:
        console.note(f"{stop} (exit {EXIT_PREEMPTED})")
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # Ctrl-C before the first step: there is nothing to save yet
        console.note(f"interrupted before training started; nothing was saved (exit {EXIT_INTERRUPTED})")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    exit_without_final_gc(main())
