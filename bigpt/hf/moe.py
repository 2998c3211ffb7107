"""The Hugging Face Mixture-of-Experts decoders ⇄ [model.moe]: Mixtral, Qwen2-MoE, Qwen3-MoE and
DeepSeek-V3.

Their attention is a dense family's (Mixtral: Mistral's; Qwen2-MoE: Qwen2's q/k/v biases;
Qwen3-MoE: Qwen3's per-head q/k norms) or DeepSeek's multi-latent attention (``bigpt.hf.mla``),
so each is a ``Family`` row in ``bigpt.hf.config`` with one ``Experts`` of this module: how its
config.json states the experts and how its tensors name them (``bigpt.hf.mapping`` makes the
tensor rules from it). The routers megatron-core computes identically: a softmax over all
experts, the top k, renormalised (Mixtral; Qwen's ``norm_topk_prob``) or not (Qwen2-MoE's
default); Qwen2-MoE's shared expert with its sigmoid gate is megatron-core's shared expert with
``moe_shared_expert_gate``; DeepSeek-V3's sigmoid router chooses by its scores plus
``e_score_correction_bias`` (megatron-core's expert bias) within the ``topk_group`` of ``n_group``
groups whose two best scores sum highest (megatron-core's group-limited top-k, whose groups rank
by their best router_topk / group_topk: two), renormalises and scales by
``routed_scaling_factor``; its ``n_shared_experts`` are one ungated shared expert. MoE families
megatron-core cannot compute identically are refused by name (``REFUSED``).
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
    count_key: str = "num_experts"
    """The config key of the number of routed experts (transformers reads either spelling of Mixtral's
    and Qwen's: ``COUNT_KEYS``)."""
    deepseek_router: bool = False
    """DeepSeek-V3's router (sigmoid scores, e_score_correction_bias, n_group/topk_group,
    routed_scaling_factor; its tensor gate.e_score_correction_bias), its ungated shared experts
    (n_shared_experts × moe_intermediate_size, tensors shared_experts.*) and its dense first layers
    (first_k_dense_replace)."""


MIXTRAL = Experts("intermediate_size", "block_sparse_moe", ("w1", "w3", "w2"), count_key="num_local_experts")
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
DEEPSEEK_V3 = Experts(
    "moe_intermediate_size",
    "mlp",
    QWEN_PROJECTIONS,
    normalize_key="norm_topk_prob",
    count_key="n_routed_experts",
    deepseek_router=True,
)

REFUSED = {
    "olmoe": "OLMoE normalises the whole query and key projections (q_norm/k_norm as wide as all heads), "
    "and megatron-core's qk_layernorm normalises each head separately",
    "deepseek_v2": "DeepSeek-V2's topk_method 'group_limited_greedy' ranks expert groups by their best expert, "
    "where megatron-core's group-limited routing ranks them by the sum of their top experts",
    "gpt_oss": "GPT-OSS has biases on its experts and router, learned attention sinks and a clamped SwiGLU, "
    "which bigpt's moe_decoder family does not express (its experts have no biases)",
}
"""MoE model types refused by name, with why."""

COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # Mixtral's, Qwen's, DeepSeek's spelling

DEEPSEEK_KEYS = (
    "n_shared_experts",
    "first_k_dense_replace",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "norm_topk_prob",
)
"""DeepSeek-V3's config.json keys of its experts beyond those of every MoE family."""

GROUP_EXPERTS = 2
"""DeepSeek-V3 ranks expert groups by the sum of their 2 best scores (transformers' DeepseekV3TopkRouter),
megatron-core by the sum of their best router_topk // group_topk."""


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
    if experts.deepseek_router:
        moe.update(_deepseek_router_from_hf(config, source))
        if config["n_shared_experts"]:
            moe["shared_expert_ffn_hidden_size"] = config["n_shared_experts"] * config[experts.width_key]
        dense = config["first_k_dense_replace"]
        if dense >= config["num_hidden_layers"]:
            _refuse(
                source,
                f"first_k_dense_replace = {dense} leaves no MoE layer of {config['num_hidden_layers']}",
                "import a model without experts as its dense family",
            )
        if dense:
            moe["first_dense_layers"] = dense
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


def _deepseek_router_from_hf(config: dict, source) -> dict:
    """The [model.moe] router keys of DeepSeek-V3's config.json."""
    missing = [key for key in DEEPSEEK_KEYS if config.get(key) is None]
    if missing:  # transformers' defaults are DeepSeek-V3's own shapes: never guessed for a smaller model
        _refuse(source, f"the keys {missing} are missing", "a DeepSeek-V3 config.json states them")
    for key, wanted in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if config.get(key, wanted) != wanted:
            _refuse(
                source,
                f"{key} = {config[key]!r} is not DeepSeek-V3's {wanted!r}",
                "transformers computes DeepSeek-V3's router whatever this says, and bigpt computes the same",
            )
    if not config["norm_topk_prob"] and config["num_experts_per_tok"] > 1:
        _refuse(
            source,
            "norm_topk_prob = false with a sigmoid router",
            "megatron-core always renormalises a sigmoid router's top-k probabilities (DeepSeek-V3 does too)",
        )
    router: dict = {"router_score_function": "sigmoid", "expert_bias": True}
    if config["routed_scaling_factor"] != 1.0:
        router["topk_scaling_factor"] = float(config["routed_scaling_factor"])
    groups, chosen = config["n_group"], config["topk_group"]
    if groups > 1 and groups != chosen:  # every group chosen: no limit
        if config["num_experts_per_tok"] // chosen != GROUP_EXPERTS:
            _refuse(
                source,
                f"num_experts_per_tok = {config['num_experts_per_tok']} with topk_group = {chosen}: DeepSeek-V3 ranks "
                f"expert groups by their {GROUP_EXPERTS} best scores, megatron-core by their "
                f"num_experts_per_tok // topk_group = {config['num_experts_per_tok'] // chosen}",
                f"only models whose num_experts_per_tok // topk_group is {GROUP_EXPERTS} (DeepSeek-V3: 8 // 4) convert",
            )
        router.update(num_groups=groups, group_topk=chosen)
    return router


def problems(experts: Experts, moe: dict) -> list[str]:
    """The [model.moe] values (effective, ``bigpt.hf.config.effective``) this family cannot express."""
    wanted: list[tuple[str, object]] = [("shared_expert_gate", experts.shared_expert)]
    if experts.deepseek_router:
        wanted += [("router_score_function", "sigmoid"), ("expert_bias", True)]
        if moe["num_groups"] is not None and moe["router_topk"] // moe["group_topk"] != GROUP_EXPERTS:
            found_groups = f"model.moe.router_topk // group_topk = {moe['router_topk'] // moe['group_topk']}"
            return [f"{found_groups} (DeepSeek-V3 ranks groups by their {GROUP_EXPERTS} best)"]
    else:
        wanted += [
            ("router_score_function", "softmax"),
            ("topk_scaling_factor", None),
            ("num_groups", None),
            ("group_topk", None),
            ("expert_bias", False),
        ]
    if experts.normalize_key is None:
        wanted.append(("normalize_topk", True))
    found = [f"model.moe.{key} = {moe[key]!r}" for key, value in wanted if moe[key] != value]
    shared = moe["shared_expert_ffn_hidden_size"]
    if experts.deepseek_router:
        if shared and shared % moe["ffn_hidden_size"]:
            found.append(f"model.moe.shared_expert_ffn_hidden_size = {shared} (not a number of experts' widths)")
    elif bool(shared) != experts.shared_expert:
        found.append(f"model.moe.shared_expert_ffn_hidden_size = {shared}")
    layers = moe["layers"]
    first_dense = layers.index(1) if 1 in layers else len(layers)
    if experts.deepseek_router and not all(layers[first_dense:]):
        found.append(f"dense layers after MoE ones (model.moe layers {layers})")
    elif not experts.sparse_layers and not experts.deepseek_router and not all(layers):
        found.append(f"dense layers (model.moe layers {layers})")
    return found


def hf_from_moe(experts: Experts, moe: dict) -> dict:
    """The config.json keys of the experts of [model.moe] (effective values, ``problems`` empty)."""
    config = {
        experts.count_key: moe["num_experts"],
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
    if experts.deepseek_router:
        groups = moe["num_groups"] or 1
        config.update(
            n_shared_experts=(moe["shared_expert_ffn_hidden_size"] or 0) // moe["ffn_hidden_size"],
            first_k_dense_replace=moe["layers"].index(1),
            routed_scaling_factor=moe["topk_scaling_factor"] or 1.0,
            n_group=groups,
            topk_group=moe["group_topk"] or groups,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
        )
    return config
