"""Mixture-of-Experts decoders (model.family = "moe_decoder") through megatron-core's MoE layer.

On paper: what megatron-core cannot combine is refused with the reason, and what it can is built
into a TransformerConfig that megatron-core's own checks accept. Multi-rank (gloo on CPU): expert
parallelism, with both token dispatchers, with pipeline, data and tensor parallelism, trains as
one rank does from the same checkpoint (experts initialise differently per EP size, so a seed is
not enough), and resumes bit-identically.
"""

import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bigpt.checkpoint import state
from bigpt.errors import BigptError
from bigpt.flops import expert_parameters_per_stage, flops_per_token, num_parameters
from bigpt.hf.config import check_recipe_matches
from bigpt.layout import Layout, fewest_data_parallel
from bigpt.memory import stage_memory
from bigpt.model import transformer_config
from bigpt.plan import all_to_all_bytes, make_plan, report
from bigpt.recipe import ModelConfig, load_recipe, recipe_to_toml
from bigpt.train.moe_metrics import MoEMetrics
from bigpt.train.reshard import reshard
from multirank import MOCK_RECIPE, run_bigpt, scalars

MOE_RECIPE = Path(__file__).resolve().parent / "recipes" / "mock_moe.toml"


def layout_of(*overrides: str, world_size: int = 1) -> Layout:
    return Layout.from_recipe(load_recipe(MOE_RECIPE, overrides), world_size)


@pytest.mark.parametrize(
    "overrides,world_size,words",
    [
        (
            ["model.family=decoder"],
            1,
            "model.moe.num_experts, model.moe.ffn_hidden_size set while model.family='decoder'",
        ),
        (["model.family=decoder", "parallel.expert=2"], 2, "parallel.expert set while"),
        (["model.moe.router_topk=5"], 1, "model.moe.router_topk=5 exceeds model.moe.num_experts=4"),
        (["model.moe.router_topk=1"], 1, "no gradient reaches the router"),
        (["model.moe.router_score_function='sigmoid'", "model.moe.normalize_topk=false"], 1, "always normalises"),
        (["model.moe.expert_bias=true"], 1, "needs model.moe.router_score_function='sigmoid'"),
        (["model.moe.num_groups=2"], 1, "model.moe.num_groups and model.moe.group_topk go together"),
        (["model.moe.num_groups=3", "model.moe.group_topk=1"], 1, "must divide model.moe.num_experts=4"),
        (
            ["model.moe.num_groups=4", "model.moe.group_topk=1"],
            1,
            "model.moe.router_topk=2 exceeds the experts of model.moe.group_topk=1",
        ),
        (["model.moe.shared_expert_gate=true"], 1, "without model.moe.shared_expert_ffn_hidden_size"),
        (["model.moe.layer_pattern=[1,0]"], 1, "not one 0 (dense) or 1 (MoE) per layer"),
        (["model.moe.first_dense_layers=4"], 1, "leaves no MoE layer"),
        (["model.add_bias_linear=true"], 1, "experts have no biases"),
        (["model.moe.pad_to_capacity=true"], 1, "without model.moe.capacity_factor"),
        (["parallel.expert=3"], 3, "model.moe.num_experts=4 is not divisible by parallel.expert=3"),
        (["parallel.expert=4"], 2, "does not divide the 2 ranks of a pipeline stage"),
        (["parallel.tensor=2"], 2, "need parallel.sequence_parallel = true"),
        (
            ["parallel.tensor=2", "parallel.sequence_parallel=true", "model.moe.ffn_hidden_size=63"],
            2,
            "not divisible by expert tensor parallel 2",
        ),
    ],
)
def test_what_megatron_core_cannot_combine_is_refused_on_paper(overrides, world_size, words):
    with pytest.raises(BigptError) as refused:
        layout_of(*overrides, world_size=world_size)
    message = str(refused.value)
    assert words in message, message
    # where the keys it names were set: the override that set one, or a recipe file
    assert f"override '{overrides[0]}'" in message or ".toml" in message, message


