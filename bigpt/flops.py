"""Parameter and FLOP counts of a recipe's model, and GPU peak throughput and memory.

One formula shared by the trainer's TFLOP/s / MFU log, the dry run and planning, so they agree.
Units are in the names: ``*_flops`` are FLOPs, ``*_flops_per_second`` FLOP/s, ``*_tflops`` TFLOP/s.
"""

from dataclasses import dataclass

from bigpt.errors import BigptError
from bigpt.layout import Layout
from bigpt.recipe import ModelConfig, Recipe, padded_vocab_size


@dataclass(frozen=True)
class PeakTflops:
    """Dense (no sparsity) tensor-core peak of one GPU, in TFLOP/s, as its datasheet gives it."""

    bf16: float
    fp8: float | None
    """None: the GPU has no FP8 tensor cores (A100)."""


PEAK_TFLOPS = {
    "h100": PeakTflops(989.0, 1979.0),  # SXM
    "h100 pcie": PeakTflops(756.0, 1513.0),
    "h100 nvl": PeakTflops(835.0, 1671.0),
    "h200": PeakTflops(989.0, 1979.0),  # SXM
    "h200 nvl": PeakTflops(835.0, 1671.0),
    "h800": PeakTflops(989.0, 1979.0),  # SXM
    "h800 pcie": PeakTflops(756.0, 1513.0),
    "gh200": PeakTflops(989.0, 1979.0),
    "b200": PeakTflops(2250.0, 4500.0),
    "gb200": PeakTflops(2500.0, 5000.0),
    "a100": PeakTflops(312.0, None),
    "a800": PeakTflops(312.0, None),
    "l40s": PeakTflops(362.0, 733.0),
    "mi300x": PeakTflops(1307.0, 2615.0),
}
"""Peaks by a lower-case fragment of ``torch.cuda.get_device_name()``; the longest matching
fragment wins, so every variant with another peak (PCIe, NVL) needs its own entry. NVIDIA's
datasheets print sparse figures for FP8/BF16: the dense peak is half of them."""


def peak_flops_per_second(device_name: str, *, fp8: bool = False) -> float | None:
    """Dense peak FLOP/s (not TFLOP/s) of a ``torch.cuda.get_device_name()`` string for bf16
    matmuls, or FP8 ones with ``fp8``; None if the GPU is not in PEAK_TFLOPS or has no FP8."""
    name = device_name.lower()
    matches = [fragment for fragment in PEAK_TFLOPS if fragment in name]
    if not matches:
        return None
    peak = PEAK_TFLOPS[max(matches, key=len)]
    tflops = peak.fp8 if fp8 else peak.bf16
    return None if tflops is None else tflops * 1e12


def mfu_peak_flops_per_second(recipe: Recipe, device_name: str) -> float | None:
    """The peak MFU is measured against: the FP8 peak when precision.fp8 is on (the matmuls run
    in FP8, so the bf16 peak would flatter it by 2×), the bf16 peak otherwise."""
    return peak_flops_per_second(device_name, fp8=recipe.precision.fp8 != "none")


@dataclass(frozen=True)
class Gpu:
    """A GPU the planner can plan for."""

    device_name: str
    """As ``torch.cuda.get_device_name()`` reports it; its peak comes from PEAK_TFLOPS."""
    memory_gib: float
    """Device memory as ``torch.cuda.get_device_properties().total_memory`` reports it."""

    def peak_flops_per_second(self, recipe: Recipe) -> float:
        """The peak the recipe's MFU is measured against (see mfu_peak_flops_per_second)."""
        peak = mfu_peak_flops_per_second(recipe, self.device_name)
        if peak is None:
            raise BigptError(
                f"precision.fp8={recipe.precision.fp8!r} in {recipe.where('precision.fp8')} needs FP8 tensor cores, "
                f'which {self.device_name} does not have; plan for another GPU or set precision.fp8 = "none".'
            )
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


GATED_ACTIVATIONS = ("swiglu", "geglu")
"""model.activation values whose MLP has a gate: three matrices instead of two."""


