"""The masked-language-model encoder (BERT, RoBERTa): megatron-core's BertModel with its masked-LM
head (dense, GELU, norm, then the output layer with a bias), trained on masked tokens
(``bigpt.data.masked``); [model.encoder].

Post-LayerNorm, as BERT and RoBERTa are, on megatron-core's pre-LN layer: its layer normalises the
input of attention and of the MLP and adds each branch to the *unnormalised* input, and its
``apply_residual_connection_post_layernorm`` is unused. But a norm that returns (output, residual)
makes the layer add to the normalised one, and with the norms shifted by one position (a layer's
input norm is the previous layer's output norm, the first layer's is the embedding norm, the
block's final norm the last layer's output norm) the layer computes post-LN exactly:
    LN_in(x) = a;  b = a + attn(a);  LN_mlp(b) = c;  c + mlp(c) → the next layer's LN_in
is BERT's  b' = LN1(a + attn(a)) = c;  LN2(c + mlp(c)). Same parameters, same count, same names.
"""

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.models.bert import bert_layer_specs
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import get_attr_wrapped_model

from bigpt.data.batches import on_model_device
from bigpt.data.datasets import build_datasets
from bigpt.families.decoder import token_loss
from bigpt.families.spec import ModelFamily
from bigpt.hf.bert import ENCODER_FAMILIES
from bigpt.recipe import padded_vocab_size


def no_config_fields(recipe, layout, use_te) -> dict:
    return {}


def returning_residual(norm_builder):
    """A norm builder whose norms return (output, output): the transformer layer then adds its
    branch to the normalised input (post-LN). The norm module is the builder's own (its parameters
    and their names unchanged); a forward hook replaces its output."""

    def build(*args, **kwargs):
        norm = norm_builder(*args, **kwargs)
        norm.register_forward_hook(lambda module, inputs, output: (output, output))
        return norm

    return build


def _post_norm_layer(spec: ModuleSpec) -> ModuleSpec:
    """The local ``spec`` with its two layer norms returning the residual."""
    layer = spec.submodules
    norm = returning_residual(layer.input_layernorm)
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(layer, input_layernorm=norm, pre_mlp_layernorm=norm)
    )


def layer_spec(recipe, config, use_te, vp_stage):
    """megatron-core's BERT layer, pre-LN as it is, or post-LN by ``returning_residual`` norms.
    Transformer Engine fuses the pre-LN norms into the next linear layer, which leaves no residual
    to return: its post-LN layer has unfused norms and linears (untested on a GPU so far)."""
    pre_norm = recipe.model.encoder.norm_position == "pre"
    if not use_te:
        spec = bert_layer_specs.bert_layer_local_spec
        return spec if pre_norm else _post_norm_layer(spec)
    if pre_norm:
        return bert_layer_specs.get_bert_layer_with_transformer_engine_spec()
    return post_norm_transformer_engine_spec()


def post_norm_transformer_engine_spec() -> ModuleSpec:
    """Transformer Engine's BERT layer, post-LN: its norms unfused from the linears (``TENorm``
    returning the residual, ``TEColumnParallelLinear``), checkpoint names as the local spec's."""
    from functools import partial

    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    te = bert_layer_specs.get_bert_layer_with_transformer_engine_spec()
    layer, attention = te.submodules, te.submodules.self_attention
    local = bert_layer_specs.bert_layer_local_spec.submodules
    return ModuleSpec(
        module=te.module,
        submodules=dataclasses.replace(
            layer,
            input_layernorm=returning_residual(TENorm),
            self_attention=dataclasses.replace(
                attention,
                submodules=dataclasses.replace(attention.submodules, linear_qkv=TEColumnParallelLinear),
            ),
            pre_mlp_layernorm=returning_residual(TENorm),
            mlp=partial(
                MLP.as_mlp_submodule,
                submodules=MLPSubmodules(
                    linear_fc1=TEColumnParallelLinear, linear_fc2=layer.mlp.keywords["submodules"].linear_fc2
                ),
            ),
            sharded_state_dict_keys_map=local.sharded_state_dict_keys_map,
        ),
    )


def build_chunk(recipe, layout, config, spec, vp_stage):
    m = recipe.model
    return BertModel(
        config=config,
        num_tokentypes=m.encoder.token_types,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(m, layout.tp),
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope" if m.position_embedding == "rope" else "learned_absolute",
        add_binary_head=False,  # next-sentence prediction: refused on paper (model.encoder)
        vp_stage=vp_stage,
    )


def forward_step(data_iterator, model):
    """megatron-core's ``forward_step_func`` for masked tokens: the loss is the sum over the masked
    positions (loss_mask) and their count, as the decoder's over its tokens."""
    batch = on_model_device(model, next(data_iterator))
    types = batch["token_types"] if _token_types(model) else None
    output = model(batch["tokens"], batch["padding_mask"], tokentype_ids=types, lm_labels=batch["labels"])
    loss_mask = batch["loss_mask"]
    return output, lambda output_tensor: token_loss(loss_mask, _loss_of(output_tensor))


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Masked-LM logits at every position of one unpadded sequence of token type 0."""
    types = torch.zeros_like(tokens) if _token_types(model) else None
    output = model(tokens, torch.ones_like(tokens), tokentype_ids=types)
    return _loss_of(output)  # the last stage's (logits, binary-head logits): the logits


def _token_types(model) -> bool:
    """Whether this chunk embeds token types (the first stage's, with model.encoder.token_types)."""
    bert = get_attr_wrapped_model(model, "encoder", return_model_obj=True)  # under DDP and Float16Module
    return bert.pre_process and bert.embedding.num_tokentypes > 0


def _loss_of(output) -> torch.Tensor:
    """BertModel's last stage returns (per-token loss or logits, binary-head logits): the first."""
    return output[0] if isinstance(output, tuple) else output


ENCODER = ModelFamily(
    name="encoder",
    model_class=BertModel,
    config_fields=no_config_fields,
    layer_spec=layer_spec,
    build_chunk=build_chunk,
    forward_step=forward_step,
    logits=logits,
    build_datasets=build_datasets,
    hf_model_types=tuple(ENCODER_FAMILIES),
)
