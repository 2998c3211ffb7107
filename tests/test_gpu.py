"""On a GPU: megatron-core's local layers in bf16, Transformer Engine layers and FP8 train like
the reference (fp32 local layers, bf16 local layers, bf16).

Marked ``gpu``: skipped (with the reason) where torch sees no CUDA device, as on CI; run on a GPU
machine with ``pytest -m gpu``. Each run is the tiny mock recipe, as a user launches it.
"""

import pytest
import torch

from multirank import MOCK_RECIPE, run_bigpt, scalars

pytestmark = pytest.mark.gpu

STEPS = 10
COMMON = [
    f"train.train_iters={STEPS}",
    f"schedule.decay_iters={STEPS}",
    "logging.interval=1",
    "model.hidden_size=128",
    "model.ffn_hidden_size=384",
    "model.seq_length=128",
]


def _losses(tmp_path, name: str, *overrides: str, nproc: int = 1) -> list[float]:
    run_dir = tmp_path / name
    run_bigpt(MOCK_RECIPE, *COMMON, f"run_dir={run_dir}", *overrides, nproc=nproc)
    losses = scalars(run_dir, "train/loss")
    assert len(losses) == STEPS
    return losses


def _close(ours: list[float], reference: list[float], rel: float) -> None:
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours, reference))
    assert worst <= rel, f"losses differ by rel {worst:.3g} (> {rel}): {ours} vs {reference}"


@pytest.fixture(scope="module")
def transformer_engine():
    pytest.importorskip(
        "transformer_engine.pytorch", reason="Transformer Engine is not installed (pip install -e .[gpu])"
    )


def test_local_layers_train_in_bf16_like_fp32(tmp_path):
    """The path of a GPU run without Transformer Engine: megatron-core's local spec with the
    fusions bigpt enables on a GPU (none of Apex's where Apex is not installed)."""
    fp32 = _losses(tmp_path, "fp32", "precision.dtype=fp32", "precision.transformer_engine=off")
    bf16 = _losses(tmp_path, "bf16", "precision.dtype=bf16", "precision.transformer_engine=off")
    _close(bf16, fp32, rel=3e-2)


def test_transformer_engine_layers_train_like_the_local_layers(transformer_engine, tmp_path):
    local = _losses(tmp_path, "local", "precision.dtype=bf16", "precision.transformer_engine=off")
    te = _losses(tmp_path, "te", "precision.dtype=bf16", "precision.transformer_engine=on")
    _close(te, local, rel=2e-2)


def test_fp8_trains_like_bf16(transformer_engine, tmp_path):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell)")
    bf16 = _losses(tmp_path, "bf16", "precision.dtype=bf16", "precision.transformer_engine=on")
    fp8 = _losses(
        tmp_path, "fp8", "precision.dtype=bf16", "precision.transformer_engine=on", "precision.fp8=tensorwise"
    )
    _close(fp8, bf16, rel=5e-2)


def test_tensor_and_pipeline_parallel_on_gpus_match_one_gpu(tmp_path):
    if torch.cuda.device_count() < 4:
        pytest.skip(f"needs 4 GPUs, this machine has {torch.cuda.device_count()}")
    one = _losses(tmp_path, "one", "precision.dtype=fp32")
    split = _losses(tmp_path, "tp2pp2", "precision.dtype=fp32", "parallel.tensor=2", "parallel.pipeline=2", nproc=4)
    _close(split, one, rel=1e-4)
