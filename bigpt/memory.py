"""Memory per GPU of a recipe at a layout, on paper: weights, gradients, optimizer state and the
activations held at the peak of the pipeline schedule. Used by the planner (tools/plan.py).

Activations follow Korthikanti et al. 2022 (arXiv:2205.05198, Table 2), the basis of Megatron-LM's
``theoretical_memory_usage.py``, counted per stored tensor so that the model's own shapes apply.
For a GPT layer (multi-head attention, 4h GeLU MLP, dropout) it gives exactly Megatron's
34·s·b·h/t per layer with sequence parallelism and selective recompute, and (10 + 24/t)·s·b·h
without sequence parallelism (tests/test_plan.py checks both). Where bigpt differs, and why:
- grouped-query attention: K and V are num_query_groups × head wide, not hidden_size;
- SwiGLU keeps three ffn-wide tensors (gate and value, the product), not GeLU's two;
- dropout masks (1 byte an element) only when the recipe's dropout is non-zero (Llama: none);
- attention probabilities (s² per head) only without Transformer Engine and without recompute of
  core_attn: on GPUs bigpt's attention is fused (flash/cuDNN) and never stores them;
- selective recompute drops what its modules keep (recompute.modules): core_attn the scores, mlp
  a dense MLP's inner tensors (and, under Transformer Engine, the output of the norm fused into its
  first linear), moe all an MoE layer keeps but its input, shared_experts its shared experts';
- per-head q/k norms (Qwen3) keep the un-normalised queries and keys;
- multi-latent attention (DeepSeek-V3) keeps its query and key/value latents (sequence-split, as
  its down-projections' outputs are) twice, before and after their norms, and every head's key
  and value, projected up from the shared latent (``attention_head_widths``);
- the output layer's logits are counted on the last stage for any pipeline size (Megatron adds
  them only without pipelining, as it reports the first stage), and token ids (8 bytes a token)
  are left out; Megatron's 5% "overhead" factor is not applied: the planner keeps headroom instead.
Not modelled: the CUDA context, NCCL and Transformer Engine workspaces, allocator fragmentation,
context-parallel exchange buffers and transient all-gather buffers (hence the planner's headroom).
"""

import math
from collections.abc import Collection
from dataclasses import dataclass

