"""Hugging Face BERT and RoBERTa ⇄ the masked-LM encoder family (model.family = "encoder",
bigpt/families/encoder.py): ``config.json`` ⇄ [model] + [model.encoder], and the map of every tensor.

Imported: ``BertForMaskedLM``, ``RobertaForMaskedLM`` and ``BertModel`` (no masked-LM head: the
head starts as transformers initialises one, and the import says so). Exported: the masked-LM
class of the family the weights came from (``BertForMaskedLM`` for an encoder trained from scratch,
whose positions start at 0 as BERT's do). What the encoder's megatron-core tensors hold:

- post-LN's norms one position later (bigpt/families/encoder.py): layer i's input norm is
  ``embeddings.LayerNorm`` (i = 0) or layer i-1's ``output.LayerNorm``, its pre-MLP norm is its
  ``attention.output.LayerNorm``, the final norm the last layer's ``output.LayerNorm``;
- ``linear_qkv`` (weight and bias) is q, k, v interleaved per head;
- RoBERTa numbers the positions of real tokens from ``pad_token_id + 1`` (2): its position table
  is stored rotated by that many rows, so that row 0 is the first token's, as megatron-core
  counts, and the rows it never uses for real tokens (0 and the padding row) follow the last,
  for an exact round trip; its one token-type row is kept as ``model.encoder.token_types = 1``;
- the masked-LM head: transform dense + LayerNorm (``lm_head.dense``, ``lm_head.layer_norm``),
  the decoder tied to the word embeddings (untied: ``output_layer.weight``) and its bias
  (``output_layer.bias``).

The pooler and the next-sentence head of a released checkpoint are not used by masked-LM
training: they are left out, and the import says so.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch

from bigpt.errors import BigptError
from bigpt.hf.config import effective
from bigpt.hf.mapping import LAYER, Rule, _one, _same
from bigpt.recipe import ModelConfig


@dataclass(frozen=True)
class EncoderFamily:
    """One Hugging Face encoder model type."""

    model_type: str
    masked_lm: str
    """Its masked-LM class, which an export writes."""
    prefix: str
    """The module its masked-LM class holds the encoder in (``bert.``)."""
    head: str
    """The module of its masked-LM head (transform, decoder and bias)."""
    bare: str | None = None
    """Its class without a head (imported; the head then starts fresh)."""
    rotates_positions: bool = False
    """Its position ids start at pad_token_id + 1 (RoBERTa)."""


ENCODER_FAMILIES = {
    family.model_type: family
    for family in (
        EncoderFamily("bert", "BertForMaskedLM", "bert.", "cls.predictions.", bare="BertModel"),
        EncoderFamily("roberta", "RobertaForMaskedLM", "roberta.", "lm_head.", rotates_positions=True),
    )
}
"""By ``model_type``; an export without a source config writes the first."""

HEAD_NAMES = {  # BERT's head module names, RoBERTa's where they differ
    "cls.predictions.": ("transform.dense", "transform.LayerNorm", "bias"),
    "lm_head.": ("dense", "layer_norm", "bias"),
}
UNUSED = ("pooler.", "cls.seq_relationship.")
"""Modules of released checkpoints that masked-LM training does not use (left out on import)."""
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
"""Buffers some checkpoints saved next to the weights; recomputed, not loaded."""


def _refuse(source, problem: str, fix: str) -> NoReturn:
    raise BigptError(f"{source}: {problem}; {fix}.")


def family_of_config(config: dict, source) -> EncoderFamily:
    family = ENCODER_FAMILIES[config["model_type"]]
    architectures = config.get("architectures") or []
    if architectures not in ([], [family.masked_lm], [family.bare]):
        offered = " or ".join(name for name in (family.masked_lm, family.bare) if name)
        _refuse(
            source,
            f"architectures {architectures} is not supported",
            f"bigpt imports {offered} of model_type {family.model_type!r} (a masked-LM encoder); task heads "
            "(sequence or token classification, question answering) are not",
        )
    return family


def has_head(config: dict) -> bool:
    """Whether the weights of ``config`` include the masked-LM head (not a ``BertModel``)."""
    family = ENCODER_FAMILIES[config["model_type"]]
    return (config.get("architectures") or [family.masked_lm]) != [family.bare]


def position_offset(config: dict) -> int:
    """How many rows RoBERTa's position table holds before the first token's."""
    family = ENCODER_FAMILIES[config["model_type"]]
    return config.get("pad_token_id", 1) + 1 if family.rotates_positions else 0


_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def model_from_hf(config: dict, source) -> dict:
    """The [model] keys (with its [model.encoder] table) of a BERT or RoBERTa ``config.json``."""
    family_of_config(config, source)
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        _refuse(
            source,
            f"keys {missing} are missing",
            "a config.json of these families names all of " + ", ".join(_REQUIRED),
        )
    if config.get("hidden_act", "gelu") != "gelu":
        _refuse(source, f"hidden_act = {config['hidden_act']!r}", "bigpt's encoder MLP is GELU (exact, 'gelu')")
    if (config.get("position_embedding_type") or "absolute") != "absolute":
        _refuse(
            source,
            f"position_embedding_type = {config['position_embedding_type']!r} is not supported",
            "bigpt's encoder learns absolute positions, as BERT and RoBERTa do",
        )
    if config.get("is_decoder") or config.get("add_cross_attention"):
        _refuse(source, "is_decoder / add_cross_attention = true", "bigpt imports encoders only")
    offset = position_offset(config)
    positions = config.get("max_position_embeddings", 512)
    if positions <= offset:
        _refuse(
            source,
            f"max_position_embeddings = {positions} leaves no position for a token",
            "the config is inconsistent",
        )
    return {
        "family": "encoder",
        "num_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "ffn_hidden_size": config["intermediate_size"],
        "num_attention_heads": config["num_attention_heads"],
        "vocab_size": config["vocab_size"],
        "activation": "gelu",
        "normalization": "layernorm",
        "norm_epsilon": config.get("layer_norm_eps", 1e-12),
        "position_embedding": "learned",
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        "add_bias_linear": True,
        "max_position_embeddings": positions,
        "encoder": {"norm_position": "post", "token_types": config.get("type_vocab_size", 2)},
    }


def usable_positions(model: dict, config: dict) -> int:
    """Positions a sequence may use (of any family's ``config``): RoBERTa's table has
    pad_token_id + 1 rows for none."""
    encoder = config.get("model_type") in ENCODER_FAMILIES
    return model["max_position_embeddings"] - (position_offset(config) if encoder else 0)


def hf_from_model(model: ModelConfig, dtype: str, original: dict | None) -> dict:
    """A ``config.json`` for the encoder ``model``: the masked-LM class of ``original``'s family
    (BERT without one); keys of ``original`` that do not describe the architecture are kept."""
    encoder = effective(vars(model), "encoder")  # a table, or a dict where read from a model.toml
    problems = [
        f"model.{key} = {value!r}"
        for key, value, wanted in (
            ("activation", model.activation, "gelu"),
            ("normalization", model.normalization, "layernorm"),
            ("position_embedding", model.position_embedding, "learned"),
            ("add_bias_linear", model.add_bias_linear, True),
            ("encoder.norm_position", encoder["norm_position"], "post"),
            ("num_query_groups", model.num_query_groups or model.num_attention_heads, model.num_attention_heads),
            (
                "kv_channels",
                model.kv_channels or model.hidden_size // model.num_attention_heads,
                model.hidden_size // model.num_attention_heads,
            ),
            ("add_qkv_bias", model.add_qkv_bias, False),
        )
        if value != wanted
    ]
    if encoder["token_types"] == 0:
        problems.append("model.encoder.token_types = 0")
    if problems:
        raise BigptError(
            f"an encoder checkpoint with {', '.join(problems)} has no Hugging Face BERT or RoBERTa form (post-LN, "
            "GELU, LayerNorm, learned positions, biases, multi-head attention, at least one token type); keep "
            "training it as a bigpt checkpoint"
        )
    family = ENCODER_FAMILIES.get((original or {}).get("model_type", ""), ENCODER_FAMILIES["bert"])
    stale = ("torch_dtype", "architectures", "model_type", "position_embedding_type", "quantization_config")
    config = {k: v for k, v in (original or {}).items() if k not in stale}
    config.update(
        architectures=[family.masked_lm],
        model_type=family.model_type,
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        intermediate_size=model.ffn_hidden_size,
        hidden_act="gelu",
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        type_vocab_size=encoder["token_types"],
        layer_norm_eps=model.norm_epsilon,
        tie_word_embeddings=model.tie_embeddings,
        dtype=dtype,
    )
    return config


# ------------------------------------------------------------------ tensors
@dataclass(frozen=True)
class _NamedBy(Rule):
    """A rule whose Hugging Face names are not one template per layer (post-LN's shifted norms)."""

    name_of: Callable[[int | None], list[str]] = lambda layer: []
    """(layer) -> its Hugging Face names."""

    def names(self, layer: int | None, expert: int | None = None) -> list[str]:
        return self.name_of(layer)


def rules(model: dict, config: dict | None) -> list[Rule]:
    """Every tensor of the encoder ``model`` (the [model] table as a dict) in the Hugging Face form
    ``config`` describes (None: a BertForMaskedLM). The word embedding comes first."""
    config = config or {"model_type": "bert"}
    family = ENCODER_FAMILIES[config["model_type"]]
    hidden, ffn, vocab = model["hidden_size"], model["ffn_hidden_size"], model["vocab_size"]
    heads, layers = model["num_attention_heads"], model["num_layers"]
    token_types = effective(model, "encoder")["token_types"]
    head = has_head(config)
    prefix = family.prefix if head else ""
    layer = prefix + "encoder.layer.{i}."
    offset = position_offset(config)

    def join_qkv(tensors):  # [q; k; v] of each head in turn
        return torch.cat([t.reshape(heads, -1, *t.shape[1:]) for t in tensors], dim=1).reshape(
            -1, *tensors[0].shape[1:]
        )

    def split_qkv(qkv):
        return [part.reshape(-1, *qkv.shape[1:]) for part in qkv.reshape(heads, 3, -1, *qkv.shape[1:]).unbind(1)]

    def unpad(tensor):  # rows past the vocabulary are megatron's tensor-parallel padding
        return [tensor[:vocab]]

    def input_norm(kind):
        return lambda i: [
            f"{prefix}embeddings.LayerNorm.{kind}" if i == 0 else layer.format(i=i - 1) + f"output.LayerNorm.{kind}"
        ]

    table: list[Rule] = [
        Rule(
            "embedding.word_embeddings.weight",
            (prefix + "embeddings.word_embeddings.weight",),
            ((vocab, hidden),),
            _same,
            unpad,
        )
    ]
    for kind in ("weight", "bias"):
        vector = kind == "bias"
        table += [
            _NamedBy(
                f"encoder.layers.self_attention.linear_qkv.layer_norm_{kind}",
                (LAYER,),  # per layer; the names come from name_of
                ((hidden,),),
                _same,
                _one,
                name_of=input_norm(kind),
            ),
            Rule(
                f"encoder.layers.self_attention.linear_qkv.{kind}",
                tuple(layer + f"attention.self.{p}.{kind}" for p in ("query", "key", "value")),
                ((hidden,),) * 3 if vector else ((hidden, hidden),) * 3,
                join_qkv,
                split_qkv,
            ),
            Rule(
                f"encoder.layers.self_attention.linear_proj.{kind}",
                (layer + f"attention.output.dense.{kind}",),
                ((hidden,),) if vector else ((hidden, hidden),),
                _same,
                _one,
            ),
            Rule(
                f"encoder.layers.mlp.linear_fc1.layer_norm_{kind}",
                (layer + f"attention.output.LayerNorm.{kind}",),
                ((hidden,),),
                _same,
                _one,
            ),
            Rule(
                f"encoder.layers.mlp.linear_fc1.{kind}",
                (layer + f"intermediate.dense.{kind}",),
                ((ffn,),) if vector else ((ffn, hidden),),
                _same,
                _one,
            ),
            Rule(
                f"encoder.layers.mlp.linear_fc2.{kind}",
                (layer + f"output.dense.{kind}",),
                ((hidden,),) if vector else ((hidden, ffn),),
                _same,
                _one,
            ),
            Rule(
                f"encoder.final_layernorm.{kind}",
                (layer.format(i=layers - 1) + f"output.LayerNorm.{kind}",),
                ((hidden,),),
                _same,
                _one,
            ),
        ]
    table.append(
        Rule(
            "embedding.position_embeddings.weight",
            (prefix + "embeddings.position_embeddings.weight",),
            ((model["max_position_embeddings"], hidden),),
            lambda tensors: tensors[0].roll(-offset, 0),
            lambda tensor: [tensor.roll(offset, 0)],
        )
    )
    if token_types:
        table.append(
            Rule(
                "embedding.tokentype_embeddings.weight",
                (prefix + "embeddings.token_type_embeddings.weight",),
                ((token_types, hidden),),
                _same,
                _one,
            )
        )
    table += _head_rules(family, head, config, hidden, vocab)
    if not model["tie_embeddings"]:
        decoder = (family.head + "decoder.weight",) if head else ()
        shapes = ((vocab, hidden),) if head else ()
        table.append(
            _NamedBy(
                "output_layer.weight",
                ("",),
                shapes,
                _same if head else _fresh(config, (vocab, hidden)),
                unpad,
                name_of=lambda layer: list(decoder),
            )
        )
    return table


def _fresh(config: dict, shape, value: float | None = None):
    """A join that makes the tensor as transformers initialises it (weights normal with the
    config's initializer_range, norm weights ``value`` 1, biases ``value`` 0), for a head the
    weights lack; seeded, so every rank makes the same."""

    def make(_tensors):
        if value is not None:
            return torch.full(shape, value)
        generator = torch.Generator().manual_seed(len(shape) * 1_000_003 + shape[0])
        return torch.empty(shape).normal_(0.0, config.get("initializer_range", 0.02), generator=generator)

    return make


def _head_rules(family: EncoderFamily, head: bool, config: dict, hidden: int, vocab: int) -> list[Rule]:
    """The masked-LM head; without one in the weights (BertModel), rules that make it fresh."""
    dense, norm, bias = (family.head + name for name in HEAD_NAMES[family.head])
    parts = (
        ("lm_head.dense.weight", dense + ".weight", (hidden, hidden), None),
        ("lm_head.dense.bias", dense + ".bias", (hidden,), 0.0),
        ("lm_head.layer_norm.weight", norm + ".weight", (hidden,), 1.0),
        ("lm_head.layer_norm.bias", norm + ".bias", (hidden,), 0.0),
        ("output_layer.bias", bias, (vocab,), 0.0),
    )
    if head:
        return [
            Rule(key, (name,), (shape,), _same, (lambda t: [t[:vocab]]) if key == "output_layer.bias" else _one)
            for key, name, shape, _ in parts
        ]
    return [  # no Hugging Face tensors: made on import, left out of nothing on export
        _NamedBy(key, ("",), (), _fresh(config, shape, value), lambda tensor: [], name_of=lambda layer: [])
        for key, _, shape, value in parts
    ]


def fresh_head_note(config: dict, source) -> str | None:
    """What an import says when the weights have no masked-LM head (None: they have one, or are
    not an encoder's)."""
    if config.get("model_type") not in ENCODER_FAMILIES or has_head(config):
        return None
    family = ENCODER_FAMILIES[config["model_type"]]
    return (
        f"{source} is a {family.bare} (no masked-LM head): the head (transform dense, LayerNorm and output bias; "
        "the decoder is tied to the word embeddings) starts fresh, initialised as transformers initialises "
        f"one; an export writes {family.masked_lm} with the head trained"
    )


def left_out(names, config: dict) -> list[str]:
    """The tensors of ``names`` that masked-LM training does not use (the pooler, the next-sentence
    head): the import leaves them out and says so."""
    return sorted(name for name in names if any(part in name for part in UNUSED))


def redundant(names, config: dict) -> list[str]:
    """Tensors of ``names`` that repeat others (the tied decoder's copy of the word embeddings, its
    bias's copy of the head's bias) or are buffers; dropped without a word."""
    family = ENCODER_FAMILIES[config["model_type"]]
    copies = [family.head + "decoder.bias"]
    if config.get("tie_word_embeddings", True):
        copies.append(family.head + "decoder.weight")
    return sorted(name for name in names if name in copies or name.endswith(BUFFERS))


def current_names(names) -> dict[str, str]:
    """{name in the file: transformers' name} for the LayerNorm ``gamma``/``beta`` of checkpoints
    saved before transformers named them ``weight``/``bias`` (bert-base-uncased's)."""
    old = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
    return {name: name.replace(suffix, new) for name in names for suffix, new in old.items() if name.endswith(suffix)}
