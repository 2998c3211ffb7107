"""The model-specific part of a step: feed a micro-batch to a GPTModel chunk, and its loss.

The loss is the masked *sum* of token losses plus the token count; megatron-core divides the
gradients by the global token count, so every layout averages over exactly the same tokens.
"""

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_batch_on_this_cp_rank

from bigpt.data.batches import on_model_device
from bigpt.runtime.device import device


def forward_step(data_iterator, model):
    """megatron-core's ``forward_step_func``: every rank reads the micro-batch (cheap, and it keeps
    each rank's data position in step); the first stage uses the tokens, the last the labels."""
    batch = on_model_device(model, next(data_iterator))
    if parallel_state.get_context_parallel_world_size() > 1:
        # This rank's 2 of the 2 × cp sequence chunks (zigzag, for causal load balance), within its
        # own context-parallel group: without the group megatron-core splits over the whole world.
        batch = get_batch_on_this_cp_rank(
            batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
        )
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss_mask = batch["loss_mask"]
    return output, lambda output_tensor: token_loss(loss_mask, output_tensor)


def token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(loss sum, token count, {"lm loss": [sum, count]}) as megatron-core's schedule expects."""
    mask = loss_mask.view(-1).float()
    loss = torch.sum(per_token_loss.float().view(-1) * mask)
    tokens = mask.sum()
    return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens])}


def reduce_losses(losses: list[dict]) -> torch.Tensor:
    """[loss sum, token count] of the global batch, known on every rank (so that every rank takes
    the same decision on a bad loss): summed over data-parallel replicas, then over pipeline
    stages, where only the last one holds losses."""
    total = torch.zeros(2, dtype=torch.float64)
    for entry in losses:
        total += entry["lm loss"].to(torch.float64).cpu()
    total = total.to(device())
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total.cpu()
