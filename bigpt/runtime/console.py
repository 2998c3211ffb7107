"""What a run prints: bigpt's own log on rank 0, minus dependency warnings and log lines that are
expected and say nothing a user can act on (no Apex/TE on CPU, deprecations inside megatron-core
and of the APIs it calls, advice addressed to megatron-core's own callers)."""

import logging
import warnings

_EXPECTED_WARNINGS = (
    r".*(Apex|Transformer Engine and Apex) (is|are) not installed.*",
    r"full scope is deprecated.*",
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor.*",
    r"When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS.*",
    r"MimoModelConfig is experimental.*",  # an import side effect
    # torch.distributed.checkpoint, as megatron-core's dist_checkpointing calls it
    r"The argument order of load has been changed.*",
    r"torch\.distributed is disabled, unavailable or uninitialized.*",
    r"Please use DTensor instead and we are deprecating ShardedTensor.*",
)

_EXPECTED_LOG_LINES = {  # megatron-core logger -> the start of a message that is not for bigpt's users
    # bigpt stays on GPTModel on purpose: docs/megatron-core.md, "GPTModel, not HybridModel".
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    # DDP computes the same layout the distributed optimizer would be asked for.
    "megatron.core.distributed.distributed_data_parallel": "DistributedDataParallel: full_param_layout not provided",
    # dist_checkpointing's own load and (synchronous) save still go through these.
    "megatron.core.dist_checkpointing.strategies.common": "load_common is deprecated",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    "megatron.core.datasets.gpt_dataset": "Unable to save MockGPTDataset indexes",  # mock data has no cache
}


def quiet_dependencies() -> None:
    """Drop the expected dependency output; call before megatron-core is imported (it warns then)."""
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, start in _EXPECTED_LOG_LINES.items():
        logging.getLogger(name).addFilter(lambda record, start=start: not record.getMessage().startswith(start))


def configure_console(rank: int) -> None:
    quiet_dependencies()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("bigpt: %(message)s"))
    bigpt_log = logging.getLogger("bigpt")
    bigpt_log.addHandler(handler)
    bigpt_log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    bigpt_log.propagate = False
