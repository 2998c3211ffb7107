"""Whether bigpt runs on a GPU, decided in one place: every "CUDA or CPU" choice asks here."""

import functools

import torch


@functools.cache
def on_gpu() -> bool:
    """CUDA is available: NCCL, CUDA kernels and device memory; otherwise the CPU over gloo."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """Where bigpt's own small tensors (loss sums, step flags) go for a collective."""
    return torch.device("cuda" if on_gpu() else "cpu")
