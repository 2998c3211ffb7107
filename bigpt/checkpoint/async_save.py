"""Asynchronous saves: megatron-core's sharded state dict, written by torch.distributed.checkpoint's
``async_save`` while training goes on.

megatron-core 0.19 deprecates its own asynchronous writer for NVIDIA's resiliency extension
(NVRx), which publishes no build for the machines bigpt's tests run on (CPU, Python 3.11). The
files are the same either way: megatron-core's ``torch_dist`` format is torch's distributed
checkpoint format, so the state dict is translated as ``dist_checkpointing.save`` translates it
and handed to torch, whose writer thread runs on a process group of its own (its collectives
never interleave with training's). ``dist_checkpointing.load`` reads the result. Every tensor this
rank writes is copied to host memory before ``start`` returns, as megatron-core's writer does
(training changes the weights from then on); torch's own stager cannot copy megatron-core's
tensor wrappers.
"""

from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.staging import AsyncStager

from bigpt.runtime.device import device

_FORMAT = TorchDistSaveShardedStrategy()  # only its format name and version are used


class _Copied(AsyncStager):
    """The state dict is host copies already (``_copy_to_host``)."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict


def _copy_to_host(sharded: dict) -> None:
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor):
            value.data = value.data.detach().to("cpu", copy=True)


class AsyncSaver:
    """At most one save in flight. Every method is a collective: all ranks call it alike."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo")  # torch's writer thread needs a CPU backend
        self.future: Future | None = None
        self.directory: Path | None = None

    def start(self, sharded_state_dict: dict, directory: Path, spread: FullyParallelSaveStrategyWrapper) -> None:
        """What ``dist_checkpointing.save`` with the ``spread`` strategy does before it writes, then
        torch's asynchronous write."""
        sharded, common = save_preprocess(sharded_state_dict)
        spread.apply_saving_parallelization(sharded)
        sharded["common_state"] = ShardedObject("common_state", common, (1,), (0,), replica_id=dist.get_rank())
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded, keep_only_main_replica=_FORMAT.keep_only_main_replica
        )
        _copy_to_host(by_key)  # only what this rank writes
        planner = MCoreSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.directory = directory
        self.future = dcp.async_save(
            mcore_to_pyt_state_dict(by_key),
            storage_writer=dcp.FileSystemWriter(directory),
            planner=planner,
            process_group=self.group,
            async_stager=_Copied(),
        )

    def written(self, blocking: bool) -> bool:
        """Whether every rank's files are written (waiting for them with ``blocking``). Raises what
        the write raised (torch's CheckpointException, on every rank) once all are done."""
        if self.future is None:
            return False
        if blocking:
            self.future.exception()  # waits
        done = torch.tensor([float(self.future.done())], device=device())
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if not done.item():
            return False
        future, self.future = self.future, None
        future.result()
        if dist.get_rank() == 0:
            save_config(CheckpointingConfig(_FORMAT.backend, _FORMAT.version), str(self.directory))
        return True
