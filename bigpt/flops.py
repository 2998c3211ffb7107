"""Parameter and FLOP counts of a recipe's model, and GPU peak throughput and memory.

One formula shared by the trainer's TFLOP/s / MFU log, the dry run and planning, so they agree.
"""

from dataclasses import dataclass

from bigpt.errors import BigptError
from bigpt.recipe import ModelConfig, Recipe, padded_vocab_size

PEAK_BF16_TFLOPS = {
    "h100 pcie": 756.0,
    "h100 nvl": 835.0,
    "h100": 989.0,
    "h200": 989.0,
    "h800": 989.0,
    "gh200": 989.0,
    "b200": 2250.0,
    "gb200": 2500.0,
    "a100": 312.0,
    "a800": 312.0,
    "l40s": 362.0,
    "mi300x": 1307.0,
}
"""Dense (no sparsity) bf16 tensor-core peak per GPU, by a lower-case fragment of its name."""


def peak_flops_for(device_name: str) -> float | None:
    """Peak bf16 FLOP/s for a ``torch.cuda.get_device_name()`` string, None if not in the table.

    The longest matching fragment wins, so "NVIDIA H100 PCIe" is not read as an SXM H100.
    """
    name = device_name.lower()
    matches = [fragment for fragment in PEAK_BF16_TFLOPS if fragment in name]
    if not matches:
        return None
    return PEAK_BF16_TFLOPS[max(matches, key=len)] * 1e12


@dataclass(frozen=True)
class Gpu:
    """A GPU the planner can plan for."""

    device_name: str
    """As ``torch.cuda.get_device_name()`` reports it; its peak comes from PEAK_BF16_TFLOPS."""
    memory_gib: float
    """Device memory as ``torch.cuda.get_device_properties().total_memory`` reports it."""

    @property
    def peak_flops(self) -> float:
        peak = peak_flops_for(self.device_name)
        assert peak is not None, f"{self.device_name} is in GPUS without its peak in PEAK_BF16_TFLOPS"
        return peak


GPUS = {
    "h100-80gb": Gpu("NVIDIA H100 80GB HBM3", 79.1),
    "h200-141gb": Gpu("NVIDIA H200", 139.8),
    "a100-80gb": Gpu("NVIDIA A100-SXM4-80GB", 79.1),
    "a100-40gb": Gpu("NVIDIA A100-SXM4-40GB", 39.4),
    "b200": Gpu("NVIDIA B200", 178.4),
}
"""The planner's GPUs, by the name ``tools/plan.py --gpu`` takes."""


def gpu_named(name: str) -> Gpu:
    if name not in GPUS:
        raise BigptError(
            f"unknown GPU {name!r}; the planner knows {', '.join(GPUS)} "
            f"(add yours to GPUS in bigpt/flops.py with its peak and memory)."
        )
    return GPUS[name]


def _norm_parameters(model: ModelConfig) -> int:
    return model.hidden_size * (2 if model.normalization == "layernorm" else 1)  # layernorm has a bias


def _attention_widths(model: ModelConfig) -> tuple[int, int]:
    """(query width, key-or-value width) of one layer, over all heads."""
    head = model.kv_channels or model.hidden_size // model.num_attention_heads
    groups = model.num_query_groups or model.num_attention_heads
    return model.num_attention_heads * head, groups * head


def _mlp_input_width(model: ModelConfig) -> int:
    """Output width of the MLP's first matmul: swiglu computes gate and value in one."""
    return model.ffn_hidden_size * (2 if model.activation == "swiglu" else 1)


def _layer_matmul_parameters(model: ModelConfig) -> int:
    """Weights of one layer's matrices: q, k, v, attention output, MLP in, MLP out."""
    query, key_value = _attention_widths(model)
    hidden = model.hidden_size
    return (
        hidden * (query + 2 * key_value)
        + query * hidden
        + hidden * _mlp_input_width(model)
        + model.ffn_hidden_size * hidden
    )


