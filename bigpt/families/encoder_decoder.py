"""The encoder-decoder (T5): megatron-core's T5Model, trained on span corruption (the encoder reads the
corrupted text, the decoder predicts the dropped spans; ``bigpt.data.span_corruption``);
[model.encoder_decoder].

T5's function on megatron-core's layers:
- relative position bias: one table of buckets × heads per stack (encoder bidirectional, decoder
  causal), added to every self-attention's scores (T5Model computes it; megatron-core's local
  attention refuses a bias, ``RelativeBiasAttention`` adds it); none on cross-attention;
- no 1/sqrt(d_kv) on the scores (``softmax_scale = 1``: T5 folds it into its initialisation);
- RMSNorm without bias, no biases in linears (model.normalization, model.add_bias_linear);
- tied embeddings: the decoder's output scaled by hidden_size**-0.5 before the shared output
  layer, and no output bias (megatron-core's T5 head gives a tied output layer a bias T5 has not).
megatron-core's block-spec helpers pass ``TENorm``, None without Transformer Engine, which silently
drops each stack's final norm: the blocks are built from the *layer* specs, whose final norm
megatron-core chooses (``TransformerBlock``). No pipeline or context parallelism (refused on paper,
``bigpt.layout``): megatron-core 0.19's T5 cannot split the stacks over stages, as Megatron-LM's
``pretrain_t5.py`` refuses too.
"""

import dataclasses
from typing import NamedTuple

import torch
from megatron.core.models.T5 import t5_spec
from megatron.core.models.T5.t5_model import T5Model
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import get_attr_wrapped_model

from bigpt.data.batches import on_model_device
from bigpt.data.datasets import build_datasets
from bigpt.families.decoder import token_loss
from bigpt.families.spec import ModelFamily
from bigpt.hf.t5 import T5_FAMILIES
from bigpt.recipe import padded_vocab_size

DECODER_START_TOKEN = 0
"""T5's decoder_start_token_id (its pad id): what the decoder reads first when no decoder tokens are given."""


def config_fields(recipe, layout, use_te) -> dict:
    return {"softmax_scale": 1.0}  # T5 does not scale q·k by 1/sqrt(d_kv)


class _BiasedSoftmax(torch.nn.Module):
    """megatron-core's softmax over attention scores, with ``bias`` added to the scores first."""

    def __init__(self, softmax: torch.nn.Module):
        super().__init__()
        self.softmax = softmax
        self.bias: torch.Tensor | None = None

    def forward(self, scores, mask, softmax_offset=None):
        if self.bias is not None:
            scores = scores + self.bias
        return self.softmax(scores, mask, softmax_offset)


