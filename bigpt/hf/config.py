"""Hugging Face ``config.json`` ⇄ bigpt's ``[model]`` table, for the decoder families
megatron-core builds exactly: Llama, Mistral, Qwen2/Qwen2.5 and Qwen3 (GQA with any group ratio,
SwiGLU, RMSNorm, non-interleaved RoPE, tied or untied embeddings; per family: Mistral's sliding
window, Qwen2's query/key/value biases, Qwen3's per-head query/key RMSNorm), the
Mixture-of-Experts decoders built on their attention: Mixtral, Qwen2-MoE and Qwen3-MoE (their
experts: ``bigpt.hf.moe``), and DeepSeek-V3, with multi-latent attention ([model.mla]).
Anything else is refused by name rather than converted into a model that computes something
different.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from bigpt.errors import BigptError
from bigpt.hf import moe as hf_moe
from bigpt.recipe import ModelConfig
from bigpt.recipe.tables import (
    MODEL_FUNCTION_KEYS,
    MOE_FUNCTION_KEYS,
    ROPE_SCALING_KEYS,
    ROPE_SCALING_USES,
    EncoderConfig,
    MLAConfig,
    MoEConfig,
)


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture and the [model] features that set it apart."""

    model_type: str
    architecture: str
    add_qkv_bias: bool = False
    """Its q/k/v projections always have biases (and no other linear layer has one)."""
    qk_layernorm: bool = False
    """It always normalises each query and key head."""
    window_key: str | None = None
    """How its config.json states a sliding window: "sliding_window" (one window for every layer,
    null = none), "use_sliding_window" (a switch for a window in only the upper layers, which
    bigpt refuses), or None (never)."""
    bias_keys: tuple[str, ...] = ()
    """The bias switches its config.json has; an export writes them false (an import refuses them true)."""
    model_family: str = "decoder"
    """The bigpt model family (model.family, bigpt.families) it is a Hugging Face form of."""
    experts: hf_moe.Experts | None = None
    """Its experts (model_family "moe_decoder")."""
    latent_attention: bool = False
    """Its attention is multi-latent attention ([model.mla]; DeepSeek-V3's config keys, ``MLA_KEYS``)."""

    def problems(self, model: ModelConfig | dict) -> list[str]:
        """The [model] values this family cannot express."""
        fields = model if isinstance(model, dict) else vars(model)
        wanted = (
            ("family", self.model_family),
            ("add_qkv_bias", self.add_qkv_bias),
            ("qk_layernorm", self.qk_layernorm),
        )
        found = [f"model.{key} = {effective(fields, key)}" for key, value in wanted if effective(fields, key) != value]
        if (effective(fields, "mla") is not None) != self.latent_attention:
            found.append("[model.mla] (multi-latent attention)" if not self.latent_attention else "no [model.mla]")
        if effective(fields, "attention_window") and self.window_key != "sliding_window":
            found.append(f"model.attention_window = {effective(fields, 'attention_window')}")
        if self.experts is not None and not found:
            found += hf_moe.problems(self.experts, effective(fields, "moe"))
        return found


FAMILIES = {
    family.model_type: family
    for family in (
        Family("llama", "LlamaForCausalLM", bias_keys=("attention_bias", "mlp_bias")),
        Family("mistral", "MistralForCausalLM", window_key="sliding_window"),
        Family("qwen2", "Qwen2ForCausalLM", add_qkv_bias=True, window_key="use_sliding_window"),
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            qk_layernorm=True,
            window_key="use_sliding_window",
            bias_keys=("attention_bias",),
        ),
        Family(
            "mixtral",
            "MixtralForCausalLM",
            window_key="sliding_window",
            model_family="moe_decoder",
            experts=hf_moe.MIXTRAL,
        ),
        Family(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            add_qkv_bias=True,
            window_key="use_sliding_window",
            model_family="moe_decoder",
            experts=hf_moe.QWEN2_MOE,
        ),
        Family(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            bias_keys=("attention_bias",),
            model_family="moe_decoder",
            experts=hf_moe.DEEPSEEK_V3,
            latent_attention=True,
        ),
        Family(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            qk_layernorm=True,
            window_key="use_sliding_window",
            bias_keys=("attention_bias",),
            model_family="moe_decoder",
            experts=hf_moe.QWEN3_MOE,
        ),
    )
}
"""By ``model_type``; on export without a source config, the first family that fits is written."""

