"""The Hugging Face Mixture-of-Experts decoders ⇄ [model.moe]: Mixtral, Qwen2-MoE and Qwen3-MoE.

Their attention is a dense family's (Mixtral: Mistral's; Qwen2-MoE: Qwen2's q/k/v biases;
Qwen3-MoE: Qwen3's per-head q/k norms), so each is a ``Family`` row in ``bigpt.hf.config`` with
one ``Experts`` of this module: how its config.json states the experts and how its tensors name
them (``bigpt.hf.mapping`` makes the tensor rules from it). The routers megatron-core computes
identically: a softmax over all experts, the top k, renormalised (Mixtral; Qwen's
``norm_topk_prob``) or not (Qwen2-MoE's default); Qwen2-MoE's shared expert with its sigmoid gate
is megatron-core's shared expert with ``moe_shared_expert_gate``. MoE families megatron-core
cannot compute identically are refused by name (``REFUSED``).
"""

from dataclasses import dataclass

from bigpt.errors import BigptError


@dataclass(frozen=True)
class Experts:
    """How one Hugging Face MoE family states its experts in config.json and names their tensors."""

    width_key: str
    """The config key of one expert's inner width (Mixtral: intermediate_size, its only MLP width)."""
    block: str
    """The module of a layer that holds the router ("gate") and the experts."""
    projections: tuple[str, str, str]
    """An expert's gate, up and down projections (SwiGLU)."""
    shared_expert: bool = False
    """Every MoE layer has one shared expert scaled by a sigmoid gate (Qwen2-MoE)."""
    sparse_layers: bool = False
    """decoder_sparse_step and mlp_only_layers choose which layers are MoE (Qwen); else all are."""
    normalize_key: str | None = None
    """The config switch that renormalises the top-k probabilities; None: always renormalised."""


MIXTRAL = Experts("intermediate_size", "block_sparse_moe", ("w1", "w3", "w2"))
QWEN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
QWEN2_MOE = Experts(
    "moe_intermediate_size",
    "mlp",
    QWEN_PROJECTIONS,
    shared_expert=True,
    sparse_layers=True,
    normalize_key="norm_topk_prob",
)
QWEN3_MOE = Experts(
    "moe_intermediate_size", "mlp", QWEN_PROJECTIONS, sparse_layers=True, normalize_key="norm_topk_prob"
)

REFUSED = {
    "olmoe": "OLMoE normalises the whole query and key projections (q_norm/k_norm as wide as all heads), "
    "and megatron-core's qk_layernorm normalises each head separately",
    "deepseek_v2": "DeepSeek-V2 uses multi-latent attention, which bigpt's model families do not build yet, "
    "and its topk_method 'group_limited_greedy' ranks expert groups by their best expert, where "
    "megatron-core's group-limited routing ranks them by the sum of their top experts",
    "deepseek_v3": "DeepSeek-V3 uses multi-latent attention, which bigpt's model families do not build yet",
    "gpt_oss": "GPT-OSS has biases on its experts and router, learned attention sinks and a clamped SwiGLU, "
    "which bigpt's moe_decoder family does not express (its experts have no biases)",
}
"""MoE model types refused by name, with why."""

COUNT_KEYS = ("num_local_experts", "num_experts")  # Mixtral's and Qwen's spelling; transformers 5 writes either


def _refuse(source, problem: str, fix: str):
    raise BigptError(f"{source}: {problem}; {fix}.")


def moe_from_hf(experts: Experts, config: dict, source) -> tuple[int, dict]:
    """(model.ffn_hidden_size, the [model.moe] table) of an MoE ``config.json``."""
    count = next((config[key] for key in COUNT_KEYS if config.get(key)), None)
    missing = [key for key in ("num_experts_per_tok", experts.width_key) if not config.get(key)]
    if not count or missing:
        _refuse(
            source,
            f"the keys {[*missing, *(['num_experts'] if not count else [])]} are missing or zero",
            "a config.json of a mixture-of-experts model states its experts in these",
        )
    moe: dict = {"num_experts": count, "router_topk": config["num_experts_per_tok"]}
    if experts.normalize_key is not None:
        moe["normalize_topk"] = bool(config.get(experts.normalize_key, False))
    ffn_hidden_size = config["intermediate_size"]
    if config[experts.width_key] != ffn_hidden_size:
        moe["ffn_hidden_size"] = config[experts.width_key]
    if experts.shared_expert:
        shared = config.get("shared_expert_intermediate_size")
        if not shared:
            _refuse(source, "shared_expert_intermediate_size is missing or zero", "Qwen2-MoE has a shared expert")
        moe.update(shared_expert_ffn_hidden_size=shared, shared_expert_gate=True)
    if experts.sparse_layers:
        step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(config["num_hidden_layers"])]
        if not any(pattern):
            _refuse(
                source,
                f"decoder_sparse_step = {step} and mlp_only_layers = {sorted(dense)} leave no MoE layer",
                "import a model without experts as its dense family",
            )
        if not all(pattern):
            moe["layer_pattern"] = pattern
    return ffn_hidden_size, moe


def problems(experts: Experts, moe: dict) -> list[str]:
    """The [model.moe] values (effective, ``bigpt.hf.config.effective``) this family cannot express."""
    wanted = [
        ("router_score_function", "softmax"),
        ("topk_scaling_factor", None),
        ("num_groups", None),
        ("group_topk", None),
        ("expert_bias", False),
        ("shared_expert_gate", experts.shared_expert),
    ]
    if experts.normalize_key is None:
        wanted.append(("normalize_topk", True))
    found = [f"model.moe.{key} = {moe[key]!r}" for key, value in wanted if moe[key] != value]
    if bool(moe["shared_expert_ffn_hidden_size"]) != experts.shared_expert:
        found.append(f"model.moe.shared_expert_ffn_hidden_size = {moe['shared_expert_ffn_hidden_size']}")
    if not experts.sparse_layers and not all(moe["layers"]):
        found.append(f"dense layers (model.moe layers {moe['layers']})")
    return found


def hf_from_moe(experts: Experts, moe: dict) -> dict:
    """The config.json keys of the experts of [model.moe] (effective values, ``problems`` empty)."""
    config = {
        COUNT_KEYS[experts is not MIXTRAL]: moe["num_experts"],
        "num_experts_per_tok": moe["router_topk"],
        experts.width_key: moe["ffn_hidden_size"],
    }
    if experts.normalize_key is not None:
        config[experts.normalize_key] = moe["normalize_topk"]
    if experts.shared_expert:
        config["shared_expert_intermediate_size"] = moe["shared_expert_ffn_hidden_size"]
    if experts.sparse_layers:
        config.update(
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, sparse in enumerate(moe["layers"]) if not sparse],
        )
    return config
