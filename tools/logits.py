"""Write a model's next-token logits on given tokens (checks imported weights at any layout).

    torchrun --nproc_per_node 2 tools/logits.py RECIPE --tokens tokens.npy --out logits.npy parallel.tensor=2

The recipe's [model] and [init] (init.from_hf or init.from_checkpoint) give the model and its
weights, [parallel] the layout. --tokens is a [batch, seq] integer .npy array; --out gets the
[batch, seq, vocab] float32 logits, written by the rank that holds them.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.errors import reports_user_errors  # noqa: E402
from bigpt.runtime.console import quiet_dependencies  # noqa: E402
from bigpt.runtime.process import exit_without_final_gc, skip_torch_compile_without_gpu  # noqa: E402

skip_torch_compile_without_gpu()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="path to a TOML recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor=2")
    parser.add_argument("--tokens", required=True, help="[batch, seq] token ids, .npy")
    parser.add_argument("--out", required=True, help="where to write the [batch, seq, vocab] logits, .npy")
    return parser.parse_intermixed_args(argv)


def layout_of(recipe):
    """The recipe's layout at this job's world size (torchrun's WORLD_SIZE; 1 without torchrun)."""
    from bigpt.layout import Layout

    return Layout.from_recipe(recipe, int(os.environ.get("WORLD_SIZE", "1")))


def write_logits(recipe, tokens: str, out: str) -> None:
    """The logits of the recipe's model on the tokens in the .npy file ``tokens``, saved to ``out``
    by the rank that holds them; needs the process groups of the recipe's layout."""
    import numpy as np
    import torch
    from megatron.core import parallel_state

    from bigpt.logits import compute_logits

    logits = compute_logits(recipe, layout_of(recipe), torch.from_numpy(np.load(tokens, allow_pickle=False)).long())
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0 \
            and parallel_state.get_data_parallel_rank() == 0:
        np.save(out, logits.numpy())


@reports_user_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_dependencies()
    from bigpt.recipe import load_recipe
    from bigpt.runtime.distributed import destroy_distributed, init_distributed

    recipe = load_recipe(args.recipe, args.overrides)
    init_distributed(layout_of(recipe))
    try:
        write_logits(recipe, args.tokens, args.out)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    exit_without_final_gc(main())
