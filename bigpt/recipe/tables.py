"""One dataclass per TOML table of a recipe; the docstring under each field is its reference.

Paths marked ``recipe_path`` are resolved against the directory of the recipe file that sets
them, so a shared base can name files next to itself. ``run_dir`` and ``checkpoint.dir`` are
the exception: they are where this run writes, so they are relative to the working directory
the job is launched from, like any output path on a command line.
"""

from dataclasses import MISSING, dataclass, field
from typing import Any, Literal

from bigpt.recipe.fields import NOT_A_KEY, fraction, non_negative, output_path, positive, recipe_path


@dataclass(kw_only=True)
class MoEConfig:
    """[model.moe]: the Mixture-of-Experts layers of model.family = "moe_decoder", computed by
    megatron-core's MoE layer (router, token dispatcher, experts)."""

    num_experts: int | None = positive(None)
    """Routed experts per MoE layer (required for moe_decoder)."""
    router_topk: int = positive(2)
    """Experts each token is routed to."""
    ffn_hidden_size: int | None = positive(None)
    """Inner width of one expert's MLP; None = model.ffn_hidden_size."""
    router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """How router logits become expert scores (sigmoid: DeepSeek-V3)."""
    normalize_topk: bool = True
    """Make the chosen experts' probabilities sum to 1 (Hugging Face's norm_topk_prob: Mixtral,
    Qwen3-MoE, DeepSeek-V3); false = the top-k of a softmax over all experts, unnormalised
    (Qwen2-MoE). A sigmoid router always normalises (megatron-core)."""
    topk_scaling_factor: float | None = positive(None)
    """Multiply the chosen experts' probabilities by this (DeepSeek-V3's routed_scaling_factor)."""
    num_groups: int | None = positive(None)
    """Group-limited routing: experts form this many groups (DeepSeek-V3's n_group)."""
    group_topk: int | None = positive(None)
    """Group-limited routing: tokens choose experts from this many groups (topk_group)."""
    load_balancing: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    """Load-balancing loss: over the micro-batch (aux_loss, GShard/Switch), per sequence
    (seq_aux_loss, DeepSeek), over the global batch (global_aux_loss), or none."""
    aux_loss_coeff: float = non_negative(0.01)
    """Weight of the load-balancing loss."""
    z_loss_coeff: float = non_negative(0.0)
    """Weight of the router z-loss (ST-MoE); 0 = off."""
    expert_bias: bool = False
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for the
    choice of experts only, updated from each step's expert load."""
    bias_update_rate: float = positive(1e-3)
    """For expert_bias: the bias's step per optimizer step."""
    shared_expert_ffn_hidden_size: int | None = positive(None)
    """Inner width of the shared experts' MLP that every token also passes (all shared experts
    as one); None = no shared expert."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by a learned sigmoid gate (Qwen2-MoE)."""
    layer_freq: int = positive(1)
    """Every layer_freq-th layer is an MoE layer, the others dense (model.ffn_hidden_size)."""
    first_dense_layers: int = non_negative(0)
    """The first this many layers are dense (DeepSeek-V3's first_k_dense_replace)."""
    layer_pattern: list[int] | None = None
    """One 1 (MoE) or 0 (dense) per layer; replaces layer_freq and first_dense_layers."""
    router_fp32: bool = True
    """Compute the router and its probabilities in fp32 (whatever precision.dtype is)."""
    capacity_factor: float | None = positive(None)
    """None = dropless (every token reaches its experts); otherwise each expert takes at most
    capacity_factor × its even share of tokens and drops the rest (drop_policy)."""
    drop_policy: Literal["probs", "position"] = "probs"
    """With capacity_factor: drop the tokens of lowest probability, or the last in the sequence."""
    pad_to_capacity: bool = False
    """With capacity_factor: pad every expert's input to its capacity (fixed shapes)."""
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach experts on other expert-parallel ranks."""

    def layers(self, num_layers: int) -> list[int]:
        """1 (MoE) or 0 (dense) per layer (megatron-core's moe_layer_freq as a list)."""
        if self.layer_pattern is not None:
            return list(self.layer_pattern)
        return [int(layer >= self.first_dense_layers and layer % self.layer_freq == 0) for layer in range(num_layers)]


@dataclass(kw_only=True)
class MLAConfig:
    """[model.mla]: multi-latent attention (DeepSeek-V2/V3), megatron-core's MLA: queries, keys and
    values are projected up from low-rank latents, each normalised (model.normalization), and every
    query and key head has a part without and a part with rotary embeddings (model.rope_base and
    model.rope_scaling: none or yarn). Off unless kv_lora_rank is set; it replaces
    model.num_query_groups and model.kv_channels."""

    kv_lora_rank: int | None = positive(None)
    """Width of the key/value latent (DeepSeek's kv_lora_rank); None = standard attention, no MLA."""
    q_lora_rank: int | None = positive(None)
    """Width of the query latent (q_lora_rank); None = queries projected from the hidden state
    directly (no q-LoRA, DeepSeek-V2-Lite)."""
    qk_head_dim: int = positive(128)
    """Width of the part of each query and key head without rotary embeddings (qk_nope_head_dim)."""
    qk_pos_emb_head_dim: int = positive(64)
    """Width of the rotary part of each query and key head, shared by all key heads
    (qk_rope_head_dim); even."""
    v_head_dim: int = positive(128)
    """Width of each value head (v_head_dim)."""

    def enabled(self) -> bool:
        return self.kv_lora_rank is not None


@dataclass(kw_only=True)
class EncoderConfig:
    """[model.encoder]: the masked-language-model encoder of model.family = "encoder" (BERT,
    RoBERTa), megatron-core's BertModel with its masked-LM head."""

    norm_position: Literal["post", "pre"] = "post"
    """Where the layer norms sit: post = after each residual sum, with a norm on the embeddings
    (BERT, RoBERTa; their released weights need it); pre = before attention and the MLP, with a
    final norm (megatron-core's BERT, more stable to train deep)."""
    token_types: int = non_negative(2)
    """Rows of the token-type (segment) embedding: 2 = BERT's sentence A / B, 1 = RoBERTa's single
    row, 0 = none."""
    next_sentence_prediction: bool = False
    """BERT's second objective on a binary head. Not offered (true is refused): RoBERTa showed it
    does not help, and it needs sentence pairs the data pipeline does not build."""


@dataclass(kw_only=True)
class EncoderDecoderConfig:
    """[model.encoder_decoder]: the encoder-decoder of model.family = "encoder_decoder" (T5),
    megatron-core's T5Model with T5's relative position bias. Its decoder has model.num_layers
    layers; the widths, heads (model.kv_channels: T5's d_kv) and norms are [model]'s, for both stacks."""

    encoder_layers: int | None = positive(None)
    """Layers of the encoder; None = model.num_layers, as many as the decoder's."""
    relative_attention_num_buckets: int = positive(32)
    """Buckets of relative distance, each with a learned bias per head (T5's
    relative_attention_num_buckets; half of them per direction in the encoder)."""
    relative_attention_max_distance: int = positive(128)
    """Distances from this on share the last bucket (relative_attention_max_distance)."""

    def encoder_depth(self, num_layers: int) -> int:
        """The encoder's layers, given model.num_layers (the decoder's)."""
        return self.encoder_layers or num_layers


@dataclass(kw_only=True)
class ModelConfig:
    """[model]: the transformer architecture."""

    family: Literal["decoder", "moe_decoder", "encoder", "encoder_decoder"] = "decoder"
    """The kind of model: decoder = a dense causal decoder (Llama, Qwen, Mistral); moe_decoder = a
    causal decoder whose MLPs are Mixture-of-Experts layers, set in [model.moe]; encoder = a
    bidirectional encoder trained by masked language modelling (BERT, RoBERTa), set in
    [model.encoder]; encoder_decoder = an encoder and a decoder trained by span corruption (T5), set
    in [model.encoder_decoder]."""
    num_layers: int = positive()
    """Number of transformer layers."""
    hidden_size: int = positive()
    """Width of the residual stream."""
    ffn_hidden_size: int = positive()
    """Inner width of the MLP (per matrix; SwiGLU has two input matrices of this width)."""
    num_attention_heads: int = positive()
    """Number of query heads."""
    num_query_groups: int | None = positive(None)
    """Number of key/value heads (grouped-query attention); None = one per query head (MHA)."""
    kv_channels: int | None = positive(None)
    """Width of one attention head; None = hidden_size / num_attention_heads."""
    seq_length: int = positive()
    """Training sequence length in tokens."""
    max_position_embeddings: int | None = positive(None)
    """Size of the learned position table (and RoPE's nominal range); None = seq_length."""
    vocab_size: int = positive()
    """The tokenizer's vocabulary size; the embedding is padded, see ``padded_vocab_size``."""
    make_vocab_size_divisible_by: int = positive(128)
    """Pad the embedding rows to a multiple of this times the tensor-parallel size."""
    activation: Literal["swiglu", "gelu", "relu", "geglu"] = "swiglu"
    """MLP activation; swiglu and geglu are gated (three MLP matrices instead of two). geglu is GELU
    in its tanh approximation, gated (T5 v1.1's gated-gelu, Hugging Face's gelu_new)."""
    normalization: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Norm before attention, before the MLP and after the last layer."""
    norm_epsilon: float = positive(1e-5)
    """Epsilon added inside the norm."""
    position_embedding: Literal["rope", "learned", "relative"] = "rope"
    """Rotary embeddings on q/k, a learned absolute position table, or T5's learned relative
    position bias on the attention scores (model.family = "encoder_decoder" only)."""
    rope_base: float = positive(10000.0)
    """RoPE base frequency (Llama 3 uses 500000)."""
    rope_scaling: Literal["none", "llama3", "yarn", "linear"] = "none"
    """Frequency scaling of RoPE for a context longer than the one the model was pretrained at:
    llama3 (Llama 3.1-3.3: low frequencies divided by the factor, high ones kept, a smooth ramp
    between), yarn (YaRN, as Qwen2.5/Qwen3 long-context and DeepSeek-V3 configs: a ramp between
    extrapolated and interpolated frequencies, and the attention scaled), linear (every position
    divided by the factor). Hugging Face's rope_scaling.rope_type of the same name."""
    rope_scaling_factor: float = positive(8.0)
    """How many times longer the context is than rope_original_max_position_embeddings
    (rope_scaling.factor)."""
    rope_original_max_position_embeddings: int = positive(8192)
    """For llama3 and yarn: the context length the model was pretrained at, before scaling
    (rope_scaling.original_max_position_embeddings)."""
    rope_low_freq_factor: float = positive(1.0)
    """For llama3: wavelengths longer than rope_original_max_position_embeddings / this are
    divided by the factor (rope_scaling.low_freq_factor)."""
    rope_high_freq_factor: float = positive(4.0)
    """For llama3: wavelengths shorter than rope_original_max_position_embeddings / this are kept;
    must exceed rope_low_freq_factor (rope_scaling.high_freq_factor)."""
    rope_beta_fast: float = positive(32.0)
    """For yarn: dimensions turning more than this many times over the original context are kept
    (extrapolated) (rope_scaling.beta_fast)."""
    rope_beta_slow: float = positive(1.0)
    """For yarn: dimensions turning fewer than this many times are interpolated (rope_scaling.beta_slow)."""
    rope_mscale: float = non_negative(1.0)
    """For yarn: the attention factor is (0.1 × rope_mscale × ln factor + 1) / (0.1 × rope_mscale_all_dim ×
    ln factor + 1), multiplying the rotated queries and keys (rope_scaling.mscale, DeepSeek's spelling)."""
    rope_mscale_all_dim: float = non_negative(0.0)
    """For yarn: see rope_mscale (rope_scaling.mscale_all_dim); the defaults give YaRN's
    0.1 × ln factor + 1."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    attention_dropout: float = fraction(0.0)
    """Dropout on attention probabilities."""
    hidden_dropout: float = fraction(0.0)
    """Dropout on the residual branches."""
    init_std: float = positive(0.02)
    """Standard deviation of the normal weight initialisation."""
    scaled_output_init: bool = True
    """Initialise the output projections of attention and MLP with std / sqrt(2 * num_layers)."""
    add_bias_linear: bool = False
    """Give every linear layer a bias."""
    add_qkv_bias: bool = False
    """Give the query, key and value projections a bias, and no other linear layer (Qwen2,
    Qwen2.5); implied by add_bias_linear."""
    qk_layernorm: bool = False
    """Normalise each query and key head (the model's normalization over kv_channels, with its
    own weights) before RoPE (Qwen3)."""
    attention_window: int | None = positive(None)
    """Sliding-window attention in every layer: a token attends to itself and the
    attention_window - 1 tokens before it (Mistral's sliding_window); None = all earlier tokens."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """[model.moe]"""
    mla: MLAConfig = field(default_factory=MLAConfig)
    """[model.mla]"""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """[model.encoder]"""
    encoder_decoder: EncoderDecoderConfig = field(default_factory=EncoderDecoderConfig)
    """[model.encoder_decoder]"""


MODEL_SHAPE_KEYS = (
    "family",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "activation",
    "normalization",
    "position_embedding",
    "tie_embeddings",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "moe",
    "mla",
    "encoder",
    "encoder_decoder",
)
"""The [model] keys that decide which tensors a checkpoint holds and their shapes."""

MOE_FUNCTION_KEYS = (
    "num_experts",
    "router_topk",
    "ffn_hidden_size",
    "router_score_function",
    "normalize_topk",
    "topk_scaling_factor",
    "num_groups",
    "group_topk",
    "expert_bias",
    "shared_expert_ffn_hidden_size",
    "shared_expert_gate",
)
"""The [model.moe] keys that decide what given weights compute, with which layers are MoE (the
load-balancing losses, capacity and dispatcher are the run's own choice)."""

ROPE_SCALING_KEYS = (
    "rope_original_max_position_embeddings",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_beta_fast",
    "rope_beta_slow",
    "rope_mscale",
    "rope_mscale_all_dim",
)
"""The parameters of a rope_scaling beyond its factor."""

ROPE_SCALING_USES = {
    "none": (),
    "linear": ("rope_scaling_factor",),
    "llama3": (
        "rope_scaling_factor",
        "rope_original_max_position_embeddings",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
    ),
    "yarn": (
        "rope_scaling_factor",
        "rope_original_max_position_embeddings",
        "rope_beta_fast",
        "rope_beta_slow",
        "rope_mscale",
        "rope_mscale_all_dim",
    ),
}
"""The [model] keys each rope_scaling reads; the others change nothing it computes."""

MODEL_FUNCTION_KEYS = MODEL_SHAPE_KEYS + (
    "norm_epsilon",
    "rope_base",
    "rope_scaling",
    "rope_scaling_factor",
    *ROPE_SCALING_KEYS,
    "attention_window",
)
"""The [model] keys that decide what given weights compute: weights loaded into a model that differs
in one of them give other logits (seq_length, max_position_embeddings, dropout and the
initialisation are the run's own choice)."""


def padded_vocab_size(model: ModelConfig, tensor_parallel: int) -> int:
    """Rows of the embedding: vocab_size rounded up to make_vocab_size_divisible_by × TP.

    This is Megatron's rule, so every tensor-parallel shard has the same, aligned size.
    """
    multiple = model.make_vocab_size_divisible_by * tensor_parallel
    return -(-model.vocab_size // multiple) * multiple


@dataclass(kw_only=True)
class ParallelConfig:
    """[parallel]: how the model and batch are split over GPUs (world = TP × PP × CP × DP)."""

    tensor: int = positive(1)
    """Tensor-parallel size: each layer's matrices are split over this many GPUs."""
    pipeline: int = positive(1)
    """Pipeline-parallel size: the layers are split over this many stages."""
    virtual_pipeline: int = positive(1)
    """Model chunks per pipeline stage for the interleaved 1F1B schedule; 1 = not interleaved."""
    context: int = positive(1)
    """Context-parallel size: the sequence is split over this many GPUs inside attention."""
    data: int = non_negative(0)
    """Data-parallel size; 0 = whatever the world size leaves, otherwise it must match."""
    expert: int = positive(1)
    """Expert-parallel size (moe_decoder): each MoE layer's experts are split over this many
    ranks, taken from the data-parallel (and context-parallel) ranks."""
    expert_tensor: int | None = positive(None)
    """Tensor-parallel size inside each expert; None = parallel.tensor (megatron-core's default)."""
    sequence_parallel: bool = False
    """Split norm/dropout activations along the sequence over the tensor-parallel group."""
    first_stage_layers: int | None = positive(None)
    """Layers on the first pipeline stage (it also holds the embedding); None = even split."""
    last_stage_layers: int | None = positive(None)
    """Layers on the last pipeline stage (it also holds the output layer); None = even split."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the gradient reduce-scatter/all-reduce with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass."""


@dataclass(kw_only=True)
class PrecisionConfig:
    """[precision]: number formats and loss scaling."""

    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Parameter and activation dtype (the optimizer keeps fp32 master weights for bf16/fp16)."""
    fp8: Literal["none", "delayed", "tensorwise"] = "none"
    """FP8 matmuls through Transformer Engine and the recipe for their scaling factors: delayed =
    from a history of past maxima (fp8_amax_*), tensorwise = current scaling, from each tensor's
    own maximum."""
    fp8_amax_history_len: int = positive(1024)
    """fp8 = "delayed" only: steps of per-tensor maxima (amax) kept to choose each scaling factor
    from (megatron-core's default keeps 1; Transformer Engine's and Megatron-Bridge's recipes 1024)."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """fp8 = "delayed" only: scale by the largest amax in the history, or by the most recent one."""
    fp8_bf16_first_layers: int = non_negative(0)
    """fp8 = "tensorwise" only: transformer layers at the start of the model kept in bf16 rather than
    FP8, the most sensitive ones (Megatron-Bridge's current-scaling recipe keeps 1 here and 1 at
    the end); megatron-core cannot do this with delayed scaling."""
    fp8_bf16_last_layers: int = non_negative(0)
    """fp8 = "tensorwise" only: transformer layers at the end of the model kept in bf16 rather
    than FP8."""
    transformer_engine: Literal["auto", "on", "off"] = "auto"
    """Use Transformer Engine layers: auto = when importable and a GPU is present."""
    initial_loss_scale: float = positive(65536.0)
    """Starting dynamic loss scale (fp16 only)."""
    min_loss_scale: float = positive(1.0)
    """Lower bound of the dynamic loss scale (fp16 only)."""
    loss_scale_window: int = positive(1000)
    """Overflow-free steps before the loss scale is doubled (fp16 only)."""
    hysteresis: int = positive(2)
    """Overflows tolerated before the loss scale is halved (fp16 only)."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in fp32 rather than in the parameter dtype."""


@dataclass(kw_only=True)
class TrainConfig:
    """[train]: batch sizes and length of the run."""

    micro_batch_size: int = positive(1)
    """Sequences per forward/backward pass on one data-parallel rank."""
    global_batch_size: int = positive()
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    train_iters: int = positive()
    """Optimizer steps in the whole run."""
    seed: int = non_negative(1234)
    """Seed for initialisation, dropout and data order."""
    rampup_batch_size: list[int] | None = None
    """[start, increment, ramp_samples]: grow the global batch from start by increment over
    ramp_samples samples, as Megatron's --rampup-batch-size; None = no ramp-up. Steps stay steps:
    warmup and decay end at the steps schedule.* names, train.train_iters steps train fewer samples
    than at the full batch (--dry-run counts them), and evaluation uses the full batch."""
    clip_grad: float = non_negative(1.0)
    """Clip the global gradient norm to this; 0 = no clipping."""
    on_bad_step: Literal["skip", "stop"] = "skip"
    """A step whose loss or gradients are NaN/Inf, or whose loss spikes (loss_spike_factor): skip
    it (no weight update, its batch is not repeated), or stop with the last checkpoint intact."""
    max_skipped_steps: int = non_negative(5)
    """With on_bad_step = "skip": stop anyway after this many bad steps in a row."""
    loss_spike_factor: float = non_negative(0.0)
    """A loss above this many times the mean of the last 100 good steps is a bad step; 0 = off."""


@dataclass(kw_only=True)
class OptimizerConfig:
    """[optimizer]: which optimizer and its hyper-parameters."""

    name: Literal["adamw", "lion", "muon", "adafactor"] = "adamw"
    """adamw: AdamW on every parameter. lion / muon: megatron-core's emerging optimizers (the
    emerging-optimizers package) on the 2-D weight matrices of the transformer layers, AdamW
    (adam_beta1/2, adam_eps) on the embedding, output layer and norms; megatron-core gives its Lion
    adam_beta1/adam_beta2 as its betas. With parallel.distributed_optimizer, lion and muon use
    megatron-core's layer-wise distributed optimizer (whole parameters per data-parallel rank).
    adafactor is refused, saying why (its factored moments cannot be checkpointed)."""
    lr: float = positive()
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = non_negative(0.0)
    """Learning rate at the end of the decay."""
    weight_decay: float = non_negative(0.1)
    """Decoupled weight decay (not applied to norms and biases)."""
    adam_beta1: float = fraction(0.9)
    """Adam's first-moment decay."""
    adam_beta2: float = fraction(0.95)
    """Adam's second-moment decay."""
    adam_eps: float = positive(1e-8)
    """Adam's denominator epsilon."""
    muon_momentum: float = fraction(0.95)
    """For muon: the decay of the momentum that is orthogonalised (Newton-Schulz) into the update."""
    muon_tp_mode: Literal["duplicated", "blockwise", "distributed"] = "duplicated"
    """For muon with parallel.tensor > 1: duplicated = every tensor-parallel rank orthogonalises the
    whole matrix (the update of a single GPU, at any tensor-parallel size); blockwise = each rank
    its own shard (cheaper, another update; megatron-core's default); distributed = the whole
    matrix, its products computed across the tensor-parallel ranks."""


@dataclass(kw_only=True)
class ScheduleConfig:
    """[schedule]: learning-rate warmup and decay, in optimizer steps."""

    warmup_iters: int = non_negative(0)
    """Steps of linear warmup from 0 to optimizer.lr."""
    decay_style: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """Shape of the decay to optimizer.min_lr; wsd = warmup-stable-decay."""
    decay_iters: int | None = positive(None)
    """Step at which the decay ends; None = train.train_iters."""
    wsd_decay_iters: int | None = positive(None)
    """For wsd: length of the final decay phase (the lr is constant before it)."""
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    """For wsd: shape of the final decay phase."""


@dataclass(kw_only=True)
class RecomputeConfig:
    """[recompute]: activation recomputation, trading compute for memory."""

    granularity: Literal["none", "selective", "full"] = "none"
    """selective = recompute the modules below; full = whole layers."""
    modules: list[Literal["core_attn", "mlp", "moe", "shared_experts"]] = field(default_factory=lambda: ["core_attn"])
    """For selective: what to recompute (megatron-core's recompute_modules). core_attn = the
    attention core, which then keeps no s² scores: only unfused attention stores them, so it needs
    precision.transformer_engine = "off" (Transformer Engine's fused attention keeps none); mlp =
    a dense layer's MLP, which then keeps only its input, for one more MLP forward (about a quarter
    of a Llama layer's training FLOPs; megatron-core skips MoE layers here); moe = an MoE layer
    (router, token dispatch and its all-to-all, experts, shared experts), which then keeps only its
    input; shared_experts = an MoE layer's shared experts alone. megatron-core's "layernorm" and
    "moe_act" are not offered: Transformer Engine fuses a dense layer's norms into the next linear
    (nothing to recompute), megatron-core 0.19's output-discarding checkpoint they use requires
    Transformer Engine, and moe_act also grouped GEMM experts."""
    method: Literal["uniform", "block"] = "uniform"
    """For full: uniform = checkpoint every num_layers layers; block = the first num_layers
    layers of each pipeline stage."""
    num_layers: int = positive(1)
    """For full: layers per checkpointed group (uniform) or per stage (block)."""


@dataclass(kw_only=True)
class BlendEntry:
    """One dataset of [data].blend."""

    path: str = recipe_path(default=MISSING)
    """Prefix of a Megatron indexed dataset (the path without .bin/.idx)."""
    weight: float = positive(1.0)
    """Relative sampling weight; weights are normalised over the blend."""
    epochs: float | None = positive(None)
    """Passes over this dataset's training split within its phase; None = use weight. Sets
    weight = epochs × the split's tokens. Give it for every dataset of a blend or for none."""


@dataclass(kw_only=True)
class DataPhase:
    """One [[data.phases]] entry: from start_tokens on, train on another blend."""

    start_tokens: int = positive()
    """Training tokens consumed before this phase begins; it lasts until the next phase or the end."""
    blend: list[BlendEntry] = field(default_factory=list)
    """The datasets this phase samples from, as data.blend."""


@dataclass(kw_only=True)
class MaskingConfig:
    """[data.masking]: how model.family = "encoder" masks its samples (megatron-core's masked
    datasets). A sample is masked anew each time it is drawn, seeded by its position in the
    stream: a sentence met again in a later epoch gets another mask (RoBERTa's dynamic masking).
    Salient-span masking is not offered (it needs an entity tagger)."""

    probability: float = fraction(0.15)
    """Share of a sample's tokens chosen for prediction; of those, 80% become the mask token, 10%
    a random token and 10% stay as they are (BERT)."""
    whole_word: bool = False
    """Choose whole words, all their pieces together: WordPiece's "##" pieces, and SentencePiece's
    or byte-level BPE's pieces that do not start a word (without "▁" or "Ġ")."""
    max_span: int = positive(1)
    """Mask spans of up to this many consecutive words (or tokens); 1 = single ones (BERT)."""
    span_lengths: Literal["inverse", "geometric"] = "inverse"
    """For max_span > 1: the length n of each span drawn with probability ∝ 1/n, or from a geometric
    distribution with p = 0.2 clipped at max_span (SpanBERT)."""
    short_sequence_probability: float = fraction(0.1)
    """Share of samples made shorter than model.seq_length on purpose (BERT), so the model also
    sees short inputs."""


@dataclass(kw_only=True)
class SpanCorruptionConfig:
    """[data.span_corruption]: how model.family = "encoder_decoder" corrupts its samples (T5's span
    corruption): spans of a sample's tokens are dropped from the encoder's input, each replaced by a
    sentinel (<extra_id_0>, <extra_id_1>, ...), and the decoder writes each sentinel then the tokens
    it stands for, then EOS. A sample is corrupted anew each time it is drawn, seeded by its position
    in the stream. T5's other objectives (prefix LM, deshuffling, BERT-style) are not offered."""

    noise_density: float = fraction(0.15)
    """Share of a sample's tokens dropped: round(tokens × noise_density), at least one (T5: 0.15)."""
    mean_span_length: float = positive(3.0)
    """Mean length of a dropped span: the dropped tokens form round(dropped / mean_span_length) spans
    of random lengths, with kept tokens of random lengths between them (T5: 3)."""

    def noise_and_spans(self, length: int) -> tuple[int, int]:
        """(dropped tokens, spans) of a sample of ``length`` tokens, as T5's ``random_spans_noise_mask``
        counts them; each span follows at least one kept token."""
        if length < 2:
            return 0, 0
        noise = min(max(round(length * self.noise_density), 1), length - 1)
        return noise, min(max(round(noise / self.mean_span_length), 1), length - noise)

    def most_spans(self, seq_length: int) -> int:
        """The most spans, so sentinels, a sample of an encoder of ``seq_length`` positions can have."""
        return max(self.noise_and_spans(length)[1] for length in range(1, sample_tokens(seq_length) + 1))

    def decoder_seq_length(self, seq_length: int) -> int:
        """The decoder's positions for an encoder of ``seq_length``: its start token, then the
        sentinel and tokens of each span of the longest sample (its targets: the same, then EOS)."""
        return 1 + max(sum(self.noise_and_spans(length)) for length in range(1, sample_tokens(seq_length) + 1))


def sample_tokens(seq_length: int) -> int:
    """The tokens a span-corruption sample holds at most: megatron-core's T5 samples leave two of the
    encoder's positions (bigpt ends the encoder's input with EOS in one)."""
    return seq_length - 2


@dataclass(kw_only=True)
class DataConfig:
    """[data]: tokenizer and training data."""

    source: Literal["mock", "indexed"] = "mock"
    """mock = random tokens (no files needed); indexed = Megatron .bin/.idx datasets in blend."""
    tokenizer: str | None = recipe_path()
    """SentencePiece .model or Hugging Face tokenizer.json."""
    blend: list[BlendEntry] = field(default_factory=list)
    """Datasets to sample from, e.g. [{path = "corpus_text_document", weight = 0.7}, ...]."""
    split: str = "98,2,0"
    """Train,validation,test proportions of each dataset's documents."""
    cache_dir: str | None = recipe_path()
    """Where dataset sample indices are cached; None = <run_dir>/data_cache."""
    num_workers: int = non_negative(0)
    """DataLoader worker processes per rank."""
    build_timeout_minutes: float = positive(30.0)
    """How long ranks other than 0 wait for rank 0 to build the dataset sample indices."""
    phases: list[DataPhase] = field(default_factory=list)
    """Later training phases (curriculum, final anneal on high-quality data) in order of
    start_tokens; data.blend is the first phase, from token 0. Validation always uses data.blend."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """[data.masking]"""
    span_corruption: SpanCorruptionConfig = field(default_factory=SpanCorruptionConfig)
    """[data.span_corruption]"""


@dataclass(kw_only=True)
class CheckpointConfig:
    """[checkpoint]: saving, resuming and retention."""

    dir: str | None = output_path(None)
    """Where checkpoints are written; None = <run_dir>/checkpoints. Relative to the working
    directory, like run_dir."""
    save_interval: int = non_negative(0)
    """Save every this many steps; 0 = only at the end of the run."""
    load: str = recipe_path(default="auto", keywords=("auto", "none"))
    """auto = resume from the latest checkpoint in dir if any; none = start fresh; or a path."""
    keep_last: int = non_negative(2)
    """Keep this many most recent checkpoints; 0 = keep all."""
    keep_every: int = non_negative(0)
    """Also keep every checkpoint whose step is a multiple of this; 0 = none extra."""
    async_save: bool = False
    """Write checkpoints in the background while training continues."""
    optimizer_format: Literal["fully_sharded_model_space", "fully_reshardable", "dp_reshardable"] = (
        "fully_sharded_model_space"
    )
    """How the distributed optimizer's state is saved. fully_sharded_model_space: every rank writes
    its own shard, described in the model's shapes, with no exchange; it loads at any TP/PP/VPP/DP.
    fully_reshardable: loads anywhere too, but the save gathers the optimizer state across the
    data-parallel group (slower, and one rank holds and writes the group's whole state).
    dp_reshardable: every rank writes its own flat shard with no exchange; it resumes only at the
    same TP, PP and VPP (any DP). Any of them loads as weights anywhere (init.from_checkpoint)."""
    allow_model_changes: list[str] = field(default_factory=list)
    """[model] keys (e.g. ["rope_base"], for long-context continuation) that may differ from the
    model of the weights this run loads (checkpoint.load, init.from_checkpoint, init.from_hf); the
    change is logged. "rope_scaling" allows its parameters (rope_scaling_factor, rope_beta_fast, ...)
    too. Any other difference in what the weights compute is refused."""


@dataclass(kw_only=True)
class WandbConfig:
    """[logging.wandb]: Weights & Biases (the optional extra: pip install 'bigpt[wandb]'), the same
    scalars as TensorBoard, the resolved recipe as the run's config. A resumed run continues the
    same W&B run (its id is in the checkpoint)."""

    project: str | None = None
    """W&B project; None = no W&B."""
    entity: str | None = None
    """W&B team or user; None = the logged-in user's default."""
    name: str | None = None
    """The W&B run's display name; None = the recipe's name."""
    tags: list[str] = field(default_factory=list)
    """Tags of the W&B run (64 characters at most each)."""
    mode: Literal["online", "offline"] = "online"
    """online = stream to the W&B server (needs a login: WANDB_API_KEY); offline = files under
    <run_dir>/wandb only, uploaded later with `wandb sync`."""


@dataclass(kw_only=True)
class LoggingConfig:
    """[logging]: what is reported and how often."""

    interval: int = positive(1)
    """Log loss, throughput and MFU every this many steps; the loss logged is the mean over them."""
    tensorboard: bool = True
    """Also write TensorBoard events under <run_dir>/tensorboard."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """[logging.wandb]"""


@dataclass(kw_only=True)
class EvalSet:
    """One [[eval.sets]] entry: a named validation set, reported as valid/<name>/loss and
    valid/<name>/perplexity."""

    name: str
    """Its name in logs and metrics (letters, digits, "_", "-", "."), e.g. "general" or "domain"."""
    blend: list[BlendEntry] = field(default_factory=list)
    """Datasets whose validation split (data.split) it reads, as data.blend; empty = data.blend's."""
    iters: int | None = positive(None)
    """Validation batches (of global_batch_size) per evaluation; None = eval.iters."""


@dataclass(kw_only=True)
class EvalTask:
    """One [[eval.tasks]] entry: a zero-shot multiple-choice task, reported as task/<name>/acc and
    task/<name>/acc_norm (lm-evaluation-harness's definitions; format: docs/evaluation.md)."""

    name: str
    """Its name in logs and metrics (letters, digits, "_", "-", "."), e.g. "hellaswag"."""
    path: str = recipe_path(default=MISSING)
    """The task's JSONL file: one {"context", "choices", "gold"} object per line."""
    limit: int | None = positive(None)
    """Score only the first this many examples; None = all."""


@dataclass(kw_only=True)
class EvalConfig:
    """[eval]: validation loss during training."""

    interval: int = non_negative(0)
    """Evaluate every this many steps; 0 = never."""
    iters: int = positive(10)
    """Validation batches (of global_batch_size) per evaluation."""
    sets: list[EvalSet] = field(default_factory=list)
    """Named validation sets (data.source = "indexed"), e.g. [[eval.sets]] name = "general" and
    [[eval.sets]] name = "domain", each with its own blend: forgetting and gain side by side.
    None = one set, the validation split of data.blend, reported as valid/loss."""
    tasks: list[EvalTask] = field(default_factory=list)
    """Downstream multiple-choice tasks scored at every evaluation (needs data.tokenizer)."""


@dataclass(kw_only=True)
class InitConfig:
    """[init]: where the initial weights come from (continual pretraining); none = random."""

    from_hf: str | None = recipe_path()
    """A Hugging Face checkpoint directory (config.json + safetensors) to import."""
    from_checkpoint: str | None = recipe_path()
    """A bigpt checkpoint whose weights (not optimizer or step) start this run."""
    upcycle: bool = False
    """Start a Mixture-of-Experts model (model.family = "moe_decoder") from the dense model that
    from_hf or from_checkpoint names, by megatron-core's upcycling: each layer's experts are
    copies of its dense MLP (split in model.ffn_hidden_size / model.moe.ffn_hidden_size slices
    when the experts are narrower), the routers freshly initialised, everything else copied. The
    dense model is the recipe's [model] with family = "decoder" and no [model.moe]."""
    extend_vocab: str | None = recipe_path()
    """A vocabulary extension (the OUTPUT.extension.json tools/extend_vocab.py wrote) for init.from_hf:
    the embedding and output layer grow to model.vocab_size, the old rows kept as they are, each
    new token's row the mean of the rows of the pieces the old tokenizer split it into; the
    extended tokenizer is exported with the model."""


@dataclass(kw_only=True)
class Recipe:
    """A whole recipe file: run identity plus one field per table."""

    name: str
    """Run name, used in logs and the default run_dir."""
    run_dir: str = output_path("")
    """Output directory (logs, TensorBoard, checkpoints); empty = runs/<name>. Relative to the
    working directory."""
    model: ModelConfig
    """[model]"""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """[parallel]"""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """[precision]"""
    train: TrainConfig
    """[train]"""
    optimizer: OptimizerConfig
    """[optimizer]"""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """[schedule]"""
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    """[recompute]"""
    data: DataConfig = field(default_factory=DataConfig)
    """[data]"""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """[checkpoint]"""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """[logging]"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """[eval]"""
    init: InitConfig = field(default_factory=InitConfig)
    """[init]"""
    source: str = field(default="", compare=False, metadata={NOT_A_KEY: True})
    """Path of the top recipe file (not a TOML key; not part of equality)."""
    origins: Any = field(default=None, compare=False, repr=False, metadata={NOT_A_KEY: True})
    """Where each key was set, a ``recipe.build.Origins`` (not a TOML key; not part of equality)."""

    def where(self, problem: str) -> str:
        """Where to fix what ``problem`` says: the files and overrides that set the keys it names
        (an override named as such, not as the recipe file), else the recipe file."""
        return self.origins.where(problem) if self.origins else self.source or "the recipe"

    def __post_init__(self):
        if not self.run_dir:
            self.run_dir = f"runs/{self.name}"
