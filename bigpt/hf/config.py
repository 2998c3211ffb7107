"""Hugging Face ``config.json`` ⇄ bigpt's ``[model]`` table, for the dense decoder families
megatron-core builds exactly: Llama, Mistral, Qwen2/Qwen2.5 and Qwen3 (GQA with any group ratio,
SwiGLU, RMSNorm, non-interleaved RoPE, tied or untied embeddings; per family: Mistral's sliding
window, Qwen2's query/key/value biases, Qwen3's per-head query/key RMSNorm). Anything else is
refused by name rather than converted into a model that computes something different.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from bigpt.errors import BigptError
from bigpt.recipe import ModelConfig
from bigpt.recipe.tables import MODEL_FUNCTION_KEYS, MOE_FUNCTION_KEYS, EncoderConfig, MoEConfig


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

    def problems(self, model: ModelConfig) -> list[str]:
        """The [model] values this family cannot express."""
        wanted = (
            ("family", self.model_family),
            ("add_qkv_bias", self.add_qkv_bias),
            ("qk_layernorm", self.qk_layernorm),
        )
        found = [f"model.{key} = {getattr(model, key)}" for key, value in wanted if getattr(model, key) != value]
        if model.attention_window and self.window_key != "sliding_window":
            found.append(f"model.attention_window = {model.attention_window}")
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
    )
}
"""By ``model_type``; on export without a source config, the first family that fits is written."""

# megatron-core's RotaryEmbedding (0.16 and still 0.19) passes only the factor to _apply_scaling;
# these three are its defaults (Llama 3.1/3.2's values), so HF configs with others cannot be matched.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

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


def _rope_keys(config: dict, source) -> dict:
    """The [model] RoPE keys of a config.json (the scaling ones only when it scales)."""
    rope, spelling = _rope(config, source)
    rope_type = rope.get("rope_type", "default")
    keys = {"position_embedding": "rope", "rope_base": float(rope["rope_theta"])}
    if rope_type == "llama3":
        for key, value in LLAMA3_ROPE_FIXED.items():
            if rope.get(key) != value:
                _refuse(
                    source,
                    f"{spelling}.{key} = {rope.get(key)} differs from {value}, the value megatron-core "
                    "(0.16 to 0.19) hard-codes for llama3 scaling",
                    "only Llama-3.1-style scaling with these parameters (any factor) can be computed exactly",
                )
        keys.update(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]))
    elif rope_type != "default":
        _refuse(
            source,
            f"{spelling}.rope_type = {rope_type!r} is not supported",
            "bigpt supports plain RoPE and rope_type 'llama3'",
        )
    return keys


def _family(config: dict, source) -> Family:
    architectures = config.get("architectures") or []
    family = FAMILIES.get(config.get("model_type", ""))
    if family is None or architectures not in ([], [family.architecture]):
        _refuse(
            source,
            f"model_type {config.get('model_type')!r} / architectures {architectures} is not supported",
            "bigpt imports "
            + ", ".join(f.architecture for f in FAMILIES.values())
            + " (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3 and models of the same shape), and the "
            "encoders BertForMaskedLM, BertModel and RobertaForMaskedLM; "
            "mixture-of-experts (Mixtral, Qwen3-MoE, ...) and other architectures are not",
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            _refuse(
                source,
                f"{key} = true: biases on {'the attention output' if key == 'attention_bias' else 'the MLP'} "
                "have no megatron-core option short of biases on every linear layer",
                "only models without them (Qwen2's query/key/value biases aside) are supported",
            )
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
    if key == "encoder":  # a table ([model.encoder]); it describes the model only in the encoder family
        if model.get("family", "decoder") != "encoder":
            return None
        given = model.get("encoder") or {}
        return vars(EncoderConfig(**given) if isinstance(given, dict) else given)
    value = model.get(key, getattr(ModelConfig, key, None))
    if key == "rope_scaling_factor" and model.get("rope_scaling", "none") == "none":
        return None  # unused
    if key == "num_query_groups":
        return value or model["num_attention_heads"]
    if key == "kv_channels":
        return value or model["hidden_size"] // model["num_attention_heads"]
    return value


def _comparable(model: dict) -> dict:
    """Every value that decides what the weights compute, by name; [model.moe] key by key."""
    values = {name: effective(model, name) for name in MODEL_FUNCTION_KEYS}
    experts = values.pop("moe")
    values.update({f"moe.{name}": value for name, value in (experts or {}).items()})
    return values


def check_recipe_matches(
    recipe_model: ModelConfig, saved_model: dict, source, *, key: str = "init.from_hf", allowed: Sequence[str] = ()
) -> list[str]:
    """The recipe's [model] must describe the model in ``source`` (named by recipe ``key``) in every
    key that changes what the weights compute, but those in ``allowed``
    (checkpoint.allow_model_changes); returns those allowed changes, worded for the log."""
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


def _export_family(model: ModelConfig, original: dict | None) -> Family:
    """The family of the source config.json if it expresses ``model``, else the first that does."""
    source = FAMILIES.get((original or {}).get("model_type", ""))
    candidates = ([source] if source else []) + list(FAMILIES.values())
    for family in candidates:
        if not family.problems(model):
            return family
    if not any(family.model_family == model.family for family in FAMILIES.values()):
        raise BigptError(
            f"a checkpoint of model.family = {model.family!r} has no Hugging Face form in bigpt yet (its "
            "export and import cover model.family = 'decoder': "
            f"{', '.join(f.architecture for f in FAMILIES.values())}); keep training it as a bigpt checkpoint"
        )
    problems = sorted({problem for family in FAMILIES.values() for problem in family.problems(model)})
    raise BigptError(
        f"a checkpoint with {', '.join(problems)} fits none of the Hugging Face families bigpt writes "
        f"({', '.join(f.architecture for f in FAMILIES.values())}): Qwen2 has q/k/v biases, Qwen3 "
        "per-head q/k norms and Mistral a sliding window, each without the others"
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
    family = _export_family(model, original)
    stale = (
        "rope_parameters",
        "torch_dtype",
        "layer_types",
        "attention_bias",
        "mlp_bias",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
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
        rope_scaling=None
        if model.rope_scaling == "none"
        else {"rope_type": "llama3", "factor": model.rope_scaling_factor, **LLAMA3_ROPE_FIXED},
        tie_word_embeddings=model.tie_embeddings,
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        dtype=dtype,
        **dict.fromkeys(family.bias_keys, False),
    )
    if family.window_key == "sliding_window":
        config["sliding_window"] = model.attention_window
    elif family.window_key == "use_sliding_window":
        config.update(use_sliding_window=False, sliding_window=None)
    return config
