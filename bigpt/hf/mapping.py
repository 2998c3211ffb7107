"""The one map between Hugging Face tensors (Llama, Mistral, Qwen2, Qwen3 share their names; the
MoE families share them but for their experts) and megatron-core's global checkpoint tensors.

A bigpt checkpoint holds every parameter under its layout-independent global name (what
``GPTModel.sharded_state_dict()`` produces); per-layer parameters are stacked over a leading
layer axis (an MoE model's layers differ, so megatron-core keys them by layer number instead:
``decoder.layers.3.…``), and the embedding and output layer may carry padding rows past the
vocabulary.
Both directions of every rule live here, next to each other:

- ``linear_qkv.weight`` (and Qwen2's ``linear_qkv.bias``) is grouped by key/value head: for each
  group its query heads, then its key head, then its value head (``head_dim`` rows each);
- ``linear_fc1.weight`` is SwiGLU's [gate; up] (megatron's swiglu sharded factory makes the
  global tensor this concatenation whatever the tensor-parallel size);
- the norms before attention and MLP are stored under the Transformer Engine names
  (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``), on every spec;
- Qwen3's per-head ``q_norm``/``k_norm`` are ``q_layernorm``/``k_layernorm``: one head wide,
  the same on every tensor-parallel rank;
- an MoE layer's experts are one tensor per projection with a leading expert axis
  (``mlp.experts.experts.linear_fc1.weight``: [experts, 2 × width, hidden], whatever the expert
  parallel size), one Hugging Face tensor per expert written into each slice; the router is
  ``mlp.router.weight``, Qwen2-MoE's shared expert ``mlp.shared_experts.*`` with its
  ``gate_weight``; DeepSeek-V3's ``e_score_correction_bias`` is the router's ``expert_bias`` and
  its shared experts ``mlp.shared_experts.*``, ungated;
- multi-latent attention (DeepSeek-V3) is megatron-core's MLA tensors, one for one: the latents'
  norms under Transformer Engine's names (``linear_q_up_proj.layer_norm_weight``,
  ``linear_kv_up_proj.layer_norm_weight``), the norm before attention as ``input_layernorm`` and an
  MoE layer's before the MLP as ``pre_mlp_layernorm`` (Transformer Engine fuses neither); the down
  projections produce the latents (the key/value one also the rotary key, after the latent:
  megatron-core and DeepSeek split it alike), and the up projections each head's parts in
  DeepSeek's order (query: without, then with RoPE; key/value: key, then value).
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bigpt.hf.config import effective, export_family
from bigpt.hf.moe import Experts

LAYER = "{i}"  # the layer number in a Hugging Face name (and in an MoE model's megatron keys)
EXPERT = "{e}"  # the expert number in a Hugging Face name
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")  # a dense MLP's projections (mlp.*), in every family


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
    layers: tuple[int, ...] | None = None
    """The layers that have this tensor (None: every layer); an MoE model's dense and MoE layers differ."""
    experts: int = 0
    """One Hugging Face tensor per expert ({e} in hf_names): the megatron tensor has a leading
    expert axis of this size."""

    @property
    def per_layer(self) -> bool:
        return LAYER in self.hf_names[0]

    def names(self, layer: int | None, expert: int | None = None) -> list[str]:
        return [name.format(i=layer, e=expert) for name in self.hf_names]

    def checkpoint_key(self, layer: int | None) -> str:
        """The megatron-core key of ``layer``'s tensor."""
        return self.key.format(i=layer)

    def instances(self, num_layers: int) -> list[tuple[int | None, int | None]]:
        """(layer, expert) of every tensor this rule makes, in Hugging Face's order."""
        layers = (self.layers if self.layers is not None else range(num_layers)) if self.per_layer else [None]
        return [(layer, expert) for layer in layers for expert in (range(self.experts) if self.experts else [None])]


def _same(tensors):
    return tensors[0]


def _one(tensor):
    return [tensor]


def _gated_mlp(key: str, hf: str, names: tuple[str, str, str], ffn: int, hidden: int, **where) -> list[Rule]:
    """A SwiGLU MLP's two megatron tensors (``key``.linear_fc1/linear_fc2) from its gate, up and
    down projections ``names`` (``hf``.<name>.weight); ``where``: Rule's layers and experts."""
    gate, up, down = (f"{hf}.{name}.weight" for name in names)
    return [
        Rule(
            f"{key}.linear_fc1.weight",
            (gate, up),
            ((ffn, hidden), (ffn, hidden)),
            torch.cat,
            lambda fc1: list(fc1.chunk(2)),
            **where,
        ),
        Rule(f"{key}.linear_fc2.weight", (down,), ((hidden, ffn),), _same, _one, **where),
    ]