HF_ROPE_KEYS = {
    "rope_scaling_factor": "factor",
    "rope_original_max_position_embeddings": "original_max_position_embeddings",
    "rope_low_freq_factor": "low_freq_factor",
    "rope_high_freq_factor": "high_freq_factor",
    "rope_beta_fast": "beta_fast",
    "rope_beta_slow": "beta_slow",
    "rope_mscale": "mscale",
    "rope_mscale_all_dim": "mscale_all_dim",
}
"""[model] RoPE key → its name in config.json's rope_scaling (rope_parameters)."""

MLA_KEYS = {
    "kv_lora_rank": "kv_lora_rank",
    "q_lora_rank": "q_lora_rank",
    "qk_head_dim": "qk_nope_head_dim",
    "qk_pos_emb_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
}
"""[model.mla] key → its name in DeepSeek-V3's config.json (q_lora_rank null: no q-LoRA)."""

REFUSED_ROPE = {
    "dynamic": "dynamic NTK scaling changes the frequencies with the length of each input at inference, "
    "which a trained model's fixed frequencies cannot follow",
    "longrope": "LongRoPE (Phi-3) has a factor per frequency and switches between two sets by input length; "
    "megatron-core's rotary embeddings have neither",
}
"""RoPE scalings of transformers that bigpt refuses, and why."""

_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def _refuse(source, problem: str, fix: str) -> NoReturn:
    raise BigptError(f"{source}: {problem}; {fix}.")


def _rope(config: dict, source) -> tuple[dict, str]:
    """The RoPE parameters and the key that holds them, in either spelling: ``rope_parameters``
    (transformers 5) or ``rope_theta`` + ``rope_scaling`` (released checkpoints)."""
    if config.get("rope_parameters"):
        rope, spelling = dict(config["rope_parameters"]), "rope_parameters"
    else:
        rope, spelling = dict(config.get("rope_scaling") or {}), "rope_scaling"
        rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
        if "type" in rope:  # the pre-4.43 spelling of rope_type
            rope.setdefault("rope_type", rope.pop("type"))
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))  # transformers 5: inside
    if partial != 1.0:
        _refuse(
            source,
            f"partial_rotary_factor = {partial} (RoPE on part of each head) is not supported",
            "bigpt rotates whole heads, as Llama, Mistral and Qwen do",
        )
    return rope, spelling


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """The factor YaRN multiplies the rotated queries and keys by, as megatron-core computes it."""

    def get_mscale(scale: float, m: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    return get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)


def _rope_keys(config: dict, source) -> dict:
    """The [model] RoPE keys of a config.json (the scaling ones only when it scales), read as
    transformers reads them (its defaults included)."""
    rope, spelling = _rope(config, source)
    rope_type = rope.get("rope_type", "default")
    keys: dict[str, object] = {"position_embedding": "rope", "rope_base": float(rope["rope_theta"])}
    if rope_type == "default":
        return keys
    if rope_type not in ROPE_SCALING_USES or rope_type == "none":
        _refuse(
            source,
            f"{spelling}.rope_type = {rope_type!r} is not supported"
            + (f" ({REFUSED_ROPE[rope_type]})" if rope_type in REFUSED_ROPE else ""),
            "bigpt computes plain RoPE and rope_type 'llama3', 'yarn' and 'linear'",
        )
    if rope_type in ("llama3", "yarn"):  # transformers' defaults (standardize_rope_params)
        if "original_max_position_embeddings" in config:
            rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", config.get("max_position_embeddings", 2048))
    if rope_type == "yarn":
        if rope.get("factor") is None:
            rope["factor"] = config["max_position_embeddings"] / rope["original_max_position_embeddings"]
        rope["beta_fast"] = rope.get("beta_fast") or 32.0
        rope["beta_slow"] = rope.get("beta_slow") or 1.0
        if not (rope.get("mscale") and rope.get("mscale_all_dim")):  # transformers then takes 0.1 ln factor + 1
            rope.update(mscale=1.0, mscale_all_dim=0.0)
        if rope.get("truncate", True) is not True:
            _refuse(
                source,
                f"{spelling}.truncate = {rope['truncate']} (YaRN's ramp between unrounded dimensions) is not supported",
                "bigpt's YaRN (megatron-core's) rounds the ramp's ends, as transformers does by default",
            )
        attention = yarn_attention_factor(rope["factor"], rope["mscale"], rope["mscale_all_dim"])
        if rope.get("attention_factor") is not None and not math.isclose(rope["attention_factor"], attention):
            _refuse(
                source,
                f"{spelling}.attention_factor = {rope['attention_factor']} differs from {attention}, the value "
                "YaRN's formula gives for its factor, mscale and mscale_all_dim",
                "bigpt (megatron-core) computes YaRN's attention factor from these; remove attention_factor or "
                "make it agree",
            )
    wanted = [HF_ROPE_KEYS[key] for key in ROPE_SCALING_USES[rope_type]]
    missing = [name for name in wanted if rope.get(name) is None]
    if missing:
        _refuse(source, f"{spelling} of rope_type {rope_type!r} lacks {missing}", "transformers needs them too")
    keys["rope_scaling"] = rope_type
    for key in ROPE_SCALING_USES[rope_type]:
        keys[key] = (int if key == "rope_original_max_position_embeddings" else float)(rope[HF_ROPE_KEYS[key]])
    return keys


