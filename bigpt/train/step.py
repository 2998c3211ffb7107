"""The losses of a step, known on every rank. The model-specific part, feeding a micro-batch to a
chunk and its loss, is the model family's forward step (``bigpt.families``)."""

import torch
from megatron.core import parallel_state

from bigpt.runtime.device import device


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
