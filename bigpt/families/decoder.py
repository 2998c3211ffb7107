"""The dense causal decoder (Llama, Qwen2/3, Mistral): megatron-core's GPTModel trained on next-token
prediction. GPTModel, although megatron-core 0.19 deprecates it for HybridModel: HybridModel's stack
spec is Transformer Engine only, has no llama3 RoPE scaling, and splits attention and MLP into
separate layers (other checkpoint names); docs/megatron-core.md."""

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel, gpt_layer_specs
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import get_batch_on_this_cp_rank

from bigpt.data.batches import on_model_device
from bigpt.data.datasets import build_datasets
from bigpt.families import rope
from bigpt.families.spec import ModelFamily
from bigpt.hf.config import FAMILIES as HF_FAMILIES
from bigpt.recipe import padded_vocab_size

NORMS = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}
"""model.normalization → megatron-core's name."""


def no_config_fields(recipe, layout, use_te) -> dict:
    return {}


MLA_TRANSFORMER_ENGINE_NAMES = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
}
"""Multi-latent attention's latent norms, under the names of the up projections Transformer Engine's
spec fuses them into."""


def with_transformer_engine_names(spec):
    """A local layer's spec whose checkpoint names are those of Transformer Engine's spec, so that a
    checkpoint written on either (an import, a CPU run) loads on the other. Transformer Engine fuses
    a norm into the linear layer after it where there is one, and megatron-core's local spec names
    its norms so; but it does so for an MoE layer's pre-MLP norm too, which Transformer Engine keeps
    a norm of its own (no linear layer follows it: the router and the experts do), and it names none
    of multi-latent attention's (whose latent norms Transformer Engine fuses into the up projections)."""
    layer = spec.submodules
    if isinstance(layer.self_attention, ModuleSpec) and layer.self_attention.module is MLASelfAttention:
        names = dict(MLA_TRANSFORMER_ENGINE_NAMES)
    else:
        names = dict(layer.sharded_state_dict_keys_map)
    if getattr(layer.mlp, "func", None) is MoELayer:
        names.pop("pre_mlp_layernorm.", None)
    else:
        names["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return dataclasses.replace(spec, submodules=dataclasses.replace(layer, sharded_state_dict_keys_map=names))


def layer_spec(recipe, config, use_te, vp_stage):
    """One spec for every layer: Transformer Engine's fused layers, or megatron-core's local ones."""
    attention = dict(qk_layernorm=config.qk_layernorm, multi_latent_attention=config.multi_latent_attention)
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**attention)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=NORMS[recipe.model.normalization], **attention)
    return with_transformer_engine_names(spec)


def build_chunk(recipe, layout, config, spec, vp_stage):
    m = recipe.model
    chunk = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(m, layout.tp),
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=m.tie_embeddings,
        **rope.gpt_model_arguments(m),
        vp_stage=vp_stage,
    )
    rope.scale_frequencies(chunk, m)
    return chunk


def forward_step(data_iterator, model):
    """megatron-core's ``forward_step_func``: every rank reads the micro-batch (cheap, and it keeps
    each rank's data position in step); the first stage uses the tokens, the last the labels. The
    loss is the masked *sum* of token losses plus the token count; megatron-core divides the
    gradients by the global token count, so every layout averages over exactly the same tokens."""
    batch = on_model_device(model, next(data_iterator))
    if parallel_state.get_context_parallel_world_size() > 1:
        # This rank's 2 of the 2 × cp sequence chunks (zigzag, for causal load balance), within its
        # own context-parallel group: without the group megatron-core splits over the whole world.
        batch = get_batch_on_this_cp_rank(
            batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
        )
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss_mask = batch["loss_mask"]
    return output, lambda output_tensor: token_loss(loss_mask, output_tensor)


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits at every position (one sequence, no labels)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    return model(tokens, positions, None)


def token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(loss sum, token count, {"lm loss": [sum, count]}) as megatron-core's schedule expects."""
    mask = loss_mask.view(-1).float()
    loss = torch.sum(per_token_loss.float().view(-1) * mask)
    tokens = mask.sum()
    return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens])}


DECODER = ModelFamily(
    name="decoder",
    model_class=GPTModel,
    config_fields=no_config_fields,
    layer_spec=layer_spec,
    build_chunk=build_chunk,
    forward_step=forward_step,
    logits=logits,
    build_datasets=build_datasets,
    hf_model_types=tuple(name for name, hf in HF_FAMILIES.items() if hf.model_family == "decoder"),
)
