"""Score a model on the recipe's downstream tasks (eval.tasks), at any layout.

    python tools/evaluate.py RUN_DIR/recipe.toml init.from_checkpoint=RUN_DIR/checkpoints/iter_0001000
    torchrun --nproc_per_node 4 tools/evaluate.py RECIPE init.from_hf=hf_model parallel.tensor=2 parallel.pipeline=2

RECIPE is a whole training recipe (a run's own recipe.toml will do): its [model], its weights
([init]: init.from_checkpoint for a bigpt checkpoint, init.from_hf for a Hugging Face folder),
data.tokenizer and eval.tasks are used, and [parallel] for the layout. Prints each task's acc and
acc_norm (lm-evaluation-harness's definitions, docs/evaluation.md); --out also writes them with
every choice's log-likelihood as JSON.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import add_overwrite, recipe_parser  # noqa: E402
from bigpt.errors import BigptError  # noqa: E402
from bigpt.paths import check_output_file, write_atomically  # noqa: E402
from bigpt.runtime import console  # noqa: E402
from bigpt.runtime.process import exit_without_final_gc, skip_torch_compile_without_gpu  # noqa: E402

skip_torch_compile_without_gpu()

parser = recipe_parser(__doc__, example="init.from_hf=path/to/model")
parser.add_argument("--out", help="also write the scores, with each choice's log-likelihood, to this JSON file")
add_overwrite(parser, "an existing --out file")


def evaluate(recipe, layout) -> dict:
    """{task: {"acc", "acc_norm", "loglikelihoods"}} of the recipe's model and weights (every rank)."""
    from bigpt.data.datasets import checked_tokenizer
    from bigpt.data.tasks import accuracies
    from bigpt.model import build_model_chunks
    from bigpt.runtime.seeding import seed_everything
    from bigpt.train.initial import load_initial_weights
    from bigpt.train.tasks import load_tasks, loglikelihoods
    from bigpt.train.trainer import Trainer

    seed_everything(recipe.train.seed)  # megatron-core's tensor-parallel RNG streams must exist
    chunks, _ = build_model_chunks(recipe, layout)
    load_initial_weights(recipe, layout, chunks)
    scorer = Trainer(recipe, layout, chunks, None, None, None, [])
    results = {}
    for task in load_tasks(recipe, checked_tokenizer(recipe)):
        scores = loglikelihoods(scorer, task.samples)
        results[task.name] = {**accuracies(task.examples, scores), "loglikelihoods": scores}
        console.say(
            f"{task.name}: acc {results[task.name]['acc']:.4f} | acc_norm {results[task.name]['acc_norm']:.4f} "
            f"({len(task.examples)} examples)"
        )
    return results


@console.reports_user_errors
def main(argv=None) -> int:
    args = parser.parse_args(argv)
    console.quiet_dependencies()
    from bigpt.layout import Layout
    from bigpt.recipe import load_recipe
    from bigpt.runtime.distributed import destroy_distributed, init_distributed

    recipe = load_recipe(args.recipe, args.overrides)
    if not recipe.eval.tasks:
        raise BigptError(f"{args.recipe} names no task; add [[eval.tasks]] (name, path), see docs/evaluation.md.")
    if not (recipe.init.from_hf or recipe.init.from_checkpoint):
        raise BigptError(
            "tools/evaluate.py scores the weights [init] names, and it names none: give init.from_checkpoint="
            "<checkpoint> or init.from_hf=<Hugging Face folder>."
        )
    if args.out:
        check_output_file(args.out, "--out", args.overwrite)
    layout = Layout.from_recipe(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    init_distributed(layout)
    try:
        results = evaluate(recipe, layout)
        if args.out and console.speaks():
            write_atomically(args.out, json.dumps(results, indent=1) + "\n", key="--out")
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    exit_without_final_gc(main())
