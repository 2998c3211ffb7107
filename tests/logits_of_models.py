"""tools/logits.py for several models of one layout in one torchrun job (one start, not one per model):

    torchrun --nproc_per_node 2 tests/logits_of_models.py RECIPE,TOKENS,OUT[,DECODER_TOKENS] [...] -- OVERRIDES

Each model runs in the directory of its OUT (run_dir), with the same OVERRIDES (the layout); an
encoder-decoder's job names its --decoder-tokens too.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from logits import layout_of, read_decoder_tokens, read_tokens, write_logits  # noqa: E402  (tools/logits.py)

from bigpt.recipe import load_recipe  # noqa: E402
from bigpt.runtime.distributed import destroy_distributed, init_distributed  # noqa: E402
from bigpt.runtime.process import exit_without_final_gc  # noqa: E402

if __name__ == "__main__":
    split = sys.argv.index("--")
    jobs = [job.split(",") for job in sys.argv[1:split]]
    recipes = [load_recipe(job[0], [f"run_dir={Path(job[2]).parent}", *sys.argv[split + 1 :]]) for job in jobs]
    init_distributed(layout_of(recipes[0]))  # the process groups of the layout all models share
    try:
        for recipe, (_, tokens_file, out, *decoder_file) in zip(recipes, jobs):
            tokens = read_tokens(tokens_file, recipe.model.vocab_size)
            write_logits(recipe, tokens, out, read_decoder_tokens(next(iter(decoder_file), None), recipe, tokens))
    finally:
        destroy_distributed()
    exit_without_final_gc(0)