def _hf_rope_scaling(model: ModelConfig) -> dict | None:
    """config.json's rope_scaling for model.rope_scaling (None: none)."""
    if model.rope_scaling == "none":
        return None
    scaling: dict[str, object] = {"rope_type": model.rope_scaling}
    scaling.update({HF_ROPE_KEYS[key]: getattr(model, key) for key in ROPE_SCALING_USES[model.rope_scaling]})
    if model.rope_scaling == "yarn" and not (model.rope_mscale and model.rope_mscale_all_dim):
        # transformers then ignores both (0.1 ln factor + 1): state the factor megatron-core computes if it differs
        ours = yarn_attention_factor(model.rope_scaling_factor, model.rope_mscale, model.rope_mscale_all_dim)
        if ours != yarn_attention_factor(model.rope_scaling_factor, 1.0, 0.0):
            scaling["attention_factor"] = ours
    return scaling


def _mla_from_hf(config: dict, source) -> dict:
    """The [model.mla] table of DeepSeek-V3's config.json."""
    missing = [name for key, name in MLA_KEYS.items() if key != "q_lora_rank" and not config.get(name)]
    if missing:
        _refuse(source, f"the keys {missing} are missing or zero", "DeepSeek-V3's multi-latent attention needs them")
    if not config.get("rope_interleave", True):
        _refuse(
            source,
            "rope_interleave = false is not supported",
            "megatron-core's multi-latent attention rotates interleaved pairs of the rotary channels, as "
            "DeepSeek's released models do (rope_interleave = true)",
        )
    return {key: config[name] for key, name in MLA_KEYS.items() if config.get(name)}


