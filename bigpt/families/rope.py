"""model.rope_scaling in megatron-core's rotary embeddings: the one place that turns the recipe's
RoPE keys into megatron-core's config, GPTModel arguments and rotary embedding.

- linear: GPTModel's ``seq_len_interpolation_factor`` (positions divided by the factor).
- llama3: megatron-core's own formula (``RotaryEmbedding._apply_scaling``), but GPTModel passes it
  the factor alone (0.16 to 0.19), so low_freq_factor, high_freq_factor and the original length
  would be fixed at Llama 3.1's 1, 4 and 8192. The frequencies are computed here with all four.
- yarn: megatron-core's ``YarnRotaryEmbedding`` (position_embedding_type "yarn"), whose parameters
  GPTModel reads from config fields no 0.19 config class declares (``YarnTransformerConfig``).

Multi-latent attention ([model.mla]) builds its own rotary embedding (unscaled or YaRN) from
``MLATransformerConfig``'s fields, and GPTModel builds none ("rope" with MLA).
"""

from dataclasses import dataclass

from megatron.core.transformer import MegatronModule, MLATransformerConfig, TransformerConfig

from bigpt.recipe import ModelConfig


@dataclass
class YarnTransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig with the fields its GPTModel builds a YaRN rotary embedding
    from (read with getattr: a plain TransformerConfig fails with AttributeError). Attention finds
    them too and multiplies the rotated queries and keys by YaRN's attention factor (mscale)."""

    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    yarn_correction_range_round_to_int: bool = True


def config_class(model: ModelConfig) -> type[TransformerConfig]:
    if model.mla.enabled():
        return MLATransformerConfig
    return YarnTransformerConfig if model.rope_scaling == "yarn" else TransformerConfig


def config_fields(model: ModelConfig) -> dict:
    """The config fields of model.rope_scaling (YaRN's; the others have none), and of [model.mla]
    with its rotary embedding (none or YaRN: the checks refuse the others)."""
    mla = model.mla
    if mla.enabled():
        yarn = model.rope_scaling == "yarn"
        return dict(
            multi_latent_attention=True,
            q_lora_rank=mla.q_lora_rank,
            kv_lora_rank=mla.kv_lora_rank,
            qk_head_dim=mla.qk_head_dim,
            qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim,
            v_head_dim=mla.v_head_dim,
            rope_type="yarn" if yarn else "rope",
            rotary_base=model.rope_base,
            # unscaled: a factor of 1 also keeps YaRN's softmax scale (mscale) at 1
            rotary_scaling_factor=model.rope_scaling_factor if yarn else 1.0,
            original_max_position_embeddings=model.rope_original_max_position_embeddings,
            beta_fast=model.rope_beta_fast,
            beta_slow=model.rope_beta_slow,
            mscale=model.rope_mscale,
            mscale_all_dim=model.rope_mscale_all_dim,
        )
    if model.rope_scaling != "yarn":
        return {}
    return dict(
        yarn_rotary_scaling_factor=model.rope_scaling_factor,
        yarn_original_max_position_embeddings=model.rope_original_max_position_embeddings,
        yarn_beta_fast=model.rope_beta_fast,
        yarn_beta_slow=model.rope_beta_slow,
        yarn_mscale=model.rope_mscale,
        yarn_mscale_all_dim=model.rope_mscale_all_dim,
    )


def gpt_model_arguments(model: ModelConfig) -> dict:
    """GPTModel's position-embedding arguments."""
    if model.position_embedding == "learned":
        return dict(position_embedding_type="learned_absolute")
    yarn = model.rope_scaling == "yarn" and not model.mla.enabled()  # MLA's attention applies its own
    return dict(
        position_embedding_type="yarn" if yarn else "rope",
        rotary_base=model.rope_base,
        seq_len_interpolation_factor=model.rope_scaling_factor if model.rope_scaling == "linear" else None,
    )


def scale_frequencies(chunk: MegatronModule, model: ModelConfig) -> None:
    """llama3 scaling with all its parameters, applied to the frequencies of the chunk's rotary
    embedding, which GPTModel built unscaled."""
    if model.rope_scaling != "llama3":
        return
    rotary = chunk.rotary_pos_emb
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq,
        factor=model.rope_scaling_factor,
        low_freq_factor=model.rope_low_freq_factor,
        high_freq_factor=model.rope_high_freq_factor,
        original_max_position_embeddings=model.rope_original_max_position_embeddings,
    )
