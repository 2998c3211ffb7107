"""The CPU compatibility layer (bigpt/runtime/cpu_compat.py) on its own.

``enable()`` changes the whole process (torch.cuda is patched, a torch-function mode stays
entered), so the checks run once in a fresh interpreter: this file run as a script, which prints
its findings as JSON. The tests below assert on them one by one. Only the version check, which
has no side effects, runs in the pytest process itself.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigpt.errors import BigptError

ROOT = Path(__file__).resolve().parent.parent
SEED = 1234
TP_OFFSET = 2718  # megatron-core: tensor-parallel seed = seed + 2718 + tp_rank

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer refuses to run next to a GPU")


# --- the probe, run in a fresh interpreter --------------------------------------------------------


def _refusal(cpu_compat) -> dict:
    """enable() with an untested megatron-core version: an error, and nothing patched."""
    import megatron.core

    installed = megatron.core.__version__
    current_device = torch.cuda.current_device
    megatron.core.__version__ = "0.0.1-untested"
    try:
        cpu_compat.enable()
        error = None
    except BigptError as err:
        error = str(err)
    finally:
        megatron.core.__version__ = installed
    return {
        "error": error,
        "enabled_after": cpu_compat.is_enabled(),
        "torch_cuda_untouched": torch.cuda.current_device is current_device,
    }


def _devices() -> dict:
    t = torch.ones(2)
    return {
        "empty_cuda": str(torch.empty(3, device="cuda").device),
        "empty_cuda_1": str(torch.empty(3, device="cuda:1").device),
        "zeros_current_device": str(torch.zeros(2, device=torch.cuda.current_device()).device),
        "arange_torch_device": str(torch.arange(4, device=torch.device("cuda")).device),
        "cuda_is_identity": t.cuda() is t,
        "to_cuda": str(t.to("cuda").device),
        "to_device_kwarg": str(t.to(device="cuda").device),
        "float_type": torch.ones(1).type(),
        "long_type": torch.ones(1, dtype=torch.long).type(),
        "type_conversion": torch.ones(1).type(torch.float64).dtype == torch.float64,
        "current_device": torch.cuda.current_device(),
        "in_custom_backward": _device_allocated_in_custom_backward(),
        "device_of_index": str(torch.device(torch.cuda.current_device())),
        "yarn_rotary_embedding": str(_yarn_rotary_embedding().inv_freq.device),
    }


def _yarn_rotary_embedding():
    """As multi-latent attention builds it: on ``torch.device(torch.cuda.current_device())``."""
    from megatron.core.models.common.embeddings import YarnRotaryEmbedding

    return YarnRotaryEmbedding(8, scaling_factor=4.0)


def _device_index_without_the_layer() -> str:
    try:
        torch.device(0)
    except RuntimeError as err:
        return str(err)
    return "no error"


def _device_allocated_in_custom_backward() -> str:
    """Activation recompute allocates on "cuda" inside a custom Function's backward, where torch's
    autograd engine runs without the torch-function mode stack."""
    seen = {}

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            mask = torch.ones(grad.shape, device="cuda")
            seen["device"] = str(mask.device)
            return grad * mask * 2

    x = torch.ones(3, requires_grad=True)
    Recompute.apply(x).sum().backward()
    return seen["device"]


def _cuda_shims() -> dict:
    torch.cuda.set_device(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    stream = torch.cuda.Stream()
    start.record()
    with torch.cuda.stream(stream):
        value = (torch.ones(4, device="cuda") * 2).sum().item()
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.current_stream().wait_event(end)
    end.record()
    end.synchronize()
    stream.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {
        "value": value,
        "elapsed": float(start.elapsed_time(end)),
        "memory_allocated": torch.cuda.memory_allocated(),
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
        "memory_stats": torch.cuda.memory_stats(),
    }


def _rng() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def seed(tp_rank=0):
        torch.manual_seed(SEED)
        model_parallel_cuda_manual_seed(SEED, tp_rank=tp_rank, ep_rank=0, etp_rank=0)

    def dropout():
        return torch.nn.functional.dropout(torch.ones(4096), p=0.5, training=True)

    seed()
    outside = dropout()
    seed()
    with get_cuda_rng_tracker().fork():
        inside = dropout()
    seed()
    with get_cuda_rng_tracker().fork():
        inside_again = dropout()
    seed(tp_rank=1)
    with get_cuda_rng_tracker().fork():
        inside_tp1 = dropout()

    # The fork draws from the stream seeded with seed + 2718 + tp_rank, nothing else.
    seed()
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(8)
    torch.manual_seed(SEED + TP_OFFSET)
    expected_fork = torch.rand(8)

    # The outer stream continues as if the fork had not happened.
    seed()
    plain = torch.rand(16)
    seed()
    first = torch.rand(8)
    with get_cuda_rng_tracker().fork():
        torch.rand(1000)
        dropout()
    rest = torch.rand(8)

    # Two forks in a row continue the tracked stream rather than restarting it.
    seed()
    with get_cuda_rng_tracker().fork():
        one = torch.rand(8)
    with get_cuda_rng_tracker().fork():
        two = torch.rand(8)
    torch.manual_seed(SEED + TP_OFFSET)
    continued = torch.rand(16)

    return {
        "inside_differs_from_outside": not torch.equal(inside, outside),
        "inside_reproducible": torch.equal(inside, inside_again),
        "tp_ranks_differ": not torch.equal(inside, inside_tp1),
        "dropout_is_dropout": abs(inside.eq(0).float().mean().item() - 0.5) < 0.05,
        "fork_uses_tp_seed": torch.equal(forked, expected_fork),
        "outer_stream_unaffected": torch.equal(torch.cat([first, rest]), plain),
        "fork_stream_continues": torch.equal(torch.cat([one, two]), continued),
        "cuda_rng_state_is_cpu_state": torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state()),
    }


def probe() -> dict:
    from bigpt.runtime import cpu_compat

    result = {"refusal": _refusal(cpu_compat), "device_index_without_the_layer": _device_index_without_the_layer()}
    cpu_compat.enable()
    cpu_compat.enable()  # idempotent
    result["enabled"] = cpu_compat.is_enabled()
    result["devices"] = _devices()
    result["shims"] = _cuda_shims()
    result["rng"] = _rng()
    return result


# --- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probed() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@cpu_only
def test_enable_is_idempotent(probed):
    assert probed["enabled"] is True


@cpu_only
def test_cuda_devices_land_on_cpu(probed):
    d = probed["devices"]
    assert d["empty_cuda"] == d["empty_cuda_1"] == d["arange_torch_device"] == "cpu"
    assert d["zeros_current_device"] == "cpu"
    assert d["current_device"] == 0
    assert d["in_custom_backward"] == "cpu"


@cpu_only
def test_a_device_index_means_the_cpu(probed):
    """megatron-core's YaRN rotary embedding (multi-latent attention builds it without
    use_cpu_initialization) enters ``torch.device(torch.cuda.current_device())``, which torch
    refuses where there is no accelerator."""
    assert "Cannot access accelerator device" in probed["device_index_without_the_layer"]
    assert probed["devices"]["device_of_index"] == probed["devices"]["yarn_rotary_embedding"] == "cpu"


@cpu_only
def test_moving_to_cuda_is_a_no_op(probed):
    d = probed["devices"]
    assert d["cuda_is_identity"] is True
    assert d["to_cuda"] == d["to_device_kwarg"] == "cpu"


@cpu_only
def test_tensor_type_reports_cuda(probed):
    d = probed["devices"]
    assert d["float_type"] == "torch.cuda.FloatTensor"  # what megatron-core's optimizers check
    assert d["long_type"] == "torch.cuda.LongTensor"
    assert d["type_conversion"] is True  # .type(dtype) still converts


@cpu_only
def test_streams_events_and_memory_are_harmless(probed):
    s = probed["shims"]
    assert s["value"] == 8.0
    assert s["elapsed"] == 0.0
    assert s["memory_allocated"] == s["max_memory_allocated"] == 0
    assert s["memory_stats"] == {}


@cpu_only
def test_rng_fork_swaps_the_stream(probed):
    r = probed["rng"]
    assert r["dropout_is_dropout"]
    assert r["inside_differs_from_outside"], "dropout in a tracker fork drew from the outer stream"
    assert r["fork_uses_tp_seed"], "the fork does not draw from the tensor-parallel seed's stream"
    assert r["tp_ranks_differ"], "tensor-parallel ranks share one dropout stream"


@cpu_only
def test_rng_fork_is_reproducible_after_reseeding(probed):
    assert probed["rng"]["inside_reproducible"]


@cpu_only
def test_rng_outer_stream_is_unaffected_by_the_fork(probed):
    r = probed["rng"]
    assert r["outer_stream_unaffected"], "draws inside a fork moved the outer (default) stream"
    assert r["fork_stream_continues"], "a second fork restarted the tracked stream"
    assert r["cuda_rng_state_is_cpu_state"]


@cpu_only
def test_enable_refuses_an_untested_megatron_core(probed):
    r = probed["refusal"]
    assert r["error"] is not None and "0.0.1-untested" in r["error"]
    assert r["enabled_after"] is False
    assert r["torch_cuda_untouched"] is True


@pytest.mark.parametrize("version", ["0.16.1", "0.18.0", "0.20.0rc1", "1.19.2"])
def test_another_megatron_core_line_is_refused(version):
    from bigpt.runtime.megatron_line import check_megatron_line

    check_megatron_line()  # the installed version is on the tested line
    check_megatron_line("0.19.7+abc123")  # so is any 0.19.x build
    with pytest.raises(BigptError, match=rf"megatron-core {re.escape(version)} is installed, .* the 0\.19 line"):
        check_megatron_line(version)


if __name__ == "__main__":
    print(json.dumps(probe()))
