"""The logits of a recipe's model (next-token, an encoder's masked-LM logits at every position, or an
encoder-decoder's decoder logits given its decoder tokens), with the weights [init] names, at any layout.

The forward pass is megatron-core's own pipeline schedule (forward only); the vocabulary shards
are gathered over the tensor-parallel group. This is how imported weights are checked against
an independent implementation (transformers) at TP/PP > 1.
"""

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from bigpt.data.batches import on_model_device
from bigpt.families import family_of
from bigpt.layout import Layout
from bigpt.model import build_model_chunks
from bigpt.recipe import Recipe
from bigpt.runtime.seeding import seed_everything
from bigpt.train.initial import load_initial_weights


@torch.no_grad()
def compute_logits(
    recipe: Recipe, layout: Layout, tokens: torch.Tensor, decoder_tokens: torch.Tensor | None = None
) -> torch.Tensor | None:
    """[batch, seq, vocab] fp32 logits of ``tokens`` ([batch, seq] ids; with interleaved pipeline
    parallelism, batch must be a multiple of parallel.pipeline) on the last pipeline stage, on the
    model's device; None on the other stages. An encoder-decoder reads ``tokens`` into its encoder
    and gives the logits at each of its ``decoder_tokens`` ([batch, decoder seq]; None: the decoder
    start token alone). Needs the process groups (``init_distributed``)."""
    seed_everything(recipe.train.seed)  # megatron-core's tensor-parallel RNG streams must exist
    chunks, _ = build_model_chunks(recipe, layout)
    load_initial_weights(recipe, layout, chunks)
    for chunk in chunks:
        chunk.eval()
    batch, seq = tokens.shape
    family = family_of(recipe.model)

    def forward_step(data_iterator, model):
        inputs = on_model_device(model, next(data_iterator))
        output = family.logits(model, **inputs)  # one sequence: [1, seq, vocab / tp] on the last stage
        return output, lambda logits: (logits.sum() * 0, torch.tensor(1), {"logits": logits})

    rows = [
        {"tokens": row} | ({} if decoder_tokens is None else {"decoder_tokens": decoder_tokens[index : index + 1]})
        for index, row in enumerate(tokens.split(1))
    ]
    iterators = [iter(rows) for _ in chunks]  # every virtual stage reads the same stream
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators[0] if len(chunks) == 1 else iterators,
        model=chunks[0] if len(chunks) == 1 else chunks,
        num_microbatches=batch,
        seq_length=seq,
        micro_batch_size=1,
        forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = gather_from_tensor_model_parallel_region(torch.cat([output["logits"] for output in outputs]))
    return logits[..., : recipe.model.vocab_size].float()