ROUTERS = {  # the routers of released MoE models, as [moe] spells them
    "mixtral": ["model.moe.num_experts=8", "model.moe.router_topk=2"],
    "qwen2_moe": [
        "model.moe.normalize_topk=false",
        "model.moe.shared_expert_ffn_hidden_size=128",
        "model.moe.shared_expert_gate=true",
    ],
    "deepseek_v3": [
        "model.moe.num_experts=8",
        "model.moe.router_score_function='sigmoid'",
        "model.moe.expert_bias=true",
        "model.moe.load_balancing='seq_aux_loss'",
        "model.moe.aux_loss_coeff=0.0001",
        "model.moe.topk_scaling_factor=2.5",
        "model.moe.num_groups=4",
        "model.moe.group_topk=2",
        "model.moe.first_dense_layers=1",
        "model.moe.shared_expert_ffn_hidden_size=64",
    ],
    "switch_with_capacity": [
        "model.moe.router_topk=1",
        "model.moe.normalize_topk=false",
        "model.moe.capacity_factor=1.25",
        "model.moe.pad_to_capacity=true",
        "model.moe.layer_freq=2",
        "model.moe.z_loss_coeff=0.001",
        "model.moe.token_dispatcher='allgather'",
    ],
}


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("use_te", [False, True], ids=["local", "transformer_engine"])
def test_released_routers_build_a_config_megatron_core_accepts(router, use_te):
    recipe = load_recipe(MOE_RECIPE, ROUTERS[router])
    config = transformer_config(recipe, Layout.from_recipe(recipe, 1), use_te=use_te, gpu=False)
    moe = recipe.model.moe
    assert config.num_moe_experts == moe.num_experts and config.moe_router_topk == moe.router_topk
    # normalised top-k probabilities: a softmax over the chosen logits alone (or a sigmoid's, always)
    assert config.moe_router_pre_softmax == (moe.router_score_function == "softmax" and not moe.normalize_topk)
    assert config.moe_grouped_gemm == use_te
    pattern = config.moe_layer_freq
    assert pattern == ([0, 1, 1, 1] if moe.first_dense_layers else [1, 0, 1, 0] if moe.layer_freq == 2 else [1] * 4)


