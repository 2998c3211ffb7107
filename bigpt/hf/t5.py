"""Hugging Face T5 and mT5 ⇄ the encoder-decoder family (model.family = "encoder_decoder",
bigpt/families/encoder_decoder.py): ``config.json`` ⇄ [model] + [model.encoder_decoder], and the
map of every tensor.

Imported and exported: ``T5ForConditionalGeneration`` (T5 v1.0: ReLU, tied embeddings, the decoder's
output scaled by d_model**-0.5; T5 v1.1 and FLAN-T5: gated GELU, untied, unscaled) and
``MT5ForConditionalGeneration`` (v1.1's architecture). What tells them apart:

- tying is in the weights: transformers 5 writes ``tie_word_embeddings = true`` into every T5
  config and unties only where the weights hold an ``lm_head.weight`` of their own;
- the output scaling is in the config: ``scale_decoder_outputs`` (transformers 5), else
  ``tie_word_embeddings`` (older releases: v1.1's false). mT5 never scales.
bigpt's family scales exactly when tied (as every released T5 does); a config whose scaling
disagrees with its weights' tying is refused by ``check_tying``, before the import writes anything.

What the family's megatron-core tensors hold:
- ``shared.weight`` is the word embedding (the stacks' ``embed_tokens`` are its copies);
- ``linear_qkv`` is q, k, v interleaved per head, cross-attention's ``linear_kv`` k, v per head;
- the relative position bias: Hugging Face keeps it in layer 0 of each stack
  (``block.0.layer.0.SelfAttention.relative_attention_bias``) and every layer uses it; megatron-core
  holds one per stack (``encoder_relative_pos_emb``, ``decoder_relative_pos_emb``);
- the gated MLP's ``linear_fc1`` is [wi_0; wi_1] (wi_0 through the activation).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from bigpt.errors import BigptError
from bigpt.hf.config import effective
from bigpt.hf.mapping import LAYER, Rule, _one, _same
from bigpt.recipe import ModelConfig


@dataclass(frozen=True)
class T5Family:
    """One Hugging Face T5 model type."""

    model_type: str
    architecture: str
    feed_forward_proj: str
    """Its config's default feed_forward_proj."""
    scales_output: bool
    """Its config decides whether the decoder's output is scaled (T5); False: never (mT5)."""


T5_FAMILIES = {
    family.model_type: family
    for family in (
        T5Family("t5", "T5ForConditionalGeneration", "relu", scales_output=True),
        T5Family("mt5", "MT5ForConditionalGeneration", "gated-gelu", scales_output=False),
    )
}
"""By ``model_type``; an export without a source config writes the first."""

REFUSED = {
    "umt5": "UMT5 learns a relative position bias in every layer, and megatron-core's T5Model holds one per "
    "stack (encoder and decoder), shared by all of its layers",
    "longt5": "LongT5's local and transient-global attention are not megatron-core's attention",
    "switch_transformers": "Switch Transformers' Mixture-of-Experts layers are not in bigpt's encoder-decoder, "
    "whose MLPs are dense",
}
"""T5-like model types refused by name, with why."""

MLPS = {(False, "relu"): "relu", (True, "gelu_new"): "geglu", (True, "gelu_pytorch_tanh"): "geglu"}
"""(is_gated_act, dense_act_fn), the MLP transformers builds → model.activation (geglu: the tanh GELU)."""
FEED_FORWARD_PROJ = {"relu": ("relu", "relu"), "geglu": ("gated-gelu", "gelu_new")}
"""model.activation → the feed_forward_proj and dense_act_fn an export writes."""

INPUT_LENGTH = 512
"""The inputs released T5 models were pretrained on (the model.toml of an import proposes it:
relative positions have no table that bounds the length)."""

SHARED = "shared.weight"
COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
"""The stacks' embeddings, which are ``shared``: some checkpoints store them too."""
HEAD = "lm_head.weight"
UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
"""What older checkpoints saved and transformers ignores: the cross-attention has no position bias."""

_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


def _refuse(source, problem: str, fix: str) -> NoReturn:
    raise BigptError(f"{source}: {problem}; {fix}.")


def is_t5(config: dict) -> bool:
    """Whether ``config`` is of a T5 model type, imported or refused here."""
    return config.get("model_type") in T5_FAMILIES or config.get("model_type") in REFUSED