def _layer_parameters(model: ModelConfig) -> int:
    query, key_value = _attention_widths(model)
    qkv_biases = query + 2 * key_value
    other_biases = model.hidden_size + _mlp_input_width(model) + model.hidden_size
    head = query // model.num_attention_heads
    # q/k norms: one weight (and bias, for layernorm) per head width, shared by the heads
    qk_norms = 2 * head * (2 if model.normalization == "layernorm" else 1) if model.qk_layernorm else 0
    return (
        _layer_matmul_parameters(model)
        + 2 * _norm_parameters(model)
        + qk_norms
        + (qkv_biases + other_biases if model.add_bias_linear else qkv_biases if model.add_qkv_bias else 0)
    )


def _input_parameters(model: ModelConfig, vocab: int) -> int:
    """Token embedding, plus the learned position table if used."""
    positions = model.max_position_embeddings or model.seq_length
    learned = positions * model.hidden_size if model.position_embedding == "learned" else 0
    return vocab * model.hidden_size + learned


def num_parameters(model: ModelConfig, padded_vocab: int | None = None) -> int:
    """Trainable parameters: embeddings, layers, final norm, and the output layer unless tied.

    ``padded_vocab`` defaults to the tokenizer's vocab_size (the count of a released model);
    pass ``padded_vocab_size(model, tp)`` for what is actually allocated.
    """
    vocab = padded_vocab or model.vocab_size
    output = 0 if model.tie_embeddings else vocab * model.hidden_size
    return (
        _input_parameters(model, vocab) + model.num_layers * _layer_parameters(model) + _norm_parameters(model) + output
    )


def parameters_per_stage(
    model: ModelConfig, layers_per_stage: tuple[int, ...], padded_vocab: int | None = None
) -> tuple[int, ...]:
    """Parameters held by each pipeline stage (summed over its tensor-parallel shards).

    With tied embeddings and more than one stage, the last stage holds its own copy of the
    embedding for the output layer (Megatron keeps the two in sync), so the stages then sum to
    one embedding more than ``num_parameters``.
    """
    vocab = padded_vocab or model.vocab_size
    stages = [layers * _layer_parameters(model) for layers in layers_per_stage]
    stages[0] += _input_parameters(model, vocab)
    has_output_weights = not model.tie_embeddings or len(stages) > 1
    stages[-1] += _norm_parameters(model) + (vocab * model.hidden_size if has_output_weights else 0)
    return tuple(stages)


def flops_per_token(model: ModelConfig, padded_vocab: int | None = None) -> float:
    """Training FLOPs per token: 3 × forward (the backward pass costs two forwards).

    forward = 2 × (matmul weights: every layer's q, k, v, output and MLP matrices, plus the
                   vocab × hidden output layer, tied or not)
            + 2 × 2 × keys × (heads × head width) per layer, for the scores Q·Kᵀ and the
              score-weighted sum of V, with keys = seq_length (attention_window if shorter).
    The attention term counts every query against all those keys: the causal mask's
    halving is NOT applied, as in Megatron-LM's and PaLM's MFU convention (6N + 12·L·s·h), so
    MFU figures compare with published ones. Embedding lookups, norms, biases, softmax and
    activation functions are not counted.
    """
    vocab = padded_vocab or model.vocab_size
    query, _ = _attention_widths(model)
    matmul_weights = model.num_layers * _layer_matmul_parameters(model) + vocab * model.hidden_size
    keys = min(model.seq_length, model.attention_window or model.seq_length)
    attention = model.num_layers * 2 * 2 * keys * query
    return 3.0 * (2 * matmul_weights + attention)


def flops_per_step(recipe: Recipe, global_batch_size: int) -> float:
    """Training FLOPs of one optimizer step of ``global_batch_size`` sequences (the padded
    vocab at the recipe's tensor-parallel size is what the output layer multiplies by)."""
    vocab = padded_vocab_size(recipe.model, recipe.parallel.tensor)
    return flops_per_token(recipe.model, vocab) * global_batch_size * recipe.model.seq_length