def test_normalize_topk_gives_each_token_probabilities_that_sum_to_one():
    """What model.moe.normalize_topk means, through megatron-core's own routing function."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    for normalize in (True, False):
        recipe = load_recipe(
            MOE_RECIPE, ["model.moe.num_experts=8", f"model.moe.normalize_topk={str(normalize).lower()}"]
        )
        config = transformer_config(recipe, Layout.from_recipe(recipe, 1), use_te=False, gpu=False)
        probs, _ = topk_routing_with_score_function(logits, 2, use_pre_softmax=config.moe_router_pre_softmax)
        sums = probs.sum(dim=-1)
        if normalize:
            assert torch.allclose(sums, torch.ones(16))
        else:
            assert (sums < 1).all()


def test_weights_of_another_mixture_are_refused_and_training_only_keys_may_change():
    """What [model.moe] makes the weights compute is checked against a checkpoint's model, key by
    key (the layer pattern as resolved); the balancing losses, capacity and dispatcher are not."""
    saved = tomllib.loads(recipe_to_toml(load_recipe(MOE_RECIPE)))["model"]
    changed_training = load_recipe(
        MOE_RECIPE,
        ["model.moe.aux_loss_coeff=0.1", "model.moe.token_dispatcher='allgather'", "model.moe.capacity_factor=2.0"],
    )
    assert check_recipe_matches(changed_training.model, saved, "ckpt", key="checkpoint.load") == []
    same_layers = load_recipe(MOE_RECIPE, ["model.moe.layer_pattern=[1,1,1,1]", "model.moe.ffn_hidden_size=64"])
    assert check_recipe_matches(same_layers.model, saved, "ckpt", key="checkpoint.load") == []
    other = load_recipe(MOE_RECIPE, ["model.moe.num_experts=8", "model.moe.first_dense_layers=1"])
    with pytest.raises(BigptError, match=r"model.moe.num_experts = 8 \(the checkpoint has 4\); model.moe.layers"):
        check_recipe_matches(other.model, saved, "ckpt", key="checkpoint.load")
    with pytest.raises(BigptError, match="model.family = 'decoder' \\(the checkpoint has 'moe_decoder'\\)"):
        check_recipe_matches(load_recipe(MOCK_RECIPE).model, saved, "ckpt", key="checkpoint.load")


def _groups(*identities) -> list[dict]:
    """Saved parameter groups: (wd_mult, is_expert_parallel) each, with their step."""
    return [
        {"wd_mult": wd, "is_expert_parallel": expert, "max_lr": 3e-3, "min_lr": 3e-4, "step": 3.0, "params": [0]}
        for wd, expert in identities
    ]


def test_optimizer_state_saved_by_one_optimizer_loads_into_two_and_back():
    """megatron-core chains a second distributed optimizer for the experts at EP > 1: the non-tensor
    state of a checkpoint takes the structure of this run's optimizers (the tensors, named without
    an optimizer prefix, already did). At EP 1 the experts sit in the dense groups, so the expert
    optimizer takes its groups' state from those."""
    two = SimpleNamespace(chained_optimizers=[object(), object()])
    one = SimpleNamespace(chained_optimizers=[object()])
    saved_by_one = {
        "optimizer": {"param_groups": _groups((1.0, False), (0.0, False))},
        "param_state_sharding_type": "fully_sharded_model_space",
        0: {"param_state": "tensors of the dense weights"},
        1: {"param_state": "tensors of the experts"},
    }
    live = state._as_live_optimizers(saved_by_one, two)
    assert set(live) == {0, 1} and live[1]["param_state"] == "tensors of the experts"
    assert live[1]["param_state_sharding_type"] == "fully_sharded_model_space"
    identities = {(g["wd_mult"], g["is_expert_parallel"]) for g in live[1]["optimizer"]["param_groups"]}
    assert (1.0, True) in identities and all(g["step"] == 3.0 for g in live[1]["optimizer"]["param_groups"])

    saved_by_two = {
        0: {"optimizer": {"param_groups": _groups((1.0, False), (0.0, False))}, "param_state_sharding_type": "x"},
        1: {"optimizer": {"param_groups": _groups((1.0, True))}, "param_state_sharding_type": "x"},
        "param_state": "tensors of every weight",
    }
    live = state._as_live_optimizers(saved_by_two, one)
    assert live["param_state"] == "tensors of every weight" and live["param_state_sharding_type"] == "x"
    assert {(g["wd_mult"], g["is_expert_parallel"]) for g in live["optimizer"]["param_groups"]} >= {
        (1.0, False),
        (0.0, False),
    }
    assert state._as_live_optimizers(saved_by_two, two) is saved_by_two  # the same structure: as saved