def scales_output(config: dict) -> bool:
    """Whether transformers scales the decoder's output by d_model**-0.5 for ``config``."""
    if not T5_FAMILIES[config["model_type"]].scales_output:
        return False
    if "scale_decoder_outputs" in config:  # transformers 5
        return bool(config["scale_decoder_outputs"])
    return config.get("tie_word_embeddings", True) is not False


def model_from_hf(config: dict, source) -> dict:
    """The [model] keys (with its [model.encoder_decoder] table) of a T5 or mT5 ``config.json``.
    Tied exactly when the output is scaled: ``check_tying`` holds the weights to it."""
    model_type = config["model_type"]
    if model_type in REFUSED:
        _refuse(
            source,
            f"model_type {model_type!r} is not supported: {REFUSED[model_type]}",
            "bigpt cannot compute it identically, so it does not convert it",
        )
    family = T5_FAMILIES[model_type]
    architectures = config.get("architectures") or []
    if architectures not in ([], [family.architecture]):
        _refuse(
            source,
            f"architectures {architectures} is not supported",
            f"bigpt imports {family.architecture} (the encoder-decoder with its language-model head); the encoder "
            "alone and task heads (sequence or token classification, question answering) are not",
        )
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        _refuse(source, f"keys {missing} are missing", "a config.json of T5 names all of " + ", ".join(_REQUIRED))
    model = {
        "family": "encoder_decoder",
        "num_layers": config.get("num_decoder_layers") or config["num_layers"],
        "hidden_size": config["d_model"],
        "ffn_hidden_size": config["d_ff"],
        "num_attention_heads": config["num_heads"],
        "kv_channels": config["d_kv"],  # stated, as T5's config does (d_kv × num_heads may differ from d_model)
        "vocab_size": config["vocab_size"],
        "activation": _activation(config, family, source),
        "normalization": "rmsnorm",
        "norm_epsilon": config.get("layer_norm_epsilon", 1e-6),
        "position_embedding": "relative",
        "tie_embeddings": scales_output(config),
        "add_bias_linear": False,
        "encoder_decoder": {
            "encoder_layers": config["num_layers"],
            "relative_attention_num_buckets": config.get("relative_attention_num_buckets", 32),
            "relative_attention_max_distance": config.get("relative_attention_max_distance", 128),
        },
    }
    return model


def _activation(config: dict, family: T5Family, source) -> str:
    """model.activation for the MLP transformers builds from ``config``: feed_forward_proj, unless
    the saved dense_act_fn and is_gated_act (which transformers prefers) say otherwise."""
    feed_forward = config.get("feed_forward_proj", family.feed_forward_proj)
    gated = feed_forward.startswith("gated-")
    derived = "gelu_new" if feed_forward == "gated-gelu" else feed_forward.removeprefix("gated-")
    mlp = (config.get("is_gated_act", gated), config.get("dense_act_fn", derived))
    if mlp not in MLPS:
        spelled = f"feed_forward_proj = {feed_forward!r}" + (
            f" (dense_act_fn = {mlp[1]!r}, is_gated_act = {str(mlp[0]).lower()})" if mlp != (gated, derived) else ""
        )
        _refuse(
            source,
            f"{spelled} is not supported",
            "bigpt's encoder-decoder computes T5's 'relu' (v1.0) and 'gated-gelu' (v1.1, FLAN-T5, mT5: the tanh "
            "GELU, gelu_new) MLPs",
        )
    return MLPS[mlp]