def _mlp_input_width(model: ModelConfig, ffn_width: int | None = None) -> int:
    """Output width of the MLP's first matmul: a gated MLP computes gate and value in one."""
    return (ffn_width or model.ffn_hidden_size) * (2 if model.activation in GATED_ACTIVATIONS else 1)


def _mlp_matmul_parameters(model: ModelConfig, ffn_width: int) -> int:
    """Weights of one MLP (or one expert) of inner width ``ffn_width``: its input and output matrices."""
    return model.hidden_size * _mlp_input_width(model, ffn_width) + ffn_width * model.hidden_size


def attention_head_widths(model: ModelConfig) -> tuple[int, int]:
    """(query-key width, value width) of one layer over all query heads: what the scores Q·Kᵀ and
    the score-weighted sum of V contract over. Multi-latent attention's heads are qk_head_dim wide
    plus the rotary qk_pos_emb_head_dim, its values v_head_dim."""
    if model.mla.enabled():
        mla, heads = model.mla, model.num_attention_heads
        return heads * (mla.qk_head_dim + mla.qk_pos_emb_head_dim), heads * mla.v_head_dim
    query, _ = _attention_widths(model)
    return query, query


def mla_down_projection_parameters(model: ModelConfig) -> int:
    """Weights of one layer's multi-latent attention projections from the hidden state down to its
    latents (and the rotary key part): Transformer Engine's MLA holds them whole on every
    tensor-parallel rank (megatron-core's TELinear, "duplicated"); 0 without MLA."""
    mla = model.mla
    if not mla.enabled():
        return 0
    return model.hidden_size * ((mla.q_lora_rank or 0) + (mla.kv_lora_rank or 0) + mla.qk_pos_emb_head_dim)


def _attention_matmul_parameters(model: ModelConfig) -> int:
    """Weights of one layer's q, k, v and attention output matrices; multi-latent attention's
    (megatron-core's MLA, as DeepSeek-V2/V3): queries through the q_lora_rank latent (or straight
    from the hidden state without one), the kv_lora_rank latent with the rotary key part shared by
    all heads, every head's key and value projected up from that latent, and the output."""
    if not model.mla.enabled():
        query, key_value = _attention_widths(model)
        return model.hidden_size * (query + 2 * key_value) + query * model.hidden_size
    mla, hidden, heads = model.mla, model.hidden_size, model.num_attention_heads
    query_key, value = attention_head_widths(model)
    queries = mla.q_lora_rank * (hidden + query_key) if mla.q_lora_rank else hidden * query_key
    assert mla.kv_lora_rank is not None  # mla.enabled()
    latent = hidden * (mla.kv_lora_rank + mla.qk_pos_emb_head_dim)
    keys_values = mla.kv_lora_rank * heads * (mla.qk_head_dim + mla.v_head_dim)
    return queries + latent + keys_values + value * hidden


def moe_layers(model: ModelConfig) -> list[bool]:
    """Per layer: whether its MLP is a Mixture-of-Experts layer ([model.moe]'s layer pattern)."""
    if model.family != "moe_decoder":
        return [False] * model.num_layers
    return [bool(kind) for kind in model.moe.layers(model.num_layers)]


def _routed_expert_parameters(model: ModelConfig, experts: int) -> int:
    """Weights of ``experts`` routed experts of one MoE layer (split over expert parallelism)."""
    return experts * _mlp_matmul_parameters(model, model.moe.ffn_hidden_size or model.ffn_hidden_size)


def _moe_shared_parameters(model: ModelConfig) -> int:
    """Weights of one MoE layer outside its routed experts: the router, the shared experts and their gate."""
    moe, hidden = model.moe, model.hidden_size
    shared = (
        _mlp_matmul_parameters(model, moe.shared_expert_ffn_hidden_size) if moe.shared_expert_ffn_hidden_size else 0
    )
    return hidden * (moe.num_experts or 0) + shared + (hidden if moe.shared_expert_gate else 0)


