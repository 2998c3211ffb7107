"""Write a model's logits on given tokens (checks imported weights at any layout): next-token
logits, a masked-LM encoder's logits at every position (one unpadded segment), or an
encoder-decoder's (T5's) decoder logits at every decoder token given the encoder's tokens.

    torchrun --nproc_per_node 2 tools/logits.py RECIPE --tokens tokens.npy --out logits.npy parallel.tensor=2

RECIPE is a whole training recipe (a run's own recipe.toml will do): it must validate as one, but
only its [model] and [init] (init.from_hf or init.from_checkpoint) are used, for the model and its
weights, and [parallel] for the layout. --tokens is a [batch, seq] .npy array of integer token ids
below model.vocab_size; --out gets the [batch, seq, vocab] float32 logits, written by the rank
that holds them. An encoder-decoder (model.family = "encoder_decoder") reads --tokens into its
encoder and --decoder-tokens ([batch, decoder seq], e.g. the decoder start token 0 and the target
shifted right, as transformers' decoder_input_ids) into its decoder; --out then gets the [batch,
decoder seq, vocab] logits at each decoder token (without --decoder-tokens: the decoder start token
alone, [batch, 1, vocab]).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import add_overwrite, recipe_parser  # noqa: E402
from bigpt.errors import BigptError  # noqa: E402
from bigpt.paths import check_input_file, check_output_file, write_atomically  # noqa: E402
from bigpt.runtime import console  # noqa: E402
from bigpt.runtime.process import exit_without_final_gc, skip_torch_compile_without_gpu  # noqa: E402

skip_torch_compile_without_gpu()


parser = recipe_parser(__doc__, example="parallel.tensor=2")
parser.add_argument("--tokens", required=True, help="[batch, seq] token ids, .npy")
parser.add_argument(
    "--decoder-tokens",
    help='[batch, decoder seq] token ids the decoder reads, .npy (model.family = "encoder_decoder" only)',
)
parser.add_argument("--out", required=True, help="where to write the [batch, seq, vocab] logits, .npy")
add_overwrite(parser, "an existing --out file")


def read_tokens(path: str, vocab_size: int, flag: str = "--tokens"):
    """The [batch, seq] integer ids in the .npy file ``path`` (given as ``flag``), each below ``vocab_size``."""
    import numpy as np

    check_input_file(path, flag)
    try:
        tokens = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise BigptError(f"{flag} = {path} is not a .npy array ({err}); write it with numpy.save.") from None
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or 0 in tokens.shape:
        raise BigptError(
            f"{flag} = {path} holds a {tokens.dtype} array of shape {tokens.shape}; it must be a "
            "non-empty [batch, seq] array of integer token ids (a single sequence: shape [1, seq])."
        )
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise BigptError(
            f"{flag} = {path} holds token ids from {tokens.min()} to {tokens.max()}, outside 0.."
            f"{vocab_size - 1} (model.vocab_size = {vocab_size}); tokenize with the model's tokenizer."
        )
    return tokens


def read_decoder_tokens(path: str | None, recipe, tokens):
    """The --decoder-tokens of an encoder-decoder (None where not given), one row per row of ``tokens``."""
    if path is None:
        return None
    if recipe.model.family != "encoder_decoder":
        raise BigptError(
            f"--decoder-tokens = {path} is given, but model.family = {recipe.model.family!r} has no decoder that "
            'reads other tokens than its input; it is for model.family = "encoder_decoder" (T5): remove it.'
        )
    decoder_tokens = read_tokens(path, recipe.model.vocab_size, "--decoder-tokens")
    if len(decoder_tokens) != len(tokens):
        raise BigptError(
            f"--decoder-tokens = {path} has {len(decoder_tokens)} rows and --tokens {len(tokens)}; give the "
            "decoder one row per encoder input."
        )
    return decoder_tokens


def layout_of(recipe):
    """The recipe's layout at this job's world size (torchrun's WORLD_SIZE; 1 without torchrun)."""
    from bigpt.layout import Layout

    return Layout.from_recipe(recipe, int(os.environ.get("WORLD_SIZE", "1")))


def write_logits(recipe, tokens, out: str, decoder_tokens=None) -> None:
    """The logits of the recipe's model on ``tokens`` ([batch, seq] ids, ``read_tokens``; an
    encoder-decoder's at its ``decoder_tokens``), saved to ``out`` by the rank that holds them;
    needs the process groups of the recipe's layout."""
    import numpy as np
    import torch
    from megatron.core import parallel_state

    from bigpt.logits import compute_logits

    decoder = None if decoder_tokens is None else torch.from_numpy(decoder_tokens).long()
    logits = compute_logits(recipe, layout_of(recipe), torch.from_numpy(tokens).long(), decoder)
    if (
        logits is not None
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    ):
        write_atomically(out, lambda f: np.save(f, logits.cpu().numpy()), key="--out", binary=True)


@console.reports_user_errors
def main(argv=None) -> int:
    args = parser.parse_args(argv)
    console.quiet_dependencies()
    from bigpt.recipe import load_recipe
    from bigpt.runtime.distributed import destroy_distributed, init_distributed

    recipe = load_recipe(args.recipe, args.overrides)
    layout = layout_of(recipe)
    tokens = read_tokens(args.tokens, recipe.model.vocab_size)
    decoder_tokens = read_decoder_tokens(args.decoder_tokens, recipe, tokens)
    check_output_file(args.out, "--out", args.overwrite)
    init_distributed(layout)
    try:
        write_logits(recipe, tokens, args.out, decoder_tokens)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    exit_without_final_gc(main())