from bigpt.flops import (
    GATED_ACTIVATIONS,
    attention_head_widths,
    decoder_seq_length,
    expert_parameters_per_stage,
    mla_down_projection_parameters,
    moe_layers,
    parameters_per_stage,
)
from bigpt.layout import Layout
from bigpt.recipe import Recipe, padded_vocab_size

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ADAM_STATE_BYTES = 8
"""First and second moments, fp32."""
MASTER_WEIGHT_BYTES = 4
"""fp32 copy of bf16/fp16 weights kept by the optimizer."""


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of one pipeline stage at the peak of a step."""

    stage: int
    parameters: int
    """Parameters on one GPU of the stage (its share of the tensor-parallel split)."""
    weights: float
    gradients: float
    """The data-parallel gradient buffer (fp32 with precision.grad_reduce_in_fp32)."""
    optimizer: float
    """Master weights and Adam moments, divided over data parallel by the distributed optimizer."""
    activations: float
    in_flight: int
    """Micro-batches (of one model chunk) whose activations are held at the schedule's peak."""

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def stage_memory(recipe: Recipe, layout: Layout) -> tuple[StageMemory, ...]:
    """Memory of every pipeline stage; the first stage holds the most in-flight micro-batches,
    the last the output layer, so either can be the peak. An MoE model's routed experts are split
    over expert parallelism × expert tensor parallelism, not tensor parallelism, and their
    optimizer state over the expert-data-parallel ranks; Transformer Engine's multi-latent attention
    keeps its down-projections whole on every tensor-parallel rank."""
    vocab = padded_vocab_size(recipe.model, layout.tp)
    stages = parameters_per_stage(recipe.model, layout.layers_per_stage, vocab, layout.vpp)
    experts = expert_parameters_per_stage(recipe.model, layout.layers_per_stage, layout.vpp)
    weight, gradient, optimizer = _bytes_per_parameter(recipe)
    shard = layout.dp if recipe.parallel.distributed_optimizer else 1
    expert_shard = layout.expert_dp if recipe.parallel.distributed_optimizer else 1
    fused = recipe.precision.transformer_engine != "off"
    duplicated = mla_down_projection_parameters(recipe.model) if fused else 0  # per layer, on every TP rank
    result = []
    for stage, (params, routed, layers) in enumerate(zip(stages, experts, layout.layers_per_stage)):
        # Norm weights are replicated over tensor parallel rather than split: <0.01% of a layer.
        whole = duplicated * layers
        dense = (params - routed - whole) // layout.tp + whole
        expert = routed // (layout.ep * layout.etp)
        on_gpu = dense + expert
        in_flight = in_flight_microbatches(layout, stage)
        if recipe.model.family == "encoder_decoder":
            activations = _encoder_decoder_activations(recipe, layout, in_flight)
        else:
            activations = _layer_activations(recipe, layout, layers // layout.vpp, in_flight)
        if stage == layout.pp - 1:
            activations += output_activations(recipe, layout)
        optimizer_bytes = optimizer * (dense / shard + expert / expert_shard)
        result.append(
            StageMemory(stage, on_gpu, on_gpu * weight, on_gpu * gradient, optimizer_bytes, activations, in_flight)
        )
    return tuple(result)


def peak_memory(recipe: Recipe, layout: Layout) -> StageMemory:
    return max(stage_memory(recipe, layout), key=lambda stage: stage.total)


def _bytes_per_parameter(recipe: Recipe) -> tuple[float, float, float]:
    """(weight, gradient, optimizer) bytes per parameter before the distributed optimizer shards
    the last: bf16 weights with fp32 gradients and a sharded optimizer are Megatron's 6 + 12/dp."""
    precision = recipe.precision
    weight = DTYPE_BYTES[precision.dtype]
    gradient = 4 if precision.grad_reduce_in_fp32 else weight
    optimizer: float = ADAM_STATE_BYTES + (MASTER_WEIGHT_BYTES if weight < 4 else 0)
    return weight, gradient, optimizer


def in_flight_microbatches(layout: Layout, stage: int) -> int:
    """Chunk micro-batches whose forward is done and backward is not, at the peak of a step:
    megatron-core's warm-up count plus the one in 1F1B (get_pp_rank_microbatches)."""
    total = layout.num_microbatches * layout.vpp
    if layout.pp == 1:
        return 1
    if layout.vpp == 1:
        warmup = layout.pp - stage - 1
    else:  # interleaved: groups of pp micro-batches per virtual stage
        warmup = (layout.pp - stage - 1) * 2 + (layout.vpp - 1) * layout.pp
    return min(warmup + 1, total)


def layer_activations(recipe: Recipe, layout: Layout, sequence: int | None = None) -> float:
    """Bytes one transformer layer keeps for its backward pass, for one micro-batch of sequences of
    ``sequence`` tokens (default model.seq_length), on one GPU."""
    model = recipe.model
    sequence = sequence or model.seq_length
    tokens = _tokens(recipe, layout, sequence)
    element = DTYPE_BYTES[recipe.precision.dtype]
    head = model.kv_channels or model.hidden_size // model.num_attention_heads
    query = model.num_attention_heads * head
    key_value = (model.num_query_groups or model.num_attention_heads) * head
    recompute = recipe.recompute
    recomputed = set(recompute.modules) if recompute.granularity == "selective" else set()
    unfused = recipe.precision.transformer_engine == "off"
    # Transformer Engine fuses the MLP's norm into its first linear, so recomputing the MLP drops
    # that linear's input (the norm's output) too.
    linear_inputs = 1 if "mlp" in recomputed and not unfused else 2
    # Inputs of the two norms and of the linears after them (QKV, MLP in): split over the
    # tensor-parallel group only with sequence parallelism; so are MLA's latents, each kept as its
    # norm's input and its up-projection's.
    latents = 2 * ((model.mla.q_lora_rank or 0) + (model.mla.kv_lora_rank or 0))
    sequence_split = tokens * (
        (2 + linear_inputs) * element * model.hidden_size
        + element * latents
        + (2 * model.hidden_size if model.hidden_dropout else 0)
    )
    # Q, K, V for attention, its output (the projection's input), the MLP's inner tensors (none
    # when the MLP is recomputed: it keeps only its input). MLA's keys are every head's, as wide as
    # its queries, its values and output v_head_dim a head.
    if model.mla.enabled():
        query_key, value = attention_head_widths(model)
        attention = 2 * query_key + 2 * value
    else:
        attention = 2 * query + 2 * key_value
    mlp_tensors = 0 if "mlp" in recomputed else 3 if model.activation in GATED_ACTIVATIONS else 2
    tensor_split: float = element * tokens * attention
    tensor_split += element * tokens * _mlp_activation_width(recipe, layout, mlp_tensors, recomputed)
    if model.qk_layernorm:  # the per-head q/k norms keep their inputs too
        tensor_split += element * tokens * (query + key_value)
    tensor_split += _unfused_score_bytes(recipe) * model.num_attention_heads * tokens * sequence
    return sequence_split / (layout.tp if layout.sequence_parallel else 1) + tensor_split / layout.tp


def _unfused_score_bytes(recipe: Recipe) -> float:
    """Bytes per attention score that unfused attention keeps (the softmax output, and its dropout
    mask and output); none when Transformer Engine's fused attention recomputes them."""
    recompute = recipe.recompute
    unfused = recipe.precision.transformer_engine == "off"
    if not unfused or (recompute.granularity == "selective" and "core_attn" in recompute.modules):
        return 0
    element = DTYPE_BYTES[recipe.precision.dtype]
    return element + (1 + element if recipe.model.attention_dropout else 0)


def _encoder_decoder_activations(recipe: Recipe, layout: Layout, in_flight: int) -> float:
    """An encoder-decoder's (T5) activations: the encoder's layers at its sequence length, the
    decoder's at its own, and each decoder layer's cross-attention (its norm's and q's inputs, q
    and the attention output per decoder token, keys and values per encoder token, the scores)."""
    model = recipe.model
    encoder, decoder = model.seq_length, decoder_seq_length(recipe)
    depth = model.encoder_decoder.encoder_depth(model.num_layers)
    element = DTYPE_BYTES[recipe.precision.dtype]
    head = model.kv_channels or model.hidden_size // model.num_attention_heads
    query = key_value = model.num_attention_heads * head
    decoder_tokens, encoder_tokens = _tokens(recipe, layout, decoder), _tokens(recipe, layout, encoder)
    inputs = 2 * element * decoder_tokens * model.hidden_size / (layout.tp if layout.sequence_parallel else 1)
    cross: float = element * (2 * query * decoder_tokens + 2 * key_value * encoder_tokens)
    cross += _unfused_score_bytes(recipe) * model.num_attention_heads * decoder_tokens * encoder
    recompute = recipe.recompute
    if recompute.granularity != "full":
        keeping_cross = model.num_layers
    else:  # a recomputed layer keeps its input alone (counted by _layer_activations)
        keeping_cross = 0 if recompute.method == "uniform" else max(0, model.num_layers - recompute.num_layers)
    return (
        _layer_activations(recipe, layout, depth, in_flight, encoder)
        + _layer_activations(recipe, layout, model.num_layers, in_flight, decoder)
        + in_flight * keeping_cross * (inputs + cross / layout.tp)
    )


def _mlp_activation_width(recipe: Recipe, layout: Layout, mlp_tensors: int, recomputed: Collection[str]) -> float:
    """Elements per token the MLP keeps, in tensor-parallel units, averaged over the layers: a
    dense MLP its inner tensors; an MoE layer, for each of the router_topk experts a token is
    dispatched to (balanced: a rank receives as many as it sends), the dispatched input and the
    expert's inner tensors (split over expert tensor parallelism), and the shared experts' (none of
    them when recompute.modules has "moe": the layer keeps its input alone; no shared experts' with
    "shared_experts")."""
    model = recipe.model
    kinds = moe_layers(model)
    dense = mlp_tensors * model.ffn_hidden_size
    if not any(kinds):
        return dense
    moe = model.moe
    expert_width = moe.ffn_hidden_size or model.ffn_hidden_size
    kept = 3 if model.activation in GATED_ACTIVATIONS else 2  # recompute.modules' "mlp" is the dense MLP's alone
    routed = moe.router_topk * (model.hidden_size + kept * expert_width / layout.etp) * layout.tp
    shared = kept * (moe.shared_expert_ffn_hidden_size or 0)
    if "moe" in recomputed:
        routed = shared = 0
    elif "shared_experts" in recomputed:
        shared = 0
    moe_layers_share = sum(kinds) / len(kinds)
    return (1 - moe_layers_share) * dense + moe_layers_share * (routed + shared)


def output_activations(recipe: Recipe, layout: Layout) -> float:
    """The last stage's final norm and output layer inputs (and an encoder's masked-LM head's: its
    dense layer, GELU and norm), plus the fp32 softmax the cross entropy keeps and the logits'
    gradient, for the one micro-batch whose loss is computed."""
    model = recipe.model
    decoder = model.family == "encoder_decoder"  # its output layer reads the decoder's positions
    tokens = _tokens(recipe, layout, decoder_seq_length(recipe) if decoder else None)
    element = DTYPE_BYTES[recipe.precision.dtype]
    kept = 2 + (3 if model.family == "encoder" else 0)
    inputs = kept * element * tokens * model.hidden_size / (layout.tp if layout.sequence_parallel else 1)
    vocab = padded_vocab_size(model, layout.tp)
    return inputs + (4 + element) * tokens * vocab / layout.tp


def _layer_activations(
    recipe: Recipe, layout: Layout, chunk_layers: int, in_flight: int, sequence: int | None = None
) -> float:
    """Activations of one stage: in_flight micro-batches of a chunk of chunk_layers layers (of
    sequences of ``sequence`` tokens, default model.seq_length)."""
    full = layer_activations(recipe, layout, sequence)
    recompute = recipe.recompute
    if recompute.granularity != "full":
        return in_flight * chunk_layers * full
    layer_input = (
        DTYPE_BYTES[recipe.precision.dtype]
        * _tokens(recipe, layout, sequence)
        * recipe.model.hidden_size
        / (layout.tp if layout.sequence_parallel else 1)
    )
    if recompute.method == "block":  # the first num_layers layers of a chunk keep only their input
        checkpointed = min(recompute.num_layers, chunk_layers)
        return in_flight * (checkpointed * layer_input + (chunk_layers - checkpointed) * full)
    # uniform: groups of num_layers layers keep their input; one group is rebuilt at a time
    groups = math.ceil(chunk_layers / recompute.num_layers)
    return in_flight * groups * layer_input + min(recompute.num_layers, chunk_layers) * full


def _tokens(recipe: Recipe, layout: Layout, sequence: int | None = None) -> int:
    """Tokens of one micro-batch of sequences of ``sequence`` tokens (default model.seq_length) on
    one GPU (context parallelism splits the sequence)."""
    return layout.micro_batch_size * (sequence or recipe.model.seq_length) // layout.cp
