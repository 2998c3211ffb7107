"""Parameter counts against released models, the FLOP formula, peak lookup."""

from pathlib import Path

import pytest

from bigpt.flops import flops_per_step, flops_per_token, num_parameters, parameters_per_stage, peak_flops_for
from bigpt.recipe import ModelConfig, load_recipe, padded_vocab_size


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


def test_flops_per_token_is_six_n_plus_attention():
    model = LLAMA3_8B
    matmul_weights = num_parameters(model) - 128256 * 4096 - (2 * 32 + 1) * 4096  # no lookup, no norms
    attention = 32 * 4 * 8192 * 4096
    assert flops_per_token(model) == 6 * matmul_weights + 3 * attention


def test_a_sliding_window_shorter_than_the_sequence_bounds_the_attention_term():
    windowed = ModelConfig(**{**vars(LLAMA3_8B), "attention_window": 4096})  # half of seq_length 8192
    assert flops_per_token(LLAMA3_8B) - flops_per_token(windowed) == 3 * 32 * 4 * 4096 * 4096
    assert flops_per_token(ModelConfig(**{**vars(LLAMA3_8B), "attention_window": 16384})) == flops_per_token(LLAMA3_8B)


def test_flops_per_step_scales_with_tokens():
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes/llama3_8b.toml")
    expected = flops_per_token(recipe.model) * 128 * 8192
    assert flops_per_step(recipe, 128) == pytest.approx(expected)


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GB200", 2500.0),
    ],
)
def test_peak_flops_for_device_names(name, tflops):
    assert peak_flops_for(name) == tflops * 1e12


def test_unknown_device_has_no_peak():
    assert peak_flops_for("Tesla T4") is None