def _family(config: dict, source) -> Family:
    architectures = config.get("architectures") or []
    family = FAMILIES.get(config.get("model_type", ""))
    if config.get("model_type") in hf_moe.REFUSED:
        _refuse(
            source,
            f"model_type {config['model_type']!r} is not supported: {hf_moe.REFUSED[config['model_type']]}",
            "bigpt cannot compute it identically, so it does not convert it",
        )
    if family is None or architectures not in ([], [family.architecture]):
        _refuse(
            source,
            f"model_type {config.get('model_type')!r} / architectures {architectures} is not supported",
            "bigpt imports "
            + ", ".join(f.architecture for f in FAMILIES.values())
            + " (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, Mixtral, Qwen1.5/2-MoE, Qwen3-MoE, DeepSeek-V3 and "
            "models of the same shape, and the encoders BertForMaskedLM, BertModel and RobertaForMaskedLM); other "
            "architectures are not",
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            _refuse(
                source,
                f"{key} = true: biases on {'the attention output' if key == 'attention_bias' else 'the MLP'} "
                "have no megatron-core option short of biases on every linear layer",
                "only models without them (Qwen2's query/key/value biases aside) are supported",
            )
    if config.get("qkv_bias") is False:  # Qwen2-MoE's switch (transformers 5), true in every release
        _refuse(source, "qkv_bias = false", f"{family.architecture} has query/key/value biases")
    if config.get("use_sliding_window"):
        _refuse(
            source,
            f"use_sliding_window = true (a window only from layer max_window_layers = "
            f"{config.get('max_window_layers')} on) is not supported",
            "bigpt's model.attention_window applies "
            "to every layer, as Mistral's sliding_window does; released Qwen2.5 and Qwen3 models leave it false",
        )
    return family


def model_from_hf(config: dict, source) -> dict:
    """The ``[model]`` keys (recipe spelling) of a ``config.json``; refuses what bigpt cannot
    compute identically. ``source`` names the file in errors."""
    from bigpt.hf import bert  # its own file (config and tensors), which builds on this one

    if config.get("model_type") in bert.ENCODER_FAMILIES:
        return bert.model_from_hf(config, source)
    family = _family(config, source)
    if config.get("hidden_act", "silu") != "silu":
        _refuse(source, f"hidden_act = {config['hidden_act']!r}", "bigpt's MLP for these families is SwiGLU (silu)")
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        _refuse(
            source,
            f"keys {missing} are missing",
            "a config.json of these families names all of " + ", ".join(_REQUIRED),
        )
    heads = config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    if heads % groups:
        _refuse(
            source,
            f"num_attention_heads = {heads} is not a multiple of num_key_value_heads = {groups}",
            "the config is inconsistent",
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    model = {
        "num_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "ffn_hidden_size": config["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "vocab_size": config["vocab_size"],
        "activation": "swiglu",
        "normalization": "rmsnorm",
        "norm_epsilon": config.get("rms_norm_eps", 1e-6),
        **_rope_keys(config, source),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "add_bias_linear": False,
        "max_position_embeddings": config.get("max_position_embeddings", 2048),
    }
    if head_dim * heads != config["hidden_size"]:
        model["kv_channels"] = head_dim
    if family.add_qkv_bias:
        model["add_qkv_bias"] = True
    if family.qk_layernorm:
        model["qk_layernorm"] = True
    if family.window_key == "sliding_window" and config.get("sliding_window"):
        model["attention_window"] = config["sliding_window"]
    if family.latent_attention:  # its head widths are [model.mla]'s; a key and value head per query head
        model.update(num_query_groups=heads)
        model.pop("kv_channels", None)
        model["mla"] = _mla_from_hf(config, source)
    if family.experts is not None:
        model["ffn_hidden_size"], model["moe"] = hf_moe.moe_from_hf(family.experts, config, source)
        model = {"family": family.model_family, **model}
    return model


def effective(model: dict, key: str):
    """A [model] value with its None defaults resolved, for comparisons."""
    if key == "moe":  # a table ([model.moe]); it describes experts only in the MoE family
        if model.get("family", "decoder") != "moe_decoder":
            return None
        given = model.get("moe") or {}
        moe = MoEConfig(**given) if isinstance(given, dict) else given
        values = {name: getattr(moe, name) for name in MOE_FUNCTION_KEYS}
        values["ffn_hidden_size"] = moe.ffn_hidden_size or model["ffn_hidden_size"]
        return {**values, "layers": moe.layers(model["num_layers"])}
    if key == "mla":  # a table ([model.mla]); it describes the attention only when set
        given = model.get("mla") or {}
        mla = MLAConfig(**given) if isinstance(given, dict) else given
        return vars(mla) if mla.enabled() else None
    if key == "encoder":  # a table ([model.encoder]); it describes the model only in the encoder family
        if model.get("family", "decoder") != "encoder":
            return None
        given = model.get("encoder") or {}
        return vars(EncoderConfig(**given) if isinstance(given, dict) else given)
    value = model.get(key, getattr(ModelConfig, key, None))
    scaling = model.get("rope_scaling", "none")
    if key in ("rope_scaling_factor", *ROPE_SCALING_KEYS) and key not in ROPE_SCALING_USES[scaling]:
        return None  # not read by this rope_scaling
    if key == "num_query_groups":
        return value or model["num_attention_heads"]
    if key == "kv_channels":
        return value or model["hidden_size"] // model["num_attention_heads"]
    return value


def _comparable(model: dict) -> dict:
    """Every value that decides what the weights compute, by name; [model.moe] and [model.mla] key by key."""
    values = {name: effective(model, name) for name in MODEL_FUNCTION_KEYS}
    for table in ("moe", "mla"):
        values.update({f"{table}.{name}": value for name, value in (values.pop(table) or {}).items()})
    return values


def check_recipe_matches(
    recipe_model: ModelConfig, saved_model: dict, source, *, key: str = "init.from_hf", allowed: Sequence[str] = ()
) -> list[str]:
    """The recipe's [model] must describe the model in ``source`` (named by recipe ``key``) in every
    key that changes what the weights compute, but those in ``allowed``
    (checkpoint.allow_model_changes); returns those allowed changes, worded for the log."""
    if "rope_scaling" in allowed:  # a new scaling comes with its parameters
        allowed = [*allowed, "rope_scaling_factor", *ROPE_SCALING_KEYS]
    ours, theirs = _comparable(vars(recipe_model)), _comparable(saved_model)
    changed = [(name, ours[name], theirs.get(name)) for name in ours if ours[name] != theirs.get(name)]
    wrong = [
        f"model.{name} = {mine!r} (the checkpoint has {theirs!r})"
        for name, mine, theirs in changed
        if name not in allowed
    ]
    if wrong:
        table = (
            "tools/convert_hf.py import writes the matching table to model.toml"
            if key == "init.from_hf"
            else "its recipe.toml or model.toml holds the matching table"
        )
        raise BigptError(
            f"{key} = {source} does not match the recipe's model: {'; '.join(wrong)}. Set these in "
            f"[model] ({table}); to change a key that keeps the shapes on purpose (a larger "
            "rope_base for long-context continuation), list it in checkpoint.allow_model_changes."
        )
    return [f"model.{name} {theirs!r} -> {mine!r}" for name, mine, theirs in changed]


def export_family(model: ModelConfig | dict, original: dict | None) -> Family:
    """The family of the source config.json if it expresses ``model``, else the first that does."""
    model_family = effective(model if isinstance(model, dict) else vars(model), "family")
    source = FAMILIES.get((original or {}).get("model_type", ""))
    candidates = [f for f in ([source] if source else []) + list(FAMILIES.values()) if f.model_family == model_family]
    for family in candidates:
        if not family.problems(model):
            return family
    if not candidates:
        families = (f.model_family for f in FAMILIES.values())
        raise BigptError(
            f"a checkpoint of model.family = {model_family!r} has no Hugging Face form in bigpt yet (its "
            f"export and import cover model.family = {', '.join(repr(f) for f in dict.fromkeys(families))}); "
            "keep training it as a bigpt checkpoint"
        )
    problems = sorted({problem for family in candidates for problem in family.problems(model)})
    raise BigptError(
        f"a checkpoint with {', '.join(problems)} fits none of the Hugging Face families bigpt writes "
        f"for model.family = {model_family!r} ("
        + "; ".join(f"{f.architecture} cannot have {', '.join(f.problems(model))}" for f in candidates)
        + "): Qwen2 and Qwen2-MoE have q/k/v biases, Qwen3 and Qwen3-MoE per-head q/k norms and Mistral "
        "and Mixtral a sliding window, each without the others; Mixtral's experts are in every layer "
        "and renormalised, Qwen2-MoE's with a gated shared expert"
    )


def hf_from_model(model: ModelConfig, dtype: str, original: dict | None) -> dict:
    """A ``config.json`` for ``model``, of the family of ``original`` (the config of the weights the
    run started from) where it fits; keys of ``original`` that do not describe the architecture
    (token ids, generation settings) are kept."""
    if model.family == "encoder":
        from bigpt.hf import bert

        return bert.hf_from_model(model, dtype, original)
    problems = [
        f"model.{key} = {value!r}"
        for key, value, wanted in (
            ("activation", model.activation, "swiglu"),
            ("normalization", model.normalization, "rmsnorm"),
            ("position_embedding", model.position_embedding, "rope"),
            ("add_bias_linear", model.add_bias_linear, False),
        )
        if value != wanted
    ]
    if problems:
        raise BigptError(
            f"a checkpoint with {', '.join(problems)} cannot be written as a Hugging Face model of "
            "the families bigpt exports (SwiGLU, RMSNorm, RoPE, no biases beyond Qwen2's q/k/v)"
        )
    family = export_family(model, original)
    stale = (
        "rope_parameters",
        "torch_dtype",
        "layer_types",
        "attention_bias",
        "mlp_bias",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
        "quantization_config",  # an export is written in the checkpoint's float dtype, never quantised
        *hf_moe.COUNT_KEYS,
    )
    config = {k: v for k, v in (original or {}).items() if k not in stale}
    fields = vars(model)
    config.update(
        architectures=[family.architecture],
        model_type=family.model_type,
        num_hidden_layers=model.num_layers,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=effective(fields, "num_query_groups"),
        head_dim=effective(fields, "kv_channels"),
        vocab_size=model.vocab_size,
        hidden_act="silu",
        rms_norm_eps=model.norm_epsilon,
        rope_theta=model.rope_base,
        rope_scaling=_hf_rope_scaling(model),
        tie_word_embeddings=model.tie_embeddings,
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        dtype=dtype,
        **dict.fromkeys(family.bias_keys, False),
    )
    if family.experts is not None:
        config.update(hf_moe.hf_from_moe(family.experts, effective(fields, "moe")))
    mla = effective(fields, "mla")
    if mla:  # transformers' head_dim is the rotary part's (its rotary embedding's width)
        config.update({name: mla[key] for key, name in MLA_KEYS.items()})
        rope = mla["qk_pos_emb_head_dim"]
        config.update(head_dim=rope, qk_head_dim=mla["qk_head_dim"] + rope, rope_interleave=True)
        config.update(num_nextn_predict_layers=0)  # bigpt has no multi-token-prediction layers to write
    if family.window_key == "sliding_window":
        config["sliding_window"] = model.attention_window
    elif family.window_key == "use_sliding_window":
        config.update(use_sliding_window=False, sliding_window=None)
    return config