class RelativeBiasAttention(DotProductAttention):
    """megatron-core's local attention that adds an attention bias ([1 or b, heads of this rank, sq,
    sk], T5's relative position bias) to the scaled scores before the mask and softmax, where
    ``DotProductAttention`` refuses one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        softmax: torch.nn.Module = self.scale_mask_softmax  # type: ignore[has-type]
        self.scale_mask_softmax = _BiasedSoftmax(softmax)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, **kwargs):
        self.scale_mask_softmax.bias = attention_bias
        try:
            return super().forward(query, key, value, attention_mask, attn_mask_type, None, **kwargs)
        finally:
            self.scale_mask_softmax.bias = None  # hold no activation between calls


class Specs(NamedTuple):
    """The layer specs of the two stacks, and which attention masks they take."""

    encoder: ModuleSpec
    decoder: ModuleSpec
    transformer_engine: bool


def _with_core_attention(spec: ModuleSpec, attention_name: str, core_attention) -> ModuleSpec:
    layer = spec.submodules
    attention = getattr(layer, attention_name)
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=core_attention)
    )
    return dataclasses.replace(spec, submodules=dataclasses.replace(layer, **{attention_name: attention}))


def layer_spec(recipe, config, use_te, vp_stage) -> Specs:
    """megatron-core's T5 layer specs (not its block specs: see the module's docstring). Locally the
    self-attentions are ``RelativeBiasAttention``; Transformer Engine's attention takes a bias itself
    (untested on a GPU so far)."""
    if use_te:
        return Specs(
            t5_spec.encoder_model_with_transformer_engine_default_spec(),
            t5_spec.decoder_model_with_transformer_engine_default_spec(),
            transformer_engine=True,
        )
    return Specs(
        _with_core_attention(t5_spec.encoder_model_with_local_spec(), "self_attention", RelativeBiasAttention),
        _with_core_attention(t5_spec.decoder_model_with_local_spec(), "self_attention", RelativeBiasAttention),
        transformer_engine=False,
    )


def build_chunk(recipe, layout, config, specs, vp_stage):
    """``specs``: ``layer_spec``'s ``Specs``."""
    m = recipe.model
    chunk = T5Model(
        config=config,
        encoder_config=dataclasses.replace(config, num_layers=m.encoder_decoder.encoder_depth(m.num_layers)),
        transformer_encoder_layer_spec=specs.encoder,
        transformer_decoder_layer_spec=specs.decoder,
        vocab_size=padded_vocab_size(m, layout.tp),
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="relative",
        relative_attention_num_buckets=m.encoder_decoder.relative_attention_num_buckets,
        relative_attention_max_distance=m.encoder_decoder.relative_attention_max_distance,
    )
    chunk.cross_attention_masks_as_pairs = specs.transformer_engine
    if m.tie_embeddings:
        output_layer = chunk.lm_head.output_layer
        output_layer.bias = None  # T5's tied head has no bias (megatron-core's T5LMHead gives it one)
        scale = m.hidden_size**-0.5
        chunk.lm_head.register_forward_pre_hook(lambda head, args: (args[0] * scale, *args[1:]))
    return chunk


def attention_masks(model, enc_mask: torch.Tensor, dec_mask: torch.Tensor):
    """(encoder, decoder, encoder-decoder) attention masks, True where a query may not look, from the
    samples' padding masks ([b, s], 1 = a token, 0 = padding: positions, never token ids, so a
    decoder start or <unk> of id 0 is a token). A query attends to every unpadded key (padded queries
    too: their outputs carry no loss), the decoder's self-attention causally (its padding is at the
    end, after every token that counts)."""
    enc_padding = (enc_mask == 0)[:, None, None, :]  # [b, 1, 1, sk]: every query alike
    t5 = get_attr_wrapped_model(model, "cross_attention_masks_as_pairs", return_model_obj=True)
    if t5.cross_attention_masks_as_pairs:  # Transformer Engine's padding masks: (queries', keys')
        return enc_padding, None, ((dec_mask == 0)[:, None, None, :], enc_padding)
    return enc_padding, None, enc_padding


def forward_step(data_iterator, model):
    """megatron-core's ``forward_step_func``: the decoder's loss on its target tokens (loss_mask),
    summed, with their count, as the other families'."""
    batch = on_model_device(model, next(data_iterator))
    masks = attention_masks(model, batch["enc_mask"], batch["dec_mask"])
    output = model(batch["text_enc"], batch["text_dec"], *masks, lm_labels=batch["labels"])
    loss_mask = batch["loss_mask"]
    return output, lambda output_tensor: token_loss(loss_mask, output_tensor)


def logits(model, tokens: torch.Tensor, decoder_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's logits [1, decoder positions, vocab / tp] given the encoder's tokens and the
    decoder's (default: T5's decoder start token alone, the logits of the first target token)."""
    if decoder_tokens is None:
        decoder_tokens = torch.full((tokens.shape[0], 1), DECODER_START_TOKEN, device=tokens.device)
    return model(tokens, decoder_tokens, None, None, None)


ENCODER_DECODER = ModelFamily(
    name="encoder_decoder",
    model_class=T5Model,
    config_fields=config_fields,
    layer_spec=layer_spec,
    build_chunk=build_chunk,
    forward_step=forward_step,
    logits=logits,
    build_datasets=build_datasets,
    hf_model_types=tuple(T5_FAMILIES),
)
