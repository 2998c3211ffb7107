"""Process groups from torchrun's environment: NCCL on GPUs, gloo (+ the CPU layer) without."""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from bigpt.errors import BigptError
from bigpt.layout import Layout
from bigpt.runtime import console, cpu_compat, megatron_fixes
from bigpt.runtime.device import on_gpu

_world_of_one_variables: list[str] = []
"""The variables init_distributed set for a world of one, removed again by destroy_distributed: a
process that goes on after its run (tools/ladder.py's runs, a test) is not left looking like a
rank of a job."""


def init_distributed(layout: Layout, timeout_minutes: int = 10) -> None:
    """Join the job torchrun started and build megatron-core's tp/pp/vpp/cp/dp groups."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != layout.world_size:
        raise BigptError(
            f"the job has {world_size} processes but the recipe's layout needs {layout.world_size} "
            f"(tp {layout.tp} x pp {layout.pp} x cp {layout.cp} x dp {layout.dp}); start it with "
            f"torchrun --nproc_per_node {layout.world_size} (or nodes x GPUs = {layout.world_size}), "
            "or change parallel.* in the recipe."
        )
    megatron_fixes.apply()
    if on_gpu():
        # megatron-core's TP/SP communication overlap relies on kernels being issued in order.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        cpu_compat.enable()
        backend = "gloo"
    rendezvous = {}
    if "MASTER_ADDR" not in os.environ:  # a plain `python` run: a world of one
        _world_of_one_variables[:] = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name not in os.environ]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if "MASTER_PORT" in os.environ:
            _world_of_one_variables.append("MASTER_ADDR")
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        else:  # its store in memory: no port, so two such runs on one machine never collide
            rendezvous = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes), **rendezvous)
    except RuntimeError as err:  # torch's DistNetworkError, from the rendezvous store's listening socket
        if "EADDRINUSE" not in str(err) and "address already in use" not in str(err).lower():
            raise
        raise BigptError(
            f"port {os.environ['MASTER_PORT']} on {os.environ['MASTER_ADDR']} is already in use (another run, or "
            "another program), so this job cannot start its rendezvous there; pick a free port: MASTER_PORT=PORT "
            "for a single process, torchrun --master_port PORT (or --standalone, which finds a free one)."
        ) from None
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        distributed_timeout_minutes=timeout_minutes,
    )
    console.note(f"process groups ready: {backend} backend, {layout}")


def destroy_distributed() -> None:
    if dist.is_initialized():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    for name in _world_of_one_variables:
        os.environ.pop(name, None)
    _world_of_one_variables.clear()


@contextlib.contextmanager
def process_group_of_one():
    """A gloo group of this process alone (tools that read or write checkpoints outside a job);
    the store lives in memory, so no port is taken. megatron-core's fixes apply as in a job: the
    tools build models too."""
    megatron_fixes.apply()
    if not on_gpu():
        cpu_compat.enable()  # dist_checkpointing synchronizes "the GPU" even for CPU tensors
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def model_parallel_of_one():
    """``process_group_of_one`` with megatron-core's groups, all of size one: a model run by a
    tool outside a job (scoring documents)."""
    with process_group_of_one():
        parallel_state.initialize_model_parallel()
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
