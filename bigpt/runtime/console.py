"""What a run prints: bigpt's own log on rank 0, minus dependency warnings that are expected
and say nothing a user can act on (no Apex/TE on CPU, torch deprecations inside megatron-core)."""

import logging
import warnings

_EXPECTED_WARNINGS = (
    r".*(Apex|Transformer Engine and Apex) (is|are) not installed.*",
    r"full scope is deprecated.*",
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor.*",
    r"When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS.*",
)


def configure_console(rank: int) -> None:
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("bigpt: %(message)s"))
    bigpt_log = logging.getLogger("bigpt")
    bigpt_log.addHandler(handler)
    bigpt_log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    bigpt_log.propagate = False
