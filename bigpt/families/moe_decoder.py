"""The Mixture-of-Experts causal decoder (Mixtral, Qwen2/3-MoE, DeepSeek-V3's routing): the dense
decoder whose MLPs are megatron-core's MoE layers ([model.moe]), split over expert parallelism.
Everything but the layers is the dense decoder's."""

import dataclasses

from megatron.core.models.gpt import gpt_layer_specs

from bigpt.families.decoder import DECODER, NORMS, with_transformer_engine_names
from bigpt.hf.config import FAMILIES as HF_FAMILIES


def config_fields(recipe, layout, use_te) -> dict:
    """[model.moe] as megatron-core's TransformerConfig fields."""
    moe = recipe.model.moe
    # A softmax router normalises the chosen experts' probabilities when it applies the softmax
    # to the top-k logits alone (pre_softmax off), which equals renormalising a full softmax.
    pre_softmax = moe.router_score_function == "softmax" and not moe.normalize_topk
    balancing = moe.load_balancing
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.router_topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size or recipe.model.ffn_hidden_size,
        moe_router_score_function=moe.router_score_function,
        moe_router_pre_softmax=pre_softmax,
        moe_router_topk_scaling_factor=moe.topk_scaling_factor,
        moe_router_num_groups=moe.num_groups,
        moe_router_group_topk=moe.group_topk,
        moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=moe.aux_loss_coeff if balancing != "none" else 0.0,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_bias_update_rate=moe.bias_update_rate,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=moe.shared_expert_gate,
        moe_layer_freq=moe.layers(recipe.model.num_layers),
        moe_router_dtype="fp32" if moe.router_fp32 else None,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy=moe.drop_policy,
        moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_grouped_gemm=use_te,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )


def layer_spec(recipe, config, use_te, vp_stage):
    """megatron-core's block spec of one chunk: its layers MoE or dense by the [model.moe] pattern."""
    block = gpt_layer_specs.get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization=NORMS[recipe.model.normalization], vp_stage=vp_stage
    )
    if not use_te:
        block.layer_specs = [with_transformer_engine_names(spec) for spec in block.layer_specs]
    return block


MOE_DECODER = dataclasses.replace(
    DECODER,
    name="moe_decoder",
    config_fields=config_fields,
    layer_spec=layer_spec,
    hf_model_types=tuple(name for name, hf in HF_FAMILIES.items() if hf.model_family == "moe_decoder"),
)