PARITY_STEPS = 4
EXPERT_LAYOUTS = {  # name: (processes, overrides); EP2 alone with the all-to-all dispatcher is moe_start's run
    "ep2": (2, ["parallel.expert=2"]),
    "ep2_pp2": (4, ["parallel.expert=2", "parallel.pipeline=2"]),
    "ep2_dp2": (4, ["parallel.expert=2"]),  # 4 data-parallel ranks; each expert's weights data-parallel over 2
    # expert TP 1: the expert weights are data-parallel over the 2 tensor-parallel ranks
    "tp2_ep2_sp": (
        4,
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2", "parallel.expert_tensor=1"],
    ),
    # expert TP 2 (the default, parallel.tensor): each expert split over the tensor-parallel ranks, the
    # all-to-all dispatcher gathering their tokens in uneven splits (cpu_compat._uneven_splits_over_gloo)
    "tp2_ep2_etp2_sp": (4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2"]),
}
PARITY_LAYOUTS = [  # every expert layout with both token dispatchers
    pytest.param(
        f"{name}_{dispatcher}",
        nproc,
        [*overrides, f"model.moe.token_dispatcher='{dispatcher}'"],
        id=f"{name}_{dispatcher}",
    )
    for name, (nproc, overrides) in EXPERT_LAYOUTS.items()
    for dispatcher in ("alltoall", "allgather")
    if (name, dispatcher) != ("ep2", "alltoall")
]


@pytest.fixture(scope="module")
def moe_start(tmp_path_factory):
    """A single-rank MoE checkpoint after 3 steps, the single-rank losses from it, and an EP2
    run (all-to-all dispatcher) from it that saves after step 2."""
    root = tmp_path_factory.mktemp("moe")
    run_bigpt(MOE_RECIPE, f"run_dir={root / 'init'}", "train.train_iters=3", "schedule.warmup_iters=1")
    checkpoint = root / "init" / "checkpoints" / "iter_0000003"
    run_bigpt(MOE_RECIPE, *_from(checkpoint, root / "reference"))
    ep2 = root / "ep2"
    run_bigpt(
        MOE_RECIPE,
        *_from(checkpoint, ep2),
        "parallel.expert=2",
        "checkpoint.save_interval=2",
        "checkpoint.keep_last=0",
        nproc=2,
    )
    return root, checkpoint, scalars(root / "reference", "train/loss"), ep2


def _from(checkpoint, run_dir):
    return [f"run_dir={run_dir}", f"init.from_checkpoint={checkpoint}", f"train.train_iters={PARITY_STEPS}"]


@pytest.mark.slow
def test_expert_parallel_all_to_all_trains_as_one_rank_and_resumes_at_any_expert_layout(moe_start, tmp_path):
    root, _, reference, ep2 = moe_start
    losses = scalars(ep2, "train/loss")
    assert losses == pytest.approx(reference, rel=1e-5), f"EP2: {losses} vs one rank {reference}"
    assert losses[-1] < losses[0]
    _export_computes_what_bigpt_computes(ep2 / "checkpoints" / "iter_0000002", tmp_path / "hf")
    resumed = run_bigpt(
        MOE_RECIPE,
        f"run_dir={tmp_path}",
        f"checkpoint.load={ep2 / 'checkpoints' / 'iter_0000002'}",
        f"train.train_iters={PARITY_STEPS}",
        "parallel.expert=2",
        nproc=2,
    )
    assert "resuming from" in resumed.stdout
    assert scalars(tmp_path, "train/loss") == losses[2:]
    # at another expert layout: EP 2 -> 1 (one optimizer where two saved), then 1 -> 2
    ep1 = tmp_path / "ep1"
    resume = [f"train.train_iters={PARITY_STEPS}", "checkpoint.save_interval=1", "checkpoint.keep_last=0"]
    run_bigpt(MOE_RECIPE, f"run_dir={ep1}", f"checkpoint.load={ep2 / 'checkpoints' / 'iter_0000002'}", *resume)
    assert scalars(ep1, "train/loss") == pytest.approx(losses[2:], rel=1e-5)
    back = tmp_path / "back_to_ep2"
    load_ep1 = f"checkpoint.load={ep1 / 'checkpoints' / 'iter_0000003'}"
    run_bigpt(MOE_RECIPE, f"run_dir={back}", load_ep1, *resume, "parallel.expert=2", nproc=2)
    assert scalars(back, "train/loss") == pytest.approx(losses[3:], rel=1e-5)
    # EP 2 -> 4 offline: tools/reshard.py runs its stage at the fewest ranks EP 4 allows (4)
    ep4 = tmp_path / "ep4_checkpoint"
    assert "parallel.expert=4" in reshard(ep2 / "checkpoints" / "iter_0000002", ep4, ["parallel.expert=4"])
    at_ep4 = tmp_path / "at_ep4"
    run_bigpt(MOE_RECIPE, f"run_dir={at_ep4}", f"checkpoint.load={ep4}", *resume, "parallel.expert=4", nproc=4)
    assert scalars(at_ep4, "train/loss") == pytest.approx(losses[2:], rel=1e-5)
    # MoE metrics, recorded once for every backend: megatron-core's balancing loss (before its
    # coefficient: about 1 for a balanced router) and the load of the busiest expert per layer
    balancing, imbalance = scalars(ep2, "train/moe_load_balancing_loss"), scalars(ep2, "train/moe_load_imbalance")
    assert len(balancing) == len(imbalance) == PARITY_STEPS
    assert all(0.9 < value < 2 for value in balancing) and all(1 <= value < 4 for value in imbalance)
    assert "| load balancing loss 1.0" in resumed.stdout and "| load imbalance " in resumed.stdout


def _export_computes_what_bigpt_computes(checkpoint: Path, out: Path) -> None:
    """A checkpoint trained at EP2, exported (in this process) as the Hugging Face family of its
    model (Mixtral: every layer MoE, renormalised top-k): transformers loads every weight and its
    logits are bigpt's, those of the checkpoint at one rank."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from bigpt.hf.convert import export_hf
    from bigpt.runtime.distributed import process_group_of_one
    from test_hf import TOLERANCE, reference_logits
    from test_hf_moe import logits_in_process

    with process_group_of_one():
        export_hf(checkpoint, out)
    model, loading = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM" and not any(loading.values()), loading
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 16))
    np.save(out.parent / "tokens.npy", tokens)
    ours = logits_in_process(
        MOE_RECIPE, out.parent / "logits", out.parent / "tokens.npy", f"init.from_checkpoint={checkpoint}"
    )
    assert np.abs(ours - reference_logits(out, tokens)).max() <= TOLERANCE


def test_an_expert_that_no_token_reached_for_an_interval_is_named(capsys):
    model = load_recipe(MOE_RECIPE).model
    metrics = MoEMetrics(model)
    metrics.interval_counts = torch.ones(model.num_layers, 4)
    metrics.interval_start = 5
    metrics._warn_about_idle_experts(model, 8)
    assert capsys.readouterr().err == ""
    metrics.interval_counts[2, 3] = 0
    metrics._warn_about_idle_experts(model, 8)
    assert "steps 5-8: no token reached layer 3 expert 3;" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("layout,nproc,overrides", PARITY_LAYOUTS)
def test_expert_layout_trains_as_one_rank(moe_start, layout, nproc, overrides):
    root, checkpoint, reference, _ = moe_start
    run_bigpt(MOE_RECIPE, *_from(checkpoint, root / layout), *overrides, nproc=nproc)
    losses = scalars(root / layout, "train/loss")
    assert losses == pytest.approx(reference, rel=1e-5), f"{layout}: {losses} vs one rank {reference}"


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize(
    "recipe_name,total,active",
    [  # the model cards' totals, and the parameter count of Mixtral's released safetensors
        ("mixtral_8x7b.toml", 46_702_792_704, 12.9e9),
        ("qwen3_30b_a3b.toml", 30.5e9, 3.3e9),
        ("qwen2_moe_a2_7b.toml", 14.3e9, 2.7e9),
        ("qwen3_235b_a22b.toml", 235e9, 22e9),
    ],
)
def test_published_moe_shapes_count_as_their_model_cards(recipe_name, total, active):
    model = load_recipe(RECIPES / recipe_name).model
    assert num_parameters(model) == pytest.approx(total, rel=2e-3)
    assert num_parameters(model, active=True) == pytest.approx(active, rel=2e-2)


def test_moe_flops_count_the_experts_a_token_passes():
    """Mixtral-8x7B by hand: per layer the attention matrices, the router and 2 of 8 SwiGLU
    experts; the output layer; the causal attention core at s/2 keys."""
    model = load_recipe(RECIPES / "mixtral_8x7b.toml").model
    hidden, layers, seq = 4096, 32, 4096
    attention = hidden * (hidden + 2 * 1024) + hidden * hidden
    two_experts = 2 * 3 * hidden * 14336
    router = hidden * 8
    forward = 2 * (layers * (attention + two_experts + router) + 32000 * hidden) + layers * 4 * (seq / 2) * hidden
    assert flops_per_token(model) == pytest.approx(3 * forward, rel=1e-12)
    dense = ModelConfig(**{**vars(model), "family": "decoder"})  # the same shape with one 14336-wide MLP
    assert flops_per_token(model) - flops_per_token(dense) == pytest.approx(6 * layers * (two_experts / 2 + router))


def test_expert_weights_and_their_optimizer_state_split_over_expert_parallelism():
    recipes = {ep: load_recipe(RECIPES / "mixtral_8x7b.toml", [f"parallel.expert={ep}"]) for ep in (1, 8)}
    by_ep = {ep: Layout.from_recipe(recipe, 64) for ep, recipe in recipes.items()}
    memory = {ep: stage_memory(recipes[ep], layout)[1] for ep, layout in by_ep.items()}
    experts = expert_parameters_per_stage(recipes[8].model, (8, 8, 8, 8))[1]
    assert experts == 8 * 8 * 3 * 4096 * 14336  # 8 layers of 8 SwiGLU experts
    assert memory[1].parameters - memory[8].parameters == experts - experts // 8
    # optimizer state: the dense weights over DP 16, the experts over the expert-data-parallel ranks
    dense = memory[8].parameters - experts // 8
    assert by_ep[8].expert_dp == 2 and by_ep[1].expert_dp == 16
    assert memory[8].optimizer == pytest.approx(12 * (dense / 16 + experts / 8 / 2))


def test_the_planner_ranks_expert_parallel_sizes_and_reports_the_all_to_all():
    recipe = load_recipe(RECIPES / "qwen3_30b_a3b.toml")
    plan = make_plan(recipe, 16, "h100-80gb", mfu=0.4, headroom=0.1, gpus_per_node=8)
    sizes = {option.layout.ep for option in plan.options}
    assert sizes <= {1, 2, 4, 8, 16} and 8 in sizes and all(128 % ep == 0 for ep in sizes)
    text = report(plan, top=5)
    assert "active         3,353,032,704" in text and " EP " in text.splitlines()[-6]
    layout = plan.chosen.layout
    tokens = 4096  # mbs 1 × seq 4096, no CP or SP
    assert all_to_all_bytes(plan.chosen.recipe, layout) == 4 * tokens * 8 * 2048 * 2 * 24 * 32 * 7 / 8
    assert "all-to-all       360.78 GB per GPU per step" in text


TP2_SP = ["parallel.tensor=2", "parallel.sequence_parallel=true"]


@pytest.mark.parametrize(
    "overrides,fewest",
    [
        (["parallel.expert=4"], 4),
        (["parallel.expert=4", *TP2_SP, "parallel.expert_tensor=1"], 2),
        (["parallel.expert=2", *TP2_SP, "parallel.expert_tensor=1"], 1),
        (["parallel.expert=2", *TP2_SP], 2),  # expert TP = TP: groups of 4
    ],
)
def test_the_fewest_ranks_an_expert_layout_runs_at(overrides, fewest):
    """What tools/reshard.py runs its stages at: the fewest data-parallel ranks that make a
    pipeline stage's ranks a multiple of EP x expert TP; fewer are refused."""
    recipe = load_recipe(MOE_RECIPE, overrides)
    assert fewest_data_parallel(recipe) == fewest
    model_parallel = recipe.parallel.tensor * recipe.parallel.pipeline
    assert Layout.from_recipe(recipe, model_parallel * fewest).dp == fewest
    if fewest > 1:
        with pytest.raises(BigptError, match="does not divide"):
            Layout.from_recipe(recipe, model_parallel * (fewest - 1))
    assert fewest_data_parallel(load_recipe(MOCK_RECIPE, ["parallel.tensor=2"])) == 1  # dense: no expert groups


def test_the_dp_reshardable_format_refuses_another_expert_layout_and_names_the_reshard(tmp_path):
    training = SimpleNamespace(layout=layout_of(world_size=1))
    marker = {
        "layout": {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": 2, "ep": 2, "etp": 1},
        "optimizer_format": "dp_reshardable",
    }
    with pytest.raises(BigptError, match=r"TP/PP/VPP/EP it was saved with \(ep 2 -> 1\).*tools/reshard.py"):
        state._check_optimizer_format(tmp_path / "checkpoints" / "iter_0000003", marker, training)
    state._check_optimizer_format(
        tmp_path / "checkpoints" / "iter_0000003", {**marker, "optimizer_format": "fully_sharded_model_space"}, training
    )


@pytest.mark.parametrize(
    "modules,flag",
    [(["moe"], "moe_layer_recompute"), (["shared_experts"], "shared_experts_recompute")],
)
def test_recomputing_moe_layers_changes_no_number_and_is_counted(modules, flag):
    """megatron-core's selective recompute of MoE layers (and their shared experts) runs on bigpt's
    CPU layer with the same loss and gradients as keeping the activations; the planner counts the
    forward it repeats and the memory it saves; modules with nothing to recompute are refused."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from bigpt.flops import recompute_flops_per_step
    from bigpt.memory import layer_activations
    from bigpt.model import build_model_chunks
    from bigpt.runtime.seeding import seed_everything
    from test_training_path import cpu_batch, world_of_one

    shared_and_dense = ["model.moe.shared_expert_ffn_hidden_size=32", "model.moe.first_dense_layers=1"]
    keeping = load_recipe(MOE_RECIPE, shared_and_dense)
    recomputing = load_recipe(
        MOE_RECIPE, [*shared_and_dense, "recompute.granularity='selective'", f"recompute.modules={modules}"]
    )
    results = []
    torch.manual_seed(0)
    batch = cpu_batch(keeping.model.seq_length)
    for recipe in (keeping, recomputing):
        with world_of_one():
            seed_everything(recipe.train.seed)
            (chunk,), _ = build_model_chunks(recipe, Layout.from_recipe(recipe))
            moe_layers = [layer.mlp for layer in chunk.decoder.layers if hasattr(layer.mlp, "router")]
            assert len(moe_layers) == recipe.model.num_layers - 1
            assert all(getattr(mlp, flag) == (recipe is recomputing) for mlp in moe_layers)
            losses = chunk(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            # the aux-loss gradient's scale, as the pipeline schedule sets it: left unset, megatron-core
            # keeps a scalar of its own for the process, which the next schedule cannot copy its [1] into
            MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
            losses.sum().backward()
            results.append((losses.detach(), [p.grad.clone() for p in chunk.parameters()]))
    (kept_loss, kept_grads), (loss, grads) = results
    assert torch.equal(loss, kept_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, kept_grads, strict=True))
    layout = Layout.from_recipe(recomputing)
    assert recompute_flops_per_step(recomputing, layout) > 0 == recompute_flops_per_step(keeping, layout)
    assert layer_activations(recomputing, layout) < layer_activations(keeping, layout)
    with pytest.raises(BigptError, match=r"recompute.modules names \['mlp'\], which this model does not have"):
        load_recipe(MOE_RECIPE, ["recompute.granularity='selective'", "recompute.modules=['mlp']"])
    with pytest.raises(BigptError, match=r"names \['moe'\]"):
        load_recipe(MOCK_RECIPE, ["recompute.granularity='selective'", "recompute.modules=['moe']"])


def test_moe_checkpoints_name_their_norms_as_transformer_engine_does(monkeypatch):
    """A checkpoint written on the local layers (a CPU run, a Hugging Face import) loads on Transformer
    Engine's and back. megatron-core's local spec names every pre-MLP norm as part of linear_fc1, where
    Transformer Engine fuses it, but Transformer Engine keeps an MoE layer's its own: no linear layer
    follows it. Transformer Engine's spec is read here with a stand-in backend (its modules cannot
    be built without it) for which of its layers fuse the norm."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.identity_op import IdentityOp

    from bigpt.model import build_model_chunks
    from test_training_path import world_of_one

    class FusedNormLinear:
        pass

    class TransformerEngineStructure(LocalSpecProvider):
        def column_parallel_layer_norm_linear(self):
            return FusedNormLinear

    recipe = load_recipe(MOE_RECIPE, ["model.moe.first_dense_layers=1"])
    layout = Layout.from_recipe(recipe)
    with world_of_one():
        with monkeypatch.context() as patched:
            patched.setattr(gpt_layer_specs, "TESpecProvider", TransformerEngineStructure)
            config = transformer_config(recipe, layout, use_te=True, gpu=False)
            te_layers = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=True).layer_specs
        (chunk,), _ = build_model_chunks(recipe, layout)
        names = {tensor.key for tensor in chunk.sharded_state_dict().values()}  # the names in a checkpoint
    te_norm_names = [
        "mlp.linear_fc1.layer_norm_weight"
        if layer.submodules.pre_mlp_layernorm is IdentityOp
        else "pre_mlp_layernorm.weight"
        for layer in te_layers
    ]
    fused, own = "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"
    assert te_norm_names == [fused] + [own] * (recipe.model.num_layers - 1)  # the dense layer, then MoE layers
    for i, norm in enumerate(te_norm_names):
        assert f"decoder.layers.{i}.{norm}" in names
        assert f"decoder.layers.{i}.{fused if norm == own else own}" not in names
