"""Parameter counts against released models, the FLOP formula, peak lookup, the Throughput callback's
TFLOP/s and MFU."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from bigpt.flops import (
    attended_keys,
    flops_per_step,
    flops_per_token,
    num_parameters,
    parameters_per_stage,
    peak_flops_per_second,
)
from bigpt.recipe import ModelConfig, load_recipe, padded_vocab_size
from bigpt.train import callbacks

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def llama3(**shape) -> ModelConfig:
    return ModelConfig(vocab_size=128256, num_query_groups=8, seq_length=8192, **shape)


LLAMA3_8B = llama3(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32)
LLAMA3_70B = llama3(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64)
LLAMA32_1B = llama3(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, tie_embeddings=True)


@pytest.mark.parametrize(
    "model, expected",
    [
        (LLAMA3_8B, 8_030_261_248),
        (LLAMA3_70B, 70_553_706_496),
        (LLAMA32_1B, 1_235_814_400),
    ],
)
def test_parameter_count_matches_released_models(model, expected):
    assert num_parameters(model) == expected


def test_bias_layernorm_and_learned_positions_are_counted():
    base = ModelConfig(
        num_layers=1,
        hidden_size=8,
        ffn_hidden_size=16,
        num_attention_heads=2,
        seq_length=4,
        vocab_size=10,
        activation="gelu",
        tie_embeddings=True,
    )
    plain = num_parameters(base)
    assert plain == 10 * 8 + (8 * 24 + 8 * 8 + 8 * 16 + 16 * 8 + 2 * 8) + 8
    biased = ModelConfig(
        **{**vars(base), "add_bias_linear": True, "normalization": "layernorm", "position_embedding": "learned"}
    )
    assert num_parameters(biased) == plain + (24 + 8 + 16 + 8) + 3 * 8 + 4 * 8


def test_pipeline_stages_sum_to_the_total():
    vocab = padded_vocab_size(LLAMA3_70B, 8)
    stages = parameters_per_stage(LLAMA3_70B, (20, 20, 20, 20), vocab)
    assert sum(stages) == num_parameters(LLAMA3_70B, vocab)
    assert stages[0] > stages[1] == stages[2] < stages[3]
    # Tied embeddings: the last stage keeps its own copy for the output layer.
    tied = parameters_per_stage(LLAMA32_1B, (8, 8))
    assert sum(tied) == num_parameters(LLAMA32_1B) + 128256 * 2048


def test_padded_vocab():
    assert padded_vocab_size(LLAMA3_8B, 1) == 128256
    assert padded_vocab_size(LLAMA3_8B, 8) == 129024


def test_flops_per_token_is_six_n_plus_the_causal_attention_term():
    model = LLAMA3_8B
    matmul_weights = num_parameters(model) - 128256 * 4096 - (2 * 32 + 1) * 4096  # no lookup, no norms
    attention = 32 * 4 * (8192 / 2) * 4096  # per layer: 2 matmuls × 2 FLOPs × s/2 keys (causal) × q width
    assert flops_per_token(model) == 6 * matmul_weights + 3 * attention


def llama3_8b_flops_per_token_by_hand() -> float:
    """recipes/llama3_8b.toml written out: h 4096, 32 layers, 32 heads of 128, 8 KV groups, SwiGLU
    ffn 14336, vocab 128256 (a multiple of 128 × TP 2: no padding), 8192 tokens; Megatron-LM's
    num_floating_point_operations (core_r0.19.0) with the causal mask halving the scores."""
    h, layers, ffn, kv, vocab, s = 4096, 32, 14336, 8 * 128, 128256, 8192
    qkv, proj, mlp = h * (h + 2 * kv), h * h, 3 * h * ffn
    projections = 3 * 2 * layers * (qkv + proj + mlp)  # forward + 2 backward, 2 FLOPs a multiply-add
    scores = 3 * 2 * layers * h * s / 2 * 2  # Q·Kᵀ and scores·V over s/2 keys on average
    logits = 3 * 2 * h * vocab
    return projections + scores + logits


def test_llama3_8b_recipe_flops_per_token_match_a_hand_computation():
    recipe = load_recipe(RECIPES / "llama3_8b.toml")
    by_hand = llama3_8b_flops_per_token_by_hand()
    assert round(by_hand / 1e9, 1) == 51.5  # not PaLM's unhalved 57.9
    assert flops_per_step(recipe, 1) / recipe.model.seq_length == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize("seq_length, window", [(8192, 4096), (4096, 4096), (4096, 1000), (4096, None), (512, 4096)])
def test_attended_keys_are_the_causal_sliding_window_mask_per_query(seq_length, window):
    """Megatron's window (window - 1 before, none after): query i sees min(i + 1, window) keys."""
    model = ModelConfig(**{**vars(LLAMA3_8B), "seq_length": seq_length, "attention_window": window})
    counted = sum(min(i + 1, window or seq_length) for i in range(seq_length)) / seq_length
    assert attended_keys(model) == pytest.approx(counted, rel=2e-3)