def hf_from_model(model: ModelConfig, dtype: str, original: dict | None) -> dict:
    """A ``config.json`` for the encoder-decoder ``model``: of ``original``'s model type (T5
    without one) where it fits; keys of ``original`` that do not describe the architecture (token
    ids, task prefixes) are kept."""
    problems = [
        f"model.{key} = {value!r}"
        for key, value, wanted in (
            ("activation", model.activation, list(FEED_FORWARD_PROJ)),
            ("normalization", model.normalization, ["rmsnorm"]),
            ("position_embedding", model.position_embedding, ["relative"]),
            ("add_bias_linear", model.add_bias_linear, [False]),
            ("num_query_groups", model.num_query_groups or model.num_attention_heads, [model.num_attention_heads]),
            ("add_qkv_bias", model.add_qkv_bias, [False]),
            ("qk_layernorm", model.qk_layernorm, [False]),
        )
        if value not in wanted
    ]
    if problems:
        raise BigptError(
            f"an encoder-decoder checkpoint with {', '.join(problems)} has no Hugging Face T5 form (ReLU or gated "
            "GELU, RMSNorm, relative position bias, no biases, multi-head attention); keep training it as a "
            "bigpt checkpoint"
        )
    family = T5_FAMILIES.get((original or {}).get("model_type", ""), T5_FAMILIES["t5"])
    if model.tie_embeddings and not family.scales_output:
        family = T5_FAMILIES["t5"]  # mT5 is untied; a tied model is T5 v1.0's form
    stacks = effective(vars(model), "encoder_decoder")
    feed_forward, activation = FEED_FORWARD_PROJ[model.activation]
    stale = ("torch_dtype", "architectures", "model_type", "dense_act_fn", "is_gated_act")
    config = {k: v for k, v in (original or {}).items() if k not in stale}
    config.setdefault("pad_token_id", 0)
    config.setdefault("eos_token_id", 1)
    config.setdefault("decoder_start_token_id", config["pad_token_id"])
    config.update(
        architectures=[family.architecture],
        model_type=family.model_type,
        vocab_size=model.vocab_size,
        d_model=model.hidden_size,
        d_kv=model.kv_channels or model.hidden_size // model.num_attention_heads,
        d_ff=model.ffn_hidden_size,
        num_layers=stacks["encoder_layers"],
        num_decoder_layers=model.num_layers,
        num_heads=model.num_attention_heads,
        relative_attention_num_buckets=stacks["relative_attention_num_buckets"],
        relative_attention_max_distance=stacks["relative_attention_max_distance"],
        layer_norm_epsilon=model.norm_epsilon,
        feed_forward_proj=feed_forward,
        dense_act_fn=activation,
        is_gated_act=feed_forward.startswith("gated-"),
        is_encoder_decoder=True,
        # older transformers read both from tie_word_embeddings, transformers 5 the scaling from its own key
        tie_word_embeddings=model.tie_embeddings,
        scale_decoder_outputs=model.tie_embeddings,
        dtype=dtype,
    )
    if not family.scales_output:
        del config["scale_decoder_outputs"]
    return config


