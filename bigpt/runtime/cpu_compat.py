"""Let megatron-core run on a machine without a GPU (CI, laptops), through the very code paths
that run on clusters.

megatron-core assumes CUDA throughout: it allocates on ``torch.cuda.current_device()`` or
``device="cuda"``, moves tensors with ``.cuda()``, checks ``param.type() ==
'torch.cuda.FloatTensor'``, keeps a "CUDA" RNG tracker, and times with CUDA streams and events.
``enable()`` bridges all of it, once per process, and only when no GPU is present:

- a torch-function mode turns every CUDA device argument (and device index) into the CPU, makes ``.cuda()`` a no-op
  and reports CPU tensors as ``torch.cuda.*Tensor`` to ``Tensor.type()``; it is also entered
  around custom autograd backward passes (activation recompute), where torch drops it;
- ``torch.cuda`` gets harmless CPU meanings for devices, streams, events, memory and RNG;
- what megatron-core brings from the GPU to the host in another form (the MoE dispatcher's split
  sizes) takes that form on the CPU too.

The CPU default generator plays the device generator: on CPU every op draws from it, so the
tensor-parallel RNG tracker must swap *its* state for a fork (e.g. dropout inside a TP region)
to have any effect.

It is pinned to the megatron-core line it is tested with (``megatron_line``); another is refused with
a clear error rather than failing somewhere deep inside megatron-core.
"""

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

from bigpt.runtime.device import on_gpu
from bigpt.runtime.megatron_line import check_megatron_line, patch_target_error

_enabled = False


def _is_cuda(device) -> bool:
    # megatron passes torch.cuda.current_device(), an int, as a device: ints mean a GPU index.
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.device and len(args) == 1 and _is_cuda(args[0]) and isinstance(args[0], int):
            # torch.device(torch.cuda.current_device()), e.g. YaRN's rotary embedding as multi-latent
            # attention builds it: an index of no accelerator, which torch refuses
            return torch.device("cpu")
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return args[0].type().replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}  # copy only when rewriting: this runs for every op
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


class _Event:
    """A CUDA event on CPU: recording and waiting are instant."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Stream:
    """A CUDA stream on CPU: work is already ordered, so every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self):
        pass

    def query(self):
        return True


_STREAM = _Stream()


def _returning(value):
    """A fresh function per patched name: torch._dynamo refuses one object under two torch names."""
    return lambda *args, **kwargs: value


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = _returning(0)
    cuda.device_count = _returning(1)
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = _returning(_STREAM)
    cuda.default_stream = _returning(_STREAM)
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    for name in ("set_device", "synchronize", "empty_cache", "set_stream", "reset_peak_memory_stats"):
        setattr(cuda, name, _returning(None))
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, _returning(0))
    cuda.memory_stats = lambda *a, **k: {}
    cuda.nvtx.range_push = _returning(None)
    cuda.nvtx.range_pop = _returning(None)
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    # not torch.manual_seed: it calls torch.cuda.manual_seed_all, which would recurse.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.manual_seed_all = _returning(None)  # torch.manual_seed already seeded the CPU generator


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    # The tracker warns when the CPU RNG moves inside a fork: here that is the point of the fork.
    logging.getLogger(tp_random.__name__).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context"
    )
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _keep_mode_in_custom_backward() -> None:
    """torch's autograd engine runs backward passes with the torch-function mode stack emptied, yet
    custom autograd Functions run Python there, e.g. activation recompute re-running a layer's
    forward (which allocates on "cuda"): give their backward the mode too."""
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply(self, *args):
        with _CudaAsCpu():
            return original(self, *args)

    BackwardCFunction.apply = apply


def _moe_split_sizes_as_on_gpu() -> None:
    """megatron-core's all-to-all token dispatcher brings its split sizes from the GPU to the host
    as NumPy arrays, which ``all_to_all_single`` takes as lists of ints; a tensor already on the
    CPU is handed back as a tensor, which gloo's ``all_to_all_single`` refuses (TypeError). Convert
    it as on a GPU."""
    from megatron.core.transformer.moe import token_dispatcher

    original = getattr(token_dispatcher, "maybe_move_tensor_to_cpu", None)
    if original is None:
        raise patch_target_error(
            "the MoE all-to-all dispatcher on CPU", "token_dispatcher.maybe_move_tensor_to_cpu is gone"
        )

    def move_to_host(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = move_to_host


def _uneven_splits_over_gloo() -> None:
    """megatron-core gathers an expert-tensor-parallel group's tokens in uneven splits (the
    all-to-all dispatcher at expert TP > 1), and reduce-scatters their gradients back, with list
    collectives that NCCL runs and gloo refuses (all_gather: "invalid tensor size"). The same
    results by collectives gloo has: the splits padded to the largest and gathered, each cut back;
    the whole input all-reduced, and this rank's split kept."""
    from megatron.core.tensor_parallel import mappings

    gather = getattr(mappings, "_gather_along_first_dim", None)
    scatter = getattr(mappings, "_reduce_scatter_along_first_dim", None)
    if gather is None or scatter is None:
        raise patch_target_error("uneven expert-parallel splits on CPU", "mappings' gather/reduce-scatter are gone")

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        padded = input_.new_zeros((max(output_split_sizes), *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(parts, padded, group=group)
        return torch.cat([part[:size] for part, size in zip(parts, output_split_sizes, strict=True)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        summed = input_.contiguous().clone()
        torch.distributed.all_reduce(summed, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return summed[start : start + input_split_sizes[group.rank()]]

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def enable() -> None:
    """Bridge megatron-core's CUDA assumptions to the CPU for this process (idempotent)."""
    global _enabled
    if _enabled:
        return
    if on_gpu():
        raise RuntimeError("the CPU compatibility layer must not be enabled on a machine with a GPU")
    check_megatron_line()
    _patch_torch_cuda()
    _patch_megatron_rng()
    _keep_mode_in_custom_backward()
    _moe_split_sizes_as_on_gpu()
    _uneven_splits_over_gloo()
    _CudaAsCpu().__enter__()  # for the life of the process
    _enabled = True


def is_enabled() -> bool:
    return _enabled