def _moe_mlps(model: dict, experts: Experts, stack: str, layer: str) -> list[Rule]:
    """The MLP tensors of an MoE model: megatron-core's MoE layer, or a dense MLP in the other layers."""
    hidden, moe = model["hidden_size"], effective(model, "moe")
    sparse = tuple(i for i, is_moe in enumerate(moe["layers"]) if is_moe)
    dense = tuple(i for i, is_moe in enumerate(moe["layers"]) if not is_moe)
    block = f"{layer}{experts.block}"
    table = _gated_mlp(f"{stack}mlp", layer + "mlp", DENSE_MLP, model["ffn_hidden_size"], hidden, layers=dense)
    table += [
        Rule(
            f"{stack}mlp.router.weight",
            (f"{block}.gate.weight",),
            ((moe["num_experts"], hidden),),
            _same,
            _one,
            layers=sparse,
        ),
        *_gated_mlp(
            f"{stack}mlp.experts.experts",
            f"{block}.experts.{EXPERT}",
            experts.projections,
            moe["ffn_hidden_size"],
            hidden,
            layers=sparse,
            experts=moe["num_experts"],
        ),
    ]
    if experts.deepseek_router:
        table.append(
            Rule(
                f"{stack}mlp.router.expert_bias",
                (f"{block}.gate.e_score_correction_bias",),
                ((moe["num_experts"],),),
                _same,
                _one,
                layers=sparse,
            )
        )
        if moe["shared_expert_ffn_hidden_size"]:
            table += _gated_mlp(
                f"{stack}mlp.shared_experts",
                f"{block}.shared_experts",
                DENSE_MLP,
                moe["shared_expert_ffn_hidden_size"],
                hidden,
                layers=sparse,
            )
    if experts.shared_expert:
        shared = moe["shared_expert_ffn_hidden_size"]
        table += _gated_mlp(
            f"{stack}mlp.shared_experts", f"{block}.shared_expert", DENSE_MLP, shared, hidden, layers=sparse
        )
        table.append(
            Rule(
                f"{stack}mlp.shared_experts.gate_weight",
                (f"{block}.shared_expert_gate.weight",),
                ((1, hidden),),
                _same,
                _one,
                layers=sparse,
            )
        )
    return table