def test_a_sliding_window_shorter_than_the_sequence_bounds_the_attention_term():
    windowed = ModelConfig(**{**vars(LLAMA3_8B), "attention_window": 4096})  # half of seq_length 8192
    # keys per query: s/2 = 4096 without the window, w - w²/2s = 3072 with it
    assert flops_per_token(LLAMA3_8B) - flops_per_token(windowed) == 3 * 32 * 4 * 1024 * 4096
    assert flops_per_token(ModelConfig(**{**vars(LLAMA3_8B), "attention_window": 16384})) == flops_per_token(LLAMA3_8B)


def test_flops_per_step_scales_with_tokens():
    recipe = load_recipe(RECIPES / "llama3_8b.toml")
    expected = flops_per_token(recipe.model) * 128 * 8192
    assert flops_per_step(recipe, 128) == pytest.approx(expected)


@pytest.mark.parametrize(
    "name, bf16_tflops, fp8_tflops",
    [  # NVIDIA datasheets' dense figures (half the "with sparsity" ones)
        ("NVIDIA H100 80GB HBM3", 989.0, 1979.0),
        ("NVIDIA H100 PCIe", 756.0, 1513.0),
        ("NVIDIA H100 NVL", 835.0, 1671.0),
        ("NVIDIA H200", 989.0, 1979.0),
        ("NVIDIA H200 NVL", 835.0, 1671.0),
        ("NVIDIA H800 PCIe", 756.0, 1513.0),
        ("NVIDIA GH200 480GB", 989.0, 1979.0),
        ("NVIDIA B200", 2250.0, 4500.0),
        ("NVIDIA GB200", 2500.0, 5000.0),
        ("NVIDIA A100-SXM4-80GB", 312.0, None),
        ("NVIDIA L40S", 362.0, 733.0),
    ],
)
def test_peak_flops_per_second_for_device_names(name, bf16_tflops, fp8_tflops):
    assert peak_flops_per_second(name) == bf16_tflops * 1e12
    assert peak_flops_per_second(name, fp8=True) == (fp8_tflops and fp8_tflops * 1e12)


def test_unknown_device_has_no_peak():
    assert peak_flops_per_second("Tesla T4") is None


@pytest.mark.parametrize(
    "device, overrides, peak_tflops",
    [
        ("NVIDIA H100 80GB HBM3", [], 989.0),
        ("NVIDIA H200 NVL", [], 835.0),
        ("NVIDIA H100 80GB HBM3", ['precision.fp8="tensorwise"'], 1979.0),  # FP8 matmuls: the FP8 peak
    ],
)
def test_throughput_logs_tflops_and_mfu_of_one_step(monkeypatch, device, overrides, peak_tflops):
    """The Throughput callback as the trainer runs it, for one 10 s step of llama3_8b on 8 GPUs."""
    monkeypatch.setattr(callbacks, "on_gpu", lambda: True)
    monkeypatch.setattr(callbacks.torch.cuda, "get_device_name", lambda *device_index: device)
    monkeypatch.setattr(callbacks, "memory_gib", lambda: 0.0)
    trainer = SimpleNamespace(
        recipe=load_recipe(RECIPES / "llama3_8b.toml", overrides), layout=SimpleNamespace(world_size=8)
    )
    throughput = callbacks.Throughput()
    throughput.on_start(trainer)
    metrics = {"step_time": 10.0, "global_batch_size": 128}
    throughput.on_step(trainer, metrics)
    tokens = 128 * 8192
    tflops_per_device = llama3_8b_flops_per_token_by_hand() * tokens / 10.0 / 8 / 1e12
    assert metrics["mfu"] == pytest.approx(metrics["tflops"] / peak_tflops, rel=1e-12)  # TFLOP/s over TFLOP/s
    assert metrics["tokens_per_s"] == tokens / 10.0
    assert metrics["tflops"] == pytest.approx(tflops_per_device, rel=1e-12)  # ≈ 674.6
    assert metrics["mfu"] == pytest.approx(tflops_per_device / peak_tflops, rel=1e-12)