def _layer_matmul_parameters(model: ModelConfig, moe: bool = False, *, active: bool = False) -> int:
    """Weights of one layer's matrices: q, k, v, attention output, and the MLP, or an MoE layer's
    router, shared experts and routed experts (all of them, or with ``active`` the router_topk
    that one token passes)."""
    if not moe:
        return _attention_matmul_parameters(model) + _mlp_matmul_parameters(model, model.ffn_hidden_size)
    experts = model.moe.router_topk if active else model.moe.num_experts or 0
    return (
        _attention_matmul_parameters(model) + _moe_shared_parameters(model) + _routed_expert_parameters(model, experts)
    )


def _layer_parameters(model: ModelConfig, moe: bool = False, *, active: bool = False) -> int:
    query, key_value = _attention_widths(model)
    qkv_biases = query + 2 * key_value
    other_biases = model.hidden_size + _mlp_input_width(model) + model.hidden_size  # MoE refuses add_bias_linear
    head = query // model.num_attention_heads
    per_element = 2 if model.normalization == "layernorm" else 1
    # q/k norms: one weight (and bias, for layernorm) per head width, shared by the heads; MLA's
    # norms: one over each latent
    if model.mla.enabled():
        qk_norms = per_element * ((model.mla.q_lora_rank or 0) + (model.mla.kv_lora_rank or 0))
    else:
        qk_norms = 2 * head * per_element if model.qk_layernorm else 0
    return (
        _layer_matmul_parameters(model, moe, active=active)
        + 2 * _norm_parameters(model)
        + qk_norms
        + (qkv_biases + other_biases if model.add_bias_linear else qkv_biases if model.add_qkv_bias else 0)
    )


def _cross_attention_parameters(model: ModelConfig) -> int:
    """A decoder layer's cross-attention (T5): its q, k, v and output matrices, their biases, and its norm."""
    query, key_value = _attention_widths(model)
    qkv_biases = query + 2 * key_value
    biases = qkv_biases + model.hidden_size if model.add_bias_linear else qkv_biases if model.add_qkv_bias else 0
    return _attention_matmul_parameters(model) + biases + _norm_parameters(model)


def _layers_parameters(model: ModelConfig, *, active: bool = False) -> int:
    """Every transformer layer's parameters; an encoder-decoder's two stacks (T5): the encoder's
    layers and its final norm, the decoder's layers with their cross-attention, and each stack's
    relative position bias table, buckets × heads (the decoder's final norm is the head's)."""
    if model.family != "encoder_decoder":
        return sum(_layer_parameters(model, moe, active=active) for moe in moe_layers(model))
    table = model.encoder_decoder
    encoder = table.encoder_depth(model.num_layers) * _layer_parameters(model) + _norm_parameters(model)
    decoder = model.num_layers * (_layer_parameters(model) + _cross_attention_parameters(model))
    return encoder + decoder + 2 * table.relative_attention_num_buckets * model.num_attention_heads


def _input_parameters(model: ModelConfig, vocab: int) -> int:
    """Token embedding, plus the learned position table if used, and an encoder's token types."""
    positions = model.max_position_embeddings or model.seq_length
    learned = positions * model.hidden_size if model.position_embedding == "learned" else 0
    token_types = model.encoder.token_types * model.hidden_size if model.family == "encoder" else 0
    return vocab * model.hidden_size + learned + token_types


def _head_parameters(model: ModelConfig, vocab: int, *, output_weights: bool) -> int:
    """After the last layer: the final norm, an encoder's masked-LM head (a dense layer with its
    bias, a layer norm, and the output layer's bias per vocabulary entry), and the output layer's
    weights when ``output_weights``."""
    hidden = model.hidden_size
    masked_lm_head = hidden * hidden + hidden + 2 * hidden + vocab if model.family == "encoder" else 0
    return _norm_parameters(model) + masked_lm_head + (vocab * hidden if output_weights else 0)


