"""Seeding and RNG state capture, so a resumed run draws exactly what the uninterrupted one would."""

import random

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from bigpt.runtime.device import on_gpu


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch get ``seed`` + 100 × this rank's pipeline stage; megatron-core's
    tracker derives the tensor-parallel stream from that (same across data-parallel replicas,
    distinct across TP ranks). The stage term is Megatron-LM's (``_set_random_seed``): megatron-core's
    streams have none, so without it every stage would draw the same numbers and initialise its
    layers as copies of the other stages' (the virtual chunks of one stage differ: they draw in turn)."""
    seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if on_gpu():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
