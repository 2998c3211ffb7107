"""The one map between Hugging Face tensors (Llama, Mistral, Qwen2, Qwen3 share their names) and
megatron-core's global checkpoint tensors.

A bigpt checkpoint holds every parameter under its layout-independent global name (what
``GPTModel.sharded_state_dict()`` produces); per-layer parameters are stacked over a leading
layer axis, and the embedding and output layer may carry padding rows past the vocabulary.
Both directions of every rule live here, next to each other:

- ``linear_qkv.weight`` (and Qwen2's ``linear_qkv.bias``) is grouped by key/value head: for each
  group its query heads, then its key head, then its value head (``head_dim`` rows each);
- ``linear_fc1.weight`` is SwiGLU's [gate; up] (megatron's swiglu sharded factory makes the
  global tensor this concatenation whatever the tensor-parallel size);
- the norms before attention and MLP are stored under the Transformer Engine names
  (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``), on every spec;
- Qwen3's per-head ``q_norm``/``k_norm`` are ``q_layernorm``/``k_layernorm``: one head wide,
  the same on every tensor-parallel rank.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bigpt.hf.config import effective

LAYER = "{i}"  # the layer number in a Hugging Face name


@dataclass(frozen=True)
class Rule:
    key: str
    """The megatron-core global key."""
    hf_names: tuple[str, ...]
    """The Hugging Face tensors it is made of ({i} = layer number)."""
    hf_shapes: tuple[tuple[int, ...], ...]
    """Their shapes, from the config."""
    join: Callable[[list[torch.Tensor]], torch.Tensor]
    """Hugging Face tensors -> one layer's (or the whole) megatron tensor."""
    split: Callable[[torch.Tensor], list[torch.Tensor]]
    """The inverse."""

    @property
    def per_layer(self) -> bool:
        return LAYER in self.hf_names[0]

    def names(self, layer: int | None) -> list[str]:
        return [name.format(i=layer) for name in self.hf_names]


def _same(tensors):
    return tensors[0]


def _one(tensor):
    return [tensor]


def rules(model: dict, config: dict | None = None) -> list[Rule]:
    """Every tensor of the model described by ``model`` (the [model] table as a dict), in the
    Hugging Face form ``config`` (its config.json) describes; the embedding first."""
    if model.get("family") == "encoder":  # BERT, RoBERTa: bigpt/hf/bert.py
        from bigpt.hf import bert

        return bert.rules(model, config)
    hidden, ffn, vocab = model["hidden_size"], model["ffn_hidden_size"], model["vocab_size"]
    heads, groups, head_dim = (
        model["num_attention_heads"],
        effective(model, "num_query_groups"),
        effective(model, "kv_channels"),
    )
    per_group = heads // groups

    def join_qkv(tensors):  # weights [rows, hidden] or biases [rows]
        q, k, v = tensors
        rest = q.shape[1:]
        parts = (
            q.reshape(groups, per_group * head_dim, *rest),
            k.reshape(groups, head_dim, *rest),
            v.reshape(groups, head_dim, *rest),
        )
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def split_qkv(qkv):
        rest = qkv.shape[1:]
        q, k, v = qkv.reshape(groups, (per_group + 2) * head_dim, *rest).split(
            [per_group * head_dim, head_dim, head_dim], dim=1
        )
        return [part.reshape(-1, *rest) for part in (q, k, v)]

    qkv_rows = (heads * head_dim, groups * head_dim, groups * head_dim)

    def unpad(tensor):  # rows past the vocabulary are megatron's tensor-parallel padding
        return [tensor[:vocab]]

    layer = "model.layers.{i}."
    table = [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((vocab, hidden),), _same, unpad),
        Rule(
            "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
            (layer + "input_layernorm.weight",),
            ((hidden,),),
            _same,
            _one,
        ),
        Rule(
            "decoder.layers.self_attention.linear_qkv.weight",
            tuple(layer + f"self_attn.{p}_proj.weight" for p in "qkv"),
            tuple((rows, hidden) for rows in qkv_rows),
            join_qkv,
            split_qkv,
        ),
        Rule(
            "decoder.layers.self_attention.linear_proj.weight",
            (layer + "self_attn.o_proj.weight",),
            ((hidden, heads * head_dim),),
            _same,
            _one,
        ),
        Rule(
            "decoder.layers.mlp.linear_fc1.layer_norm_weight",
            (layer + "post_attention_layernorm.weight",),
            ((hidden,),),
            _same,
            _one,
        ),
        Rule(
            "decoder.layers.mlp.linear_fc1.weight",
            (layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"),
            ((ffn, hidden), (ffn, hidden)),
            torch.cat,
            lambda fc1: list(fc1.chunk(2)),
        ),
        Rule("decoder.layers.mlp.linear_fc2.weight", (layer + "mlp.down_proj.weight",), ((hidden, ffn),), _same, _one),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",), ((hidden,),), _same, _one),
    ]
    if effective(model, "add_qkv_bias"):
        table.insert(
            3,
            Rule(
                "decoder.layers.self_attention.linear_qkv.bias",
                tuple(layer + f"self_attn.{p}_proj.bias" for p in "qkv"),
                tuple((rows,) for rows in qkv_rows),
                join_qkv,
                split_qkv,
            ),
        )
    if effective(model, "qk_layernorm"):  # one weight per head width, shared by all heads
        table[3:3] = [
            Rule(
                f"decoder.layers.self_attention.{p}_layernorm.weight",
                (layer + f"self_attn.{p}_norm.weight",),
                ((head_dim,),),
                _same,
                _one,
            )
            for p in "qk"
        ]
    if not model["tie_embeddings"]:  # tied: the output layer *is* the embedding, stored once
        table.append(Rule("output_layer.weight", ("lm_head.weight",), ((vocab, hidden),), _same, unpad))
    return table


def expected_hf_shapes(model: dict, config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of the model (in the form ``config`` describes) and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in rules(model, config):
        for layer in range(model["num_layers"]) if rule.per_layer else [None]:
            shapes.update(zip(rule.names(layer), rule.hf_shapes))
    return shapes