def num_parameters(model: ModelConfig, padded_vocab: int | None = None, *, active: bool = False) -> int:
    """Trainable parameters: embeddings, layers, final norm, and the output layer unless tied;
    with ``active``, an MoE model's parameters that one token passes (its router_topk experts).

    ``padded_vocab`` defaults to the tokenizer's vocab_size (the count of a released model);
    pass ``padded_vocab_size(model, tp)`` for what is actually allocated.
    """
    vocab = padded_vocab or model.vocab_size
    head = _head_parameters(model, vocab, output_weights=not model.tie_embeddings)
    return _input_parameters(model, vocab) + _layers_parameters(model, active=active) + head


def stage_layer_kinds(model: ModelConfig, layers_per_stage: tuple[int, ...], vpp: int) -> list[list[bool]]:
    """Per pipeline stage, whether each of its layers is MoE: megatron-core gives model chunk v of
    stage r the (v × stages + r)-th slice of the layers (interleaving), each stage's layers split
    evenly over its vpp chunks."""
    kinds = moe_layers(model)
    stages: list[list[bool]] = [[] for _ in layers_per_stage]
    first = 0
    for _ in range(vpp):
        for stage, layers in enumerate(layers_per_stage):
            stages[stage] += kinds[first : first + layers // vpp]
            first += layers // vpp
    return stages


def parameters_per_stage(
    model: ModelConfig, layers_per_stage: tuple[int, ...], padded_vocab: int | None = None, vpp: int = 1
) -> tuple[int, ...]:
    """Parameters held by each pipeline stage (summed over its tensor- and expert-parallel shards).

    With tied embeddings and more than one stage, the last stage holds its own copy of the
    embedding for the output layer (Megatron keeps the two in sync), so the stages then sum to
    one embedding more than ``num_parameters``.
    """
    vocab = padded_vocab or model.vocab_size
    if model.family == "encoder_decoder":  # one stage: its pipeline parallelism is refused (bigpt.layout)
        stages = [_layers_parameters(model)]
    else:
        stages = [
            sum(_layer_parameters(model, moe) for moe in kinds)
            for kinds in stage_layer_kinds(model, layers_per_stage, vpp)
        ]
    stages[0] += _input_parameters(model, vocab)
    stages[-1] += _head_parameters(model, vocab, output_weights=not model.tie_embeddings or len(stages) > 1)
    return tuple(stages)


def expert_parameters_per_stage(model: ModelConfig, layers_per_stage: tuple[int, ...], vpp: int = 1) -> tuple[int, ...]:
    """The routed experts' share of ``parameters_per_stage``: split over expert parallelism × expert
    tensor parallelism (not tensor parallelism), their optimizer state over the expert-data-parallel ranks."""
    routed = _routed_expert_parameters(model, model.moe.num_experts or 0) if model.family == "moe_decoder" else 0
    return tuple(routed * sum(kinds) for kinds in stage_layer_kinds(model, layers_per_stage, vpp))


def attended_keys(model: ModelConfig) -> float:
    """Keys an average query attends to under the causal mask, bounded by the sliding window w:
    the mask's area over s queries, s/2 for full attention, w - w²/2s for a window w < s; all s
    in an encoder, which attends both ways."""
    s = model.seq_length
    if model.family == "encoder":
        return s
    window = min(s, model.attention_window or s)
    return window - window * window / (2 * s)


def attention_counted(model: ModelConfig) -> str:
    """How the FLOP count takes the attention scores (attended_keys), in the plans' words."""
    if model.family == "encoder_decoder":
        return "encoder and cross-attention all keys, decoder self-attention halved"
    return "bidirectional attention, all keys" if model.family == "encoder" else "causal attention halved"


def _attention_core_forward_flops(model: ModelConfig) -> float:
    """Forward FLOPs per token of one layer's scores Q·Kᵀ and score-weighted sum of V."""
    return 2 * attended_keys(model) * sum(attention_head_widths(model))


def _layer_forward_flops(model: ModelConfig, moe: bool = False) -> float:
    """Forward FLOPs per token of one transformer layer: the matmuls the token passes (an MoE
    layer's router, shared experts and router_topk experts) and the attention core."""
    return 2 * _layer_matmul_parameters(model, moe, active=True) + _attention_core_forward_flops(model)


def flops_per_token(model: ModelConfig, padded_vocab: int | None = None) -> float:
    """Model FLOPs per token of training: 3 × forward (the backward pass costs two forwards).

    forward = 2 × (matmul weights: every layer's q, k, v, output and MLP matrices, or an MoE
                   layer's router, shared experts and the router_topk experts a token passes,
                   plus the vocab × hidden output layer, tied or not, and an encoder's
                   hidden × hidden masked-LM head before it, at every position)
            + 2 × keys × (heads × head width) per layer for the scores Q·Kᵀ, and as much for the
              score-weighted sum of V (multi-latent attention: heads × (qk_head_dim +
              qk_pos_emb_head_dim) and heads × v_head_dim, attention_head_widths), with keys =
              attended_keys: the causal mask halves them (s/2), a sliding window bounds them, an
              encoder attends to all s.
    This is Megatron-LM's num_floating_point_operations (core_r0.19.0) and Megatron-Bridge's
    convention, halved causal term included (Llama-3-8B at 8192 tokens: 51.5 GFLOP/token, not
    PaLM's unhalved 57.9); they ignore a sliding window, bigpt counts only the keys it attends
    to. Embedding lookups, norms, biases, softmax and activation functions are not counted, nor
    is recomputation (recompute_flops_per_step): MFU counts the model's FLOPs only.
    """
    vocab = padded_vocab or model.vocab_size
    layers = sum(_layer_forward_flops(model, moe) for moe in moe_layers(model))
    masked_lm_head = model.hidden_size**2 if model.family == "encoder" else 0  # its dense layer
    return 3.0 * (layers + 2 * (masked_lm_head + vocab * model.hidden_size))


def decoder_seq_length(recipe: Recipe) -> int:
    """An encoder-decoder's decoder positions per sample: as many as span corruption of an encoder
    input of model.seq_length can need ([data.span_corruption])."""
    return recipe.data.span_corruption.decoder_seq_length(recipe.model.seq_length)


def encoder_decoder_flops_per_sample(model: ModelConfig, padded_vocab: int, decoder_tokens: int) -> float:
    """Training FLOPs of one sample of an encoder-decoder (T5), 3 × forward, as flops_per_token
    counts: the encoder's layers at each of its s_e = seq_length tokens (attending to all s_e);
    the decoder's at each of its s_d tokens, with their cross-attention's q and output matrices,
    its causal self-attention halved (s_d/2 keys) and cross-attention scores over all s_e encoder
    outputs, whose keys and values each decoder layer projects once per sample; the output layer
    at each decoder token."""
    encoder_tokens = model.seq_length
    query, key_value = _attention_widths(model)
    hidden = model.hidden_size
    layer = 2 * _layer_matmul_parameters(model)
    encoder = encoder_tokens * (layer + 2 * 2 * encoder_tokens * query)
    cross = 2 * 2 * hidden * query + 2 * 2 * encoder_tokens * query
    decoder = decoder_tokens * (layer + 2 * 2 * (decoder_tokens / 2) * query + cross)
    cross_keys_values = 2 * hidden * 2 * key_value * encoder_tokens
    output = decoder_tokens * 2 * padded_vocab * hidden
    depth = model.encoder_decoder.encoder_depth(model.num_layers)
    return 3.0 * (depth * encoder + model.num_layers * (decoder + cross_keys_values) + output)


def flops_per_step(recipe: Recipe, global_batch_size: int) -> float:
    """Training FLOPs of one optimizer step of ``global_batch_size`` sequences (the padded
    vocab at the recipe's tensor-parallel size is what the output layer multiplies by)."""
    vocab = padded_vocab_size(recipe.model, recipe.parallel.tensor)
    if recipe.model.family == "encoder_decoder":
        return encoder_decoder_flops_per_sample(recipe.model, vocab, decoder_seq_length(recipe)) * global_batch_size
    return flops_per_token(recipe.model, vocab) * global_batch_size * recipe.model.seq_length


def _encoder_decoder_recompute_flops_per_sample(recipe: Recipe) -> float:
    """recompute_flops_per_step's count for one sample of an encoder-decoder (T5), as
    encoder_decoder_flops_per_sample counts its forward: full recomputation re-runs layers of each
    stack (all, or with method block the first num_layers of each); selective its attention cores
    (core_attn: self- and cross-attention's) or MLPs, at each stack's length."""
    model, recompute = recipe.model, recipe.recompute
    encoder_tokens, decoder_tokens = model.seq_length, decoder_seq_length(recipe)
    encoder_layers, decoder_layers = model.encoder_decoder.encoder_depth(model.num_layers), model.num_layers
    query, key_value = _attention_widths(model)
    encoder_core = encoder_tokens * 2 * 2 * encoder_tokens * query
    decoder_core = decoder_tokens * 2 * 2 * (decoder_tokens / 2 + encoder_tokens) * query
    if recompute.granularity == "full":
        if recompute.method == "block":
            encoder_layers = min(recompute.num_layers, encoder_layers)
            decoder_layers = min(recompute.num_layers, decoder_layers)
        layer = 2 * _layer_matmul_parameters(model)
        cross = 2 * 2 * model.hidden_size * (query * decoder_tokens + key_value * encoder_tokens)
        return encoder_layers * (encoder_tokens * layer + encoder_core) + decoder_layers * (
            decoder_tokens * layer + cross + decoder_core
        )
    if recompute.granularity != "selective":
        return 0
    mlp = 2 * _mlp_matmul_parameters(model, model.ffn_hidden_size)
    mlps = mlp * (encoder_layers * encoder_tokens + decoder_layers * decoder_tokens)
    cores = encoder_layers * encoder_core + decoder_layers * decoder_core
    return ("mlp" in recompute.modules) * mlps + ("core_attn" in recompute.modules) * cores


def recompute_flops_per_step(recipe: Recipe, layout: Layout) -> float:
    """FLOPs the recipe's activation recomputation adds to one step (on top of flops_per_step):
    full re-runs the forward of every recomputed layer (all of them with method uniform, the first
    num_layers of each model chunk with block); selective re-runs its modules' forward: core_attn
    the attention core, mlp a dense layer's MLP matmuls, moe an MoE layer's (router, shared experts,
    the router_topk experts a token passes), shared_experts its shared experts'."""
    model, recompute = recipe.model, recipe.recompute
    if model.family == "encoder_decoder":
        return _encoder_decoder_recompute_flops_per_sample(recipe) * layout.global_batch_size
    if recompute.granularity == "full":
        if recompute.method == "uniform":
            layers = model.num_layers
        else:
            layers = sum(layout.vpp * min(recompute.num_layers, n // layout.vpp) for n in layout.layers_per_stage)
        mean_layer = sum(_layer_forward_flops(model, moe) for moe in moe_layers(model)) / model.num_layers
        per_token = layers * mean_layer
    elif recompute.granularity == "selective":
        modules = recompute.modules
        per_token = 0
        for moe in moe_layers(model):
            per_token += _attention_core_forward_flops(model) if "core_attn" in modules else 0
            if not moe and "mlp" in modules:
                per_token += 2 * _mlp_matmul_parameters(model, model.ffn_hidden_size)
            elif moe and "moe" in modules:
                routed = _routed_expert_parameters(model, model.moe.router_topk)
                per_token += 2 * (_moe_shared_parameters(model) + routed)
            elif moe and "shared_experts" in modules and model.moe.shared_expert_ffn_hidden_size:
                per_token += 2 * _mlp_matmul_parameters(model, model.moe.shared_expert_ffn_hidden_size)
    else:
        per_token = 0
    return per_token * layout.global_batch_size * model.seq_length