# ------------------------------------------------------------------ tensors
def rules(model: dict, config: dict | None) -> list[Rule]:
    """Every tensor of the encoder-decoder ``model`` (the [model] table as a dict) in the Hugging Face
    form ``config`` describes (None: a T5ForConditionalGeneration). The word embedding comes first."""
    stacks = effective(model, "encoder_decoder")  # encoder_layers resolved
    hidden, ffn, vocab = model["hidden_size"], model["ffn_hidden_size"], model["vocab_size"]
    heads = model["num_attention_heads"]
    head_dim = model.get("kv_channels") or hidden // heads
    width = heads * head_dim
    gated = model["activation"] != "relu"

    def per_head(*tensors):  # [heads × head_dim, hidden] each → per head, one after the other
        return torch.cat([t.reshape(heads, head_dim, -1) for t in tensors], dim=1).reshape(-1, hidden)

    def split_per_head(count):
        return lambda joined: [
            part.reshape(width, hidden) for part in joined.reshape(heads, count, head_dim, -1).unbind(1)
        ]

    def unpad(tensor):  # rows past the vocabulary are megatron's tensor-parallel padding
        return [tensor[:vocab]]

    table = [Rule("embedding.word_embeddings.weight", (SHARED,), ((vocab, hidden),), _same, unpad)]
    for stack, layers in (("encoder", stacks["encoder_layers"]), ("decoder", model["num_layers"])):
        block = f"{stack}.block.{LAYER}.layer."
        mlp = 2 if stack == "decoder" else 1
        where = {"layers": tuple(range(layers))}

        def rule(key, names, shapes, join=_same, split=_one, stack=stack, where=where):
            return Rule(f"{stack}.layers.{key}", names, shapes, join, split, **where)

        table += [
            rule("self_attention.linear_qkv.layer_norm_weight", (block + "0.layer_norm.weight",), ((hidden,),)),
            rule(
                "self_attention.linear_qkv.weight",
                tuple(block + f"0.SelfAttention.{p}.weight" for p in "qkv"),
                ((width, hidden),) * 3,
                lambda tensors: per_head(*tensors),
                split_per_head(3),
            ),
            rule("self_attention.linear_proj.weight", (block + "0.SelfAttention.o.weight",), ((hidden, width),)),
        ]
        if stack == "decoder":
            table += [
                rule("pre_cross_attn_layernorm.weight", (block + "1.layer_norm.weight",), ((hidden,),)),
                rule("cross_attention.linear_q.weight", (block + "1.EncDecAttention.q.weight",), ((width, hidden),)),
                rule(
                    "cross_attention.linear_kv.weight",
                    tuple(block + f"1.EncDecAttention.{p}.weight" for p in "kv"),
                    ((width, hidden),) * 2,
                    lambda tensors: per_head(*tensors),
                    split_per_head(2),
                ),
                rule("cross_attention.linear_proj.weight", (block + "1.EncDecAttention.o.weight",), ((hidden, width),)),
            ]
        dense = f"{block}{mlp}.DenseReluDense."
        table += [
            rule("mlp.linear_fc1.layer_norm_weight", (f"{block}{mlp}.layer_norm.weight",), ((hidden,),)),
            rule(
                "mlp.linear_fc1.weight",
                (dense + "wi_0.weight", dense + "wi_1.weight") if gated else (dense + "wi.weight",),
                ((ffn, hidden),) * (2 if gated else 1),
                torch.cat,
                lambda fc1: list(fc1.chunk(2)) if gated else [fc1],
            ),
            rule("mlp.linear_fc2.weight", (dense + "wo.weight",), ((hidden, ffn),)),
            Rule(f"{stack}.final_layernorm.weight", (f"{stack}.final_layer_norm.weight",), ((hidden,),), _same, _one),
            Rule(
                f"{stack}_relative_pos_emb.relative_attention_bias.weight",
                (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
                ((stacks["relative_attention_num_buckets"], heads),),
                _same,
                _one,
            ),
        ]
    if not model["tie_embeddings"]:  # saved once (bigpt.runtime.megatron_fixes: T5's output layer)
        table.append(Rule("output_layer.weight", (HEAD,), ((vocab, hidden),), _same, unpad))
    return table


_ONE_MIXTURE = (
    "bigpt's encoder-decoder scales its output exactly when it is tied, as every released T5 does, so it cannot "
    "compute this mixture identically"
)


def check_tying(directory: Path, weights, model: dict, config: dict) -> None:
    """Hold ``weights`` (``SafetensorsWeights``) to the tying ``model`` read from ``config``, as
    transformers 5 reads it (an ``lm_head.weight`` that differs from ``shared.weight`` unties); drop
    the copies of the embedding some checkpoints store, refusing copies that differ; note the tensors
    transformers ignores too."""
    for copy in COPIES:
        if copy in weights.files and not weights.rows_equal(copy, SHARED):
            _refuse(
                directory,
                f"{copy} differs from {SHARED}, which T5 uses for both stacks' embeddings",
                "the weights are damaged or not a T5's: save them again with transformers (from_pretrained, "
                "then save_pretrained)",
            )
    untied = HEAD in weights.files and not weights.rows_equal(HEAD, SHARED)
    if model["tie_embeddings"] and untied:
        _refuse(
            directory,
            f"config.json scales the decoder's output by d_model**-0.5 (as T5 v1.0 does: "
            f"{_scaling_keys(config)}) but {HEAD} differs from {SHARED}, an output layer of its own (as T5 v1.1 "
            "has, unscaled)",
            _ONE_MIXTURE,
        )
    if not model["tie_embeddings"] and HEAD not in weights.files:
        _refuse(
            directory,
            f"config.json leaves the decoder's output unscaled ({_scaling_keys(config)}), as T5 v1.1 does, but the "
            f"weights hold no {HEAD}, so transformers ties it to {SHARED}",
            _ONE_MIXTURE,
        )
    weights.left_out = sorted(name for name in weights.files if name in UNUSED)
    weights.left_out_why = "that T5's cross-attention does not use (transformers ignores them too)"
    for name in [*COPIES, *([HEAD] if model["tie_embeddings"] else []), *weights.left_out]:
        weights.files.pop(name, None)


def _scaling_keys(config: dict) -> str:
    keys = [
        f"{key} = {str(config[key]).lower()}"
        for key in ("scale_decoder_outputs", "tie_word_embeddings")
        if key in config
    ]
    return ", ".join(keys) or f"model_type {config['model_type']!r}"
