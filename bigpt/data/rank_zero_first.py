"""Build dataset indices on rank 0 first, then load them everywhere else, with a time limit.

megatron-core's dataset builder orders ranks itself with bare ``torch.distributed.barrier()``
calls: the others wait for rank 0 with no limit of their own and no word of why rank 0 failed,
and a cache directory that other nodes cannot see surfaces as a missing ``.npy`` file. bigpt
does the ordering instead, on a gloo group whose timeout is the wait limit, and lets megatron
build as if it were one process (its barriers would otherwise pair up across ranks doing
different things).
"""

import contextlib
import datetime
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from megatron.core.datasets import blended_dataset, blended_megatron_dataset_builder, gpt_dataset, masked_dataset

from bigpt.errors import BigptError

T = TypeVar("T")
# What asks torch.distributed for the world: the rank ordering and "rank 0 writes the cache".
MEGATRON_DATASET_MODULES = (blended_megatron_dataset_builder, gpt_dataset, blended_dataset, masked_dataset)


class _WorldOfOne:
    """torch.distributed as a process outside any job shows it."""

    @staticmethod
    def is_initialized() -> bool:
        return False

    @staticmethod
    def get_rank() -> int:
        return 0


class _TorchOfOneProcess:
    """``torch`` for megatron-core's dataset modules only: torch itself, but for its world."""

    distributed = _WorldOfOne

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def megatron_sees_one_process(quiet: bool):
    """While megatron-core's dataset code builds, its modules (and they alone) see a world of one,
    so it skips its rank ordering; ``quiet`` mutes its logging."""
    megatron_log = logging.getLogger("megatron.core.datasets")
    disabled = megatron_log.disabled
    megatron_log.disabled = disabled or quiet
    for module in MEGATRON_DATASET_MODULES:
        module.torch = _TorchOfOneProcess()
    try:
        yield
    finally:
        for module in MEGATRON_DATASET_MODULES:
            module.torch = torch
        megatron_log.disabled = disabled


def build_rank_zero_first(build: Callable[[], T], *, world_rank: int, cache_dir: str, timeout_minutes: float) -> T:
    """Run ``build`` on rank 0, which fills ``cache_dir``; then on every other rank.

    Ranks other than 0 wait at most ``timeout_minutes``; they fail with rank 0's own error if
    its build fails, and with a clear message if they cannot see the files it wrote.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        with megatron_sees_one_process(quiet=False):
            return build()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    try:
        if world_rank == 0:
            return _build_and_announce(build, cache_dir, group)
        written = _wait_for_rank_zero(world_rank, cache_dir, timeout_minutes, group)
        missing = [name for name in written if not os.path.exists(os.path.join(cache_dir, name))]
        if missing:
            raise BigptError(
                f"rank {world_rank} cannot see the dataset index files rank 0 wrote to "
                f"data.cache_dir {cache_dir} (e.g. {missing[0]}); put data.cache_dir on a file "
                "system every node shares"
            )
        with megatron_sees_one_process(quiet=True):
            return build()
    finally:
        dist.destroy_process_group(group)


def _build_and_announce(build: Callable[[], T], cache_dir: str, group) -> T:
    try:
        with megatron_sees_one_process(quiet=False):
            result = build()
    except BaseException as err:
        dist.broadcast_object_list([f"{type(err).__name__}: {err}"], src=0, group=group)
        raise
    written = sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []
    dist.broadcast_object_list([written], src=0, group=group)
    return result


def _wait_for_rank_zero(world_rank: int, cache_dir: str, timeout_minutes: float, group) -> list:
    outcome: list = [None]
    try:
        dist.broadcast_object_list(outcome, src=0, group=group)
    except RuntimeError as err:
        raise BigptError(
            f"rank {world_rank} waited up to {timeout_minutes:g} min for rank 0 to build the "
            f"dataset indices in data.cache_dir {cache_dir}, and rank 0 neither finished nor "
            f"reported an error ({err}); look for rank 0's error in its log, or raise "
            "data.build_timeout_minutes for very large blends"
        ) from None
    if isinstance(outcome[0], str):
        raise BigptError(f"rank 0 failed to build the datasets, so rank {world_rank} stops too: {outcome[0]}")
    return outcome[0]
