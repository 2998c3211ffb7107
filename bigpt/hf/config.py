"""Hugging Face Llama ``config.json`` ⇄ bigpt's ``[model]`` table.

Only what both sides can express is accepted: the Llama family (``LlamaForCausalLM``: GQA with
any group ratio, SwiGLU, RMSNorm, non-interleaved RoPE with an optional Llama-3.1 frequency
scaling, tied or untied embeddings, no biases). Anything else is refused by name rather than
converted into a model that computes something different.
"""

from bigpt.errors import BigptError
from bigpt.recipe import ModelConfig
from bigpt.recipe.tables import MODEL_FUNCTION_KEYS

ARCHITECTURE = "LlamaForCausalLM"

# megatron-core 0.16.1's RotaryEmbedding._apply_scaling takes only the factor; these three are
# hard-coded there (Llama 3.1/3.2's values), so HF configs with other values cannot be matched.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def _refuse(source, problem: str, fix: str):
    raise BigptError(f"{source}: {problem}; {fix}.")


def _rope(config: dict, source) -> dict:
    """The RoPE parameters in either spelling: ``rope_parameters`` (transformers 5) or
    ``rope_theta`` + ``rope_scaling`` (released Llama checkpoints)."""
    if config.get("rope_parameters"):
        return dict(config["rope_parameters"])
    rope = dict(config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "type" in rope:  # the pre-4.43 spelling of rope_type
        rope.setdefault("rope_type", rope.pop("type"))
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(source, f"partial_rotary_factor = {config['partial_rotary_factor']} (RoPE on part of each "
                "head) is not supported", "bigpt rotates whole heads, as Llama does")
    return rope


def model_from_hf(config: dict, source) -> dict:
    """The ``[model]`` keys (recipe spelling) of a Llama ``config.json``; refuses what bigpt cannot
    compute identically. ``source`` names the file in errors."""
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" or architectures not in ([], [ARCHITECTURE]):
        _refuse(source, f"model_type {config.get('model_type')!r} / architectures {architectures} is not "
                "supported", f"bigpt imports the Llama family ({ARCHITECTURE}: Llama 2, 3, 3.1, 3.2 and models "
                "of the same shape); mixture-of-experts (Mixtral, ...), biased (Qwen2, ...) and other "
                "architectures are not")
    if config.get("hidden_act", "silu") != "silu":
        _refuse(source, f"hidden_act = {config['hidden_act']!r}", "bigpt's Llama MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            _refuse(source, f"{key} = true: bigpt cannot map these biases", "only bias-free Llama models are supported")
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        _refuse(source, f"keys {missing} are missing", "a Llama config.json names all of " + ", ".join(_REQUIRED))
    heads = config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    if heads % groups:
        _refuse(source, f"num_attention_heads = {heads} is not a multiple of num_key_value_heads = {groups}",
                "the config is inconsistent")
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = _rope(config, source)
    rope_type = rope.get("rope_type", "default")
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
        "position_embedding": "rope",
        "rope_base": float(rope["rope_theta"]),
        "rope_scaling": "none",
        "rope_scaling_factor": ModelConfig.rope_scaling_factor,
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "add_bias_linear": False,
        "max_position_embeddings": config.get("max_position_embeddings", 2048),
    }
    if head_dim * heads != config["hidden_size"]:
        model["kv_channels"] = head_dim
    if rope_type == "llama3":
        for key, value in LLAMA3_ROPE_FIXED.items():
            if rope.get(key) != value:
                _refuse(source, f"rope_scaling.{key} = {rope.get(key)} differs from {value}, the value "
                        "megatron-core 0.16 hard-codes for llama3 scaling", "only Llama-3.1-style scaling "
                        "with these parameters (factor free) is supported")
        model.update(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]))
    elif rope_type != "default":
        _refuse(source, f"rope_scaling.rope_type = {rope_type!r} is not supported",
                "bigpt supports plain RoPE and rope_type 'llama3'")
    return model


def effective(model: dict, key: str):
    """A [model] value with its None defaults resolved, for comparisons."""
    value = model.get(key, getattr(ModelConfig, key, None))
    if key == "rope_scaling_factor" and model.get("rope_scaling", "none") == "none":
        return None  # unused
    if key == "num_query_groups":
        return value or model["num_attention_heads"]
    if key == "kv_channels":
        return value or model["hidden_size"] // model["num_attention_heads"]
    return value


def check_recipe_matches(recipe_model: ModelConfig, saved_model: dict, source, *, key: str = "init.from_hf",
                         allowed: list[str] = ()) -> list[str]:
    """The recipe's [model] must describe the model in ``source`` (named by recipe ``key``) in every
    key that changes what the weights compute, but those in ``allowed``
    (checkpoint.allow_model_changes); returns those allowed changes, worded for the log."""
    ours = vars(recipe_model)
    changed = [(name, effective(ours, name), effective(saved_model, name)) for name in MODEL_FUNCTION_KEYS
               if effective(ours, name) != effective(saved_model, name)]
    wrong = [f"model.{name} = {mine!r} (the checkpoint has {theirs!r})" for name, mine, theirs in changed
             if name not in allowed]
    if wrong:
        table = ("tools/convert_hf.py import writes the matching table to model.toml" if key == "init.from_hf"
                 else "its recipe.toml or model.toml holds the matching table")
        raise BigptError(f"{key} = {source} does not match the recipe's model: {'; '.join(wrong)}. Set these in "
                         f"[model] ({table}); to change a key that keeps the shapes on purpose (a larger "
                         "rope_base for long-context continuation), list it in checkpoint.allow_model_changes.")
    return [f"model.{name} {theirs!r} -> {mine!r}" for name, mine, theirs in changed]


def hf_from_model(model: ModelConfig, dtype: str, original: dict | None) -> dict:
    """A ``config.json`` for ``model``; keys of ``original`` (token ids, generation settings) that
    do not describe the architecture are kept."""
    problems = [f"model.{key} = {value!r}" for key, value, wanted in (
        ("activation", model.activation, "swiglu"), ("normalization", model.normalization, "rmsnorm"),
        ("position_embedding", model.position_embedding, "rope"), ("add_bias_linear", model.add_bias_linear, False),
    ) if value != wanted]
    if problems:
        raise BigptError(f"a checkpoint with {', '.join(problems)} cannot be written as {ARCHITECTURE} "
                         "(which is SwiGLU, RMSNorm, RoPE, no biases)")
    config = {k: v for k, v in (original or {}).items() if k not in ("rope_parameters", "torch_dtype")}
    fields = vars(model)
    config.update(
        architectures=[ARCHITECTURE],
        model_type="llama",
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
        rope_scaling=None if model.rope_scaling == "none" else
        {"rope_type": "llama3", "factor": model.rope_scaling_factor, **LLAMA3_ROPE_FIXED},
        tie_word_embeddings=model.tie_embeddings,
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        attention_bias=False,
        mlp_bias=False,
        dtype=dtype,
    )
    return config
