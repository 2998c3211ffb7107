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
from bigpt.hf.config import check_recipe_matches
from bigpt.layout import Layout
from bigpt.model import transformer_config
from bigpt.recipe import load_recipe, recipe_to_toml
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
    assert words in str(refused.value) and "mock_moe.toml" in str(refused.value), str(refused.value)


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


def test_a_resume_at_another_expert_layout_is_refused_saying_what_works(tmp_path):
    training = SimpleNamespace(layout=layout_of(world_size=1))
    marker = {"layout": {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": 2, "ep": 2, "etp": 1}}
    with pytest.raises(BigptError, match="ep 2 -> 1.*Resume at parallel.expert=2.*init.from_checkpoint"):
        state._check_expert_layout(tmp_path / "iter_0000003", marker, training)
    dense_marker = {"layout": {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": 1}}  # as dense checkpoints are tagged
    state._check_expert_layout(tmp_path / "iter_0000003", dense_marker, training)


PARITY_STEPS = 4
PARITY_LAYOUTS = [  # name, processes, overrides
    pytest.param(
        "ep2_pp2_allgather",
        4,
        ["parallel.expert=2", "parallel.pipeline=2", "model.moe.token_dispatcher='allgather'"],
        id="ep2_pp2_allgather",
    ),
    pytest.param(
        "tp2_ep2_sp",  # expert TP 1: the expert weights are data-parallel over 2 ranks
        4,
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2", "parallel.expert_tensor=1"],
        id="tp2_ep2_sp_expert_dp2",
    ),
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
def test_expert_parallel_all_to_all_trains_as_one_rank_and_resumes_bit_identically(moe_start, tmp_path):
    root, _, reference, ep2 = moe_start
    losses = scalars(ep2, "train/loss")
    assert losses == pytest.approx(reference, rel=1e-5), f"EP2: {losses} vs one rank {reference}"
    assert losses[-1] < losses[0]
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


@pytest.mark.slow
@pytest.mark.parametrize("layout,nproc,overrides", PARITY_LAYOUTS)
def test_expert_layout_trains_as_one_rank(moe_start, layout, nproc, overrides):
    root, checkpoint, reference, _ = moe_start
    run_bigpt(MOE_RECIPE, *_from(checkpoint, root / layout), *overrides, nproc=nproc)
    losses = scalars(root / layout, "train/loss")
    assert losses == pytest.approx(reference, rel=1e-5), f"{layout}: {losses} vs one rank {reference}"