def _attention(model: dict, stack: str, layer: str) -> list[Rule]:
    """The tensors of grouped-query attention, but its output projection."""
    hidden, heads, groups, head_dim = (
        model["hidden_size"],
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
    table = [
        Rule(
            stack + "self_attention.linear_qkv.weight",
            tuple(layer + f"self_attn.{p}_proj.weight" for p in "qkv"),
            tuple((rows, hidden) for rows in qkv_rows),
            join_qkv,
            split_qkv,
        )
    ]
    if effective(model, "qk_layernorm"):  # one weight per head width, shared by all heads
        table += [
            Rule(
                stack + f"self_attention.{p}_layernorm.weight",
                (layer + f"self_attn.{p}_norm.weight",),
                ((head_dim,),),
                _same,
                _one,
            )
            for p in "qk"
        ]
    if effective(model, "add_qkv_bias"):
        table.append(
            Rule(
                stack + "self_attention.linear_qkv.bias",
                tuple(layer + f"self_attn.{p}_proj.bias" for p in "qkv"),
                tuple((rows,) for rows in qkv_rows),
                join_qkv,
                split_qkv,
            )
        )
    return table


def _latent_attention(model: dict, stack: str, layer: str) -> list[Rule]:
    """The tensors of multi-latent attention ([model.mla]), but its output projection."""
    hidden, heads, mla = model["hidden_size"], model["num_attention_heads"], effective(model, "mla")
    q_width = heads * (mla["qk_head_dim"] + mla["qk_pos_emb_head_dim"])
    attention, hf = stack + "self_attention.", layer + "self_attn."
    q_lora, kv_lora = mla["q_lora_rank"], mla["kv_lora_rank"]
    pairs = [  # (megatron name, Hugging Face name, shape)
        *(
            [
                ("linear_q_down_proj.weight", "q_a_proj.weight", (q_lora, hidden)),
                ("linear_q_up_proj.layer_norm_weight", "q_a_layernorm.weight", (q_lora,)),
                ("linear_q_up_proj.weight", "q_b_proj.weight", (q_width, q_lora)),
            ]
            if q_lora
            else [("linear_q_proj.weight", "q_proj.weight", (q_width, hidden))]
        ),
        ("linear_kv_down_proj.weight", "kv_a_proj_with_mqa.weight", (kv_lora + mla["qk_pos_emb_head_dim"], hidden)),
        ("linear_kv_up_proj.layer_norm_weight", "kv_a_layernorm.weight", (kv_lora,)),
        ("linear_kv_up_proj.weight", "kv_b_proj.weight", (heads * (mla["qk_head_dim"] + mla["v_head_dim"]), kv_lora)),
    ]
    return [Rule(attention + key, (hf + name,), (shape,), _same, _one) for key, name, shape in pairs]


def experts_of(model: dict) -> Experts:
    """The Hugging Face form of an MoE model's experts: of the one MoE family that expresses it."""
    experts = export_family(model, None).experts
    assert experts is not None  # the family of an MoE model
    return experts


def rules(model: dict, config: dict | None = None) -> list[Rule]:
    """Every tensor of the model described by ``model`` (the [model] table as a dict), in the
    Hugging Face form ``config`` (its config.json) describes; the embedding first."""
    if model.get("family") == "encoder":  # BERT, RoBERTa: bigpt/hf/bert.py
        from bigpt.hf import bert

        return bert.rules(model, config)
    if model.get("family") == "encoder_decoder":  # T5, mT5: bigpt/hf/t5.py
        from bigpt.hf import t5

        return t5.rules(model, config)
    hidden, ffn, vocab = model["hidden_size"], model["ffn_hidden_size"], model["vocab_size"]

    def unpad(tensor):  # rows past the vocabulary are megatron's tensor-parallel padding
        return [tensor[:vocab]]

    layer = "model.layers.{i}."
    moe = effective(model, "family") == "moe_decoder"
    stack = "decoder.layers.{i}." if moe else "decoder.layers."  # an MoE model's layers are keyed by number
    heads, mla = model["num_attention_heads"], effective(model, "mla")
    # The norms before attention and the MLP under Transformer Engine's names, on every spec: as parts
    # of the next linear layer where it fuses them (bigpt.families.decoder.with_transformer_engine_names).
    pre_mlp = Rule(
        stack + "mlp.linear_fc1.layer_norm_weight",
        (layer + "post_attention_layernorm.weight",),
        ((hidden,),),
        _same,
        _one,
    )
    pre_mlps = [pre_mlp]
    if moe:  # an MoE layer's norm before the MLP is a norm of its own (no linear layer follows it)
        layers = effective(model, "moe")["layers"]
        dense, sparse = (tuple(i for i, is_moe in enumerate(layers) if is_moe == kind) for kind in (0, 1))
        pre_mlps = [
            dataclasses.replace(pre_mlp, layers=dense),
            dataclasses.replace(pre_mlp, key=stack + "pre_mlp_layernorm.weight", layers=sparse),
        ]
    if mla:  # Transformer Engine's MLA spec does not fuse the norm before attention
        before_attention = "input_layernorm.weight"
        attention, out_width = _latent_attention(model, stack, layer), heads * mla["v_head_dim"]
    else:
        before_attention = "self_attention.linear_qkv.layer_norm_weight"
        attention, out_width = _attention(model, stack, layer), heads * effective(model, "kv_channels")
    table = [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((vocab, hidden),), _same, unpad),
        Rule(stack + before_attention, (layer + "input_layernorm.weight",), ((hidden,),), _same, _one),
        *attention,
        Rule(
            stack + "self_attention.linear_proj.weight",
            (layer + "self_attn.o_proj.weight",),
            ((hidden, out_width),),
            _same,
            _one,
        ),
        *pre_mlps,
        *(
            _moe_mlps(model, experts_of(model), stack, layer)
            if moe
            else _gated_mlp(stack + "mlp", layer + "mlp", DENSE_MLP, ffn, hidden)
        ),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",), ((hidden,),), _same, _one),
    ]
    if not model["tie_embeddings"]:  # tied: the output layer *is* the embedding, stored once
        table.append(Rule("output_layer.weight", ("lm_head.weight",), ((vocab, hidden),), _same, unpad))
    return table


def expected_hf_shapes(model: dict, config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of the model (in the form ``config`` describes) and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in rules(model, config):
        for layer, expert in rule.instances(model["num_layers"]):
            shapes.update(zip(rule.names(layer, expert), rule.hf_shapes))
    return shapes
