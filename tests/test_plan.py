"""The planner: memory terms against Megatron-LM's theoretical memory formulas and megatron-core's
schedule, step time and budget arithmetic, the ranked layouts, and its errors."""

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from bigpt.errors import BigptError
from bigpt.flops import GPUS, flops_per_step, num_parameters
from bigpt.layout import Layout
from bigpt.memory import in_flight_microbatches, layer_activations, peak_memory, stage_memory
from bigpt.plan import checkpoint_bytes, make_plan, report
from bigpt.recipe import load_recipe, padded_vocab_size
from tools.plan import main as plan_main

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
GIB = 2**30


def plan(recipe, gpus, gpu="h100-80gb", **kwargs):
    options = dict(mfu=0.4, headroom=0.1, gpus_per_node=8) | kwargs
    return make_plan(recipe, gpus, gpu, **options)


def gpt_recipe(**parallel):
    """A GPT-3-style layer (multi-head attention, 4h GeLU MLP, dropout), the case Megatron-LM's
    formulas (Korthikanti et al. Table 2) are written for."""
    overrides = [
        "model.num_query_groups=64",
        "model.activation='gelu'",
        "model.ffn_hidden_size=32768",
        "model.hidden_dropout=0.1",
        "model.attention_dropout=0.1",
        "train.micro_batch_size=2",
    ]
    overrides += [f"parallel.{key}={str(value).lower()}" for key, value in parallel.items()]
    return load_recipe(RECIPES / "llama_70b.toml", overrides)


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_layer_activations_match_megatrons_formulas(sequence_parallel):
    """SP + selective: 34·s·b·h/t (compute_activation_memory); no SP: (10 + 24/t)·s·b·h
    (compute_activation_memory_without_sp, before its 5% overhead factor)."""
    recipe = gpt_recipe(sequence_parallel=sequence_parallel)
    layout = Layout.from_recipe(recipe, 512)
    s, b, h, t = 8192, 2, 8192, 8
    megatron = 34 * s * b * h / t if sequence_parallel else (10 + 24 / t) * s * b * h
    assert layer_activations(recipe, layout) == megatron


def test_first_stage_activations_match_megatrons_interleaved_total():
    """Megatron's first-stage total: (every layer's activations + the embedding's inputs for pp
    micro-batches) × the interleaving penalty 1 + (pp - 1) / (pp × vpp), over t. bigpt leaves
    the embedding's inputs (token ids, embedding dropout mask) out."""
    recipe = gpt_recipe(sequence_parallel=True)
    layout = Layout.from_recipe(recipe, 512)
    s, b, h, t, pp, vpp, layers = 8192, 2, 8192, 8, 4, 5, 80
    penalty = 1 + (pp - 1) / (pp * vpp)
    embedding_inputs = (8 * s * b + s * b * h) * pp
    megatron = (34 * s * b * h * layers + embedding_inputs) * penalty / t
    first = stage_memory(recipe, layout)[0]
    assert first.activations == pytest.approx(megatron - embedding_inputs * penalty / t, rel=1e-12)


@pytest.mark.parametrize("recipe_name, world", [("llama_70b.toml", 512), ("llama3_8b.toml", 8)])
def test_weights_and_optimizer_match_megatrons_formula(recipe_name, world):
    """compute_weight_and_optimizer_memory: the most loaded shard (its share of the layers, the
    final norm spread over stages, the embedding, and the output layer without pipelining) ×
    (6 + 12 / dp) bytes with the distributed optimizer. bigpt puts the final norm on the last
    stage, hence the 1e-6 tolerance."""
    recipe = load_recipe(RECIPES / recipe_name)
    layout = Layout.from_recipe(recipe, world)
    model, tp, pp, dp = recipe.model, layout.tp, layout.pp, layout.dp
    h, groups, heads = model.hidden_size, model.num_query_groups, model.num_attention_heads
    layer = 2 * h * (model.ffn_hidden_size * 1.5 + 1) + 2 * h * h * (1 + groups / heads)
    block = layer * model.num_layers + h
    embedding = h * padded_vocab_size(model, tp)
    shard = (block / pp + embedding) / tp + (embedding / tp if pp == 1 else 0)
    first = stage_memory(recipe, layout)[0]
    assert first.weights + first.gradients + first.optimizer == pytest.approx(shard * (6 + 12 / dp), rel=1e-6)


@pytest.mark.parametrize("pp, vpp, microbatches", [(4, 1, 8), (4, 1, 2), (4, 5, 64), (2, 2, 2), (8, 2, 8), (1, 1, 4)])
def test_in_flight_microbatches_follow_megatron_cores_schedule(pp, vpp, microbatches):
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    layout = Layout(
        world_size=pp,
        tp=1,
        pp=pp,
        vpp=vpp,
        cp=1,
        dp=1,
        micro_batch_size=1,
        global_batch_size=microbatches,
        num_microbatches=microbatches,
        sequence_parallel=False,
        layers_per_stage=(vpp,) * pp,
    )
    for stage in range(pp):
        group = SimpleNamespace(size=lambda: pp, rank=lambda stage=stage: stage)
        p2p = SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
        total, all_warmup, warmup, _ = get_pp_rank_microbatches(microbatches, vpp, pp, p2p_communicator=p2p)
        expected = total if all_warmup else warmup + 1
        assert in_flight_microbatches(layout, stage) == expected


def test_full_recompute_keeps_only_layer_inputs():
    recipe = load_recipe(RECIPES / "llama_70b.toml", ["recompute.granularity='full'", "recompute.num_layers=4"])
    layout = Layout.from_recipe(recipe, 512)
    without = load_recipe(RECIPES / "llama_70b.toml")
    first, before = stage_memory(recipe, layout)[0], stage_memory(without, layout)[0]
    layer_input = 2 * 8192 * 8192 / 8  # bf16 s·h over the tensor-parallel group (sequence parallel)
    one_layer = layer_activations(without, layout)
    # 4-layer chunks, one checkpointed input each per in-flight micro-batch, one chunk rebuilt.
    assert first.activations == first.in_flight * layer_input + 4 * one_layer
    assert first.activations < before.activations / 10


LLAMA3_8B_LAYER_FORWARD = 2 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336) + 2 * 2 * 4096 * 4096
"""Forward FLOPs per token of one llama3_8b layer: its matmuls, and the scores over s/2 keys."""


@pytest.mark.parametrize(
    "overrides, recomputed_per_token",
    [
        ([], 0),
        # full, uniform: every layer's forward once more
        (['recompute.granularity="full"'], 32 * LLAMA3_8B_LAYER_FORWARD),
        # selective mlp: every layer's MLP forward (gate and value in, one out) once more
        (['recompute.granularity="selective"', 'recompute.modules=["mlp"]'], 32 * 2 * 3 * 4096 * 14336),
        # core_attn on unfused attention: the scores' forward once more (about 4% of the model's FLOPs)
        (
            ['recompute.granularity="selective"', "precision.transformer_engine='off'"],
            32 * 2 * 2 * 4096 * 4096,
        ),
    ],
)
def test_step_time_includes_the_recompute_cost(overrides, recomputed_per_token):
    recipe = load_recipe(RECIPES / "llama3_8b.toml", overrides)
    result = plan(recipe, 8)
    chosen = result.chosen
    assert chosen.bubble == 0
    model_flops = flops_per_step(recipe, 128)
    hardware_flops = model_flops + recomputed_per_token * 128 * 8192
    assert result.step_seconds(chosen) == pytest.approx(hardware_flops / (8 * 989e12 * 0.4), rel=1e-12)
    assert result.logged_mfu(chosen) == pytest.approx(0.4 * model_flops / hardware_flops, rel=1e-12)
    if recomputed_per_token:
        assert "recomputed" in report(result, top=1)


def test_block_recompute_reruns_the_first_layers_of_each_chunk():
    """70B at PP 4 × VPP 5: 20 chunks of 4 layers; block with num_layers 1 re-runs 20 of 80 layers."""
    recipe = load_recipe(
        RECIPES / "llama_70b.toml",
        ['recompute.granularity="full"', 'recompute.method="block"', "recompute.num_layers=1"],
    )
    result = plan(recipe, 512)
    h, kv, ffn, s = 8192, 8 * 128, 28672, 8192
    layer_forward = 2 * (h * (h + 2 * kv) + h * h + 3 * h * ffn) + 2 * 2 * (s / 2) * h
    hardware_flops = flops_per_step(recipe, 1024) + 20 * layer_forward * 1024 * s
    expected = hardware_flops / (512 * 989e12 * 0.4) * (1 + result.chosen.bubble)
    assert result.step_seconds(result.chosen) == pytest.approx(expected, rel=1e-12)


def test_selective_recompute_of_the_mlp_drops_its_inner_activations():
    """Under Transformer Engine (norm fused into the first MLP linear): the three ffn-wide SwiGLU
    tensors and the norm's output, per layer, bf16, over TP 2 (sequence parallel)."""
    recipe = load_recipe(RECIPES / "llama3_8b.toml")
    recomputed = load_recipe(
        RECIPES / "llama3_8b.toml", ['recompute.granularity="selective"', 'recompute.modules=["mlp"]']
    )
    layout = Layout.from_recipe(recipe, 8)
    tokens, element = 8192, 2
    saved = element * tokens * (3 * 14336 + 4096) / 2
    assert layer_activations(recipe, layout) - layer_activations(recomputed, layout) == saved
    assert stage_memory(recipe, layout)[0].activations - stage_memory(recomputed, layout)[0].activations == 32 * saved


def test_selective_recompute_modules_reach_megatron_core():
    from bigpt.model import transformer_config

    recipe = load_recipe(
        Path(__file__).resolve().parent / "recipes" / "mock_tiny.toml",
        [
            'recompute.granularity="selective"',
            'recompute.modules=["core_attn", "mlp"]',
            'precision.transformer_engine="off"',
        ],
    )
    config = transformer_config(recipe, Layout.from_recipe(recipe, 1), use_te=False, gpu=False)
    assert config.recompute_granularity == "selective" and config.recompute_modules == ["core_attn", "mlp"]


@pytest.mark.parametrize("modules", ['["core_attn"]', '["mlp", "core_attn"]'])
def test_selective_recompute_that_saves_nothing_under_transformer_engine_is_refused(modules):
    overrides = ['recompute.granularity="selective"', f"recompute.modules={modules}"]
    # the refusal names the override that set recompute.modules (the recipe sets neither key)
    refusal = 'saves no memory in override \'recompute.modules=.*recompute.modules = \\["mlp"\\]'
    with pytest.raises(BigptError, match=refusal):
        load_recipe(RECIPES / "llama3_8b.toml", overrides)
    unfused = load_recipe(RECIPES / "llama3_8b.toml", [*overrides, 'precision.transformer_engine="off"'])
    layout = Layout.from_recipe(unfused, 8)
    without = load_recipe(RECIPES / "llama3_8b.toml", ['precision.transformer_engine="off"'])
    assert layer_activations(unfused, layout) < layer_activations(without, layout)


def test_llama_70b_on_512_gpus():
    recipe = load_recipe(RECIPES / "llama_70b.toml")
    result = plan(recipe, 512)
    chosen = result.chosen
    assert result.recipe_layout_problem is None and chosen.layout == Layout.from_recipe(recipe, 512)
    assert chosen.memory == peak_memory(recipe, chosen.layout) and result.fits(chosen)
    text = report(result, top=10)
    assert "70,553,706,496" in text and "stage 3" in text and "sharded over DP 16" in text
    # Step time: the training log's FLOPs at the stated MFU, stretched by the pipeline bubble.
    flops = flops_per_step(recipe, 1024)
    bubble = 3 / (5 * 64)
    assert chosen.bubble == bubble
    assert result.step_seconds(chosen) == pytest.approx(flops / (512 * 989e12 * 0.4) * (1 + bubble))
    assert result.logged_mfu(chosen) == pytest.approx(0.4 / (1 + bubble))
    # Budget: 240k steps of 1024 × 8192 tokens against 20 tokens per parameter.
    tokens = 240_000 * 1024 * 8192
    assert f"{tokens:.3g} tokens: {240_000 * flops:.3g} FLOPs" in text
    assert f"{240_000 * flops / 1e15 / 86400:,.0f} PF/s-days" in text
    assert f"{tokens / 70_553_706_496:.1f} tokens/parameter" in text and "over-trained" in text


def test_ranked_layouts_are_valid_fit_and_start_small():
    recipe = load_recipe(RECIPES / "llama3_8b.toml")
    result = plan(recipe, 8)
    assert result.options and "← recipe" in report(result, top=len(result.options))
    usable = 0.9 * GPUS["h100-80gb"].memory_gib * GIB
    for option in result.options:
        assert Layout.from_recipe(option.recipe, 8) == option.layout
        assert option.memory.total <= usable and option.layout.tp <= 8
    model_parallel = [o.layout.tp * o.layout.pp * o.layout.cp for o in result.options]
    assert model_parallel == sorted(model_parallel)
    # A smaller GPU admits fewer layouts; an 8B model does not fit one 40 GB GPU whole.
    small = plan(recipe, 8, "a100-40gb")
    assert 0 < len(small.options) < len(result.options)
    assert all(o.layout.tp * o.layout.pp * o.layout.cp > 1 for o in small.options)


def test_a_layout_the_gpu_count_cannot_take_is_replaced_by_the_best():
    recipe = load_recipe(RECIPES / "llama_70b.toml")
    result = plan(recipe, 256)
    assert result.recipe_layout_problem is None  # 256 = 8 × 4 × DP 8
    odd = plan(recipe, 40)
    assert "world size 40 is not a multiple" in odd.recipe_layout_problem
    assert odd.chosen == odd.options[0]
    assert "the recipe's own does not work here" in report(odd, top=3)


def test_a_recipe_layout_that_does_not_fit_is_reported_beside_ones_that_do():
    recipe = load_recipe(RECIPES / "llama_70b.toml", ["train.micro_batch_size=4"])
    result = plan(recipe, 512)
    assert not result.fits(result.chosen) and result.options
    assert "DOES NOT FIT" in report(result, top=3) and "← recipe" not in report(result, top=len(result.options))


def test_parameter_counts_in_the_report_are_the_published_ones(capsys):
    assert plan_main([str(RECIPES / "llama3_8b.toml"), "--gpus", "8", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert (
        "8,030,261,248 (8.03B)" in out
        and num_parameters(load_recipe(RECIPES / "llama3_8b.toml").model) == 8_030_261_248
    )


@pytest.mark.parametrize(
    "recipe_name, published",
    [
        ("continual/qwen2_5_7b_math.toml", 7_615_616_512),  # Qwen2.5-7B: q/k/v biases
        ("continual/qwen3_8b_legal.toml", 8_190_735_360),  # Qwen3-8B: per-head q/k norms
        ("continual/mistral_7b_medical.toml", 7_241_732_096),  # Mistral-7B-v0.1
    ],
)
def test_family_recipes_count_the_published_parameters(recipe_name, published):
    assert num_parameters(load_recipe(RECIPES / recipe_name).model) == published


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus", "512", "--gpu", "t4"], "unknown GPU 't4'; the planner knows h100-80gb, h200-141gb, a100-80gb"),
        (["--gpus", "8", "--gpu", "a100-40gb"], "fits on no layout of 8 × a100-40gb"),
        (["--gpus", "7"], "no layout of"),
        (["--gpus", "512", "--gpu", "a100-80gb", "precision.fp8='tensorwise'"], "needs FP8 tensor cores"),
        (["--gpus", str(10**12)], "no layout of"),  # answered at once: each degree is bounded by what it splits
        (["--gpus", str(10**12), "--gpus-per-node", str(10**12)], "no layout of"),
    ],
)
def test_bad_input_is_refused(capsys, argv, message):
    assert plan_main([str(RECIPES / "llama_70b.toml"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigpt: error: ") and message in err and "Traceback" not in err


def test_fits_nowhere_suggests_full_recompute_then_more_gpus(capsys):
    assert plan_main([str(RECIPES / "llama_70b.toml"), "--gpus", "8", 'recompute.granularity="full"']) == 2
    err = capsys.readouterr().err
    assert "fits on no layout" in err and "more or larger GPUs" in err and "recompute" not in err.split("usable;")[1]


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        plan_main(["--help"])
    assert exit_.value.code == 0 and "--gpus" in capsys.readouterr().out


def test_layout_arithmetic_is_shared_with_the_dry_run():
    """The planner's layouts are Layout.from_recipe's: a degree change it makes is re-checked."""
    recipe = load_recipe(RECIPES / "llama3_8b.toml")
    for option in plan(recipe, 16).options:
        assert math.prod((option.layout.tp, option.layout.pp, option.layout.cp, option.layout.dp)) == 16
        assert dataclasses.asdict(option.recipe.model) == dataclasses.asdict(recipe.model)


def test_checkpoint_size_and_save_time(capsys):
    """70B in bf16: 2 bytes of weights + 12 of fp32 optimizer state per parameter; the busiest rank
    (of the largest stage) writes a data-parallel share (DP 16) of its model shard, in every
    optimizer format (the fully parallel save spreads what data-parallel ranks all hold)."""
    recipe = load_recipe(RECIPES / "llama_70b.toml")
    layout = Layout.from_recipe(recipe, 512)
    total, busiest = checkpoint_bytes(recipe, layout)
    assert total == 70_566_289_408 * 14
    per_gpu = 18_170_060_800 / 8
    assert layout.dp == 16 and busiest == pytest.approx(per_gpu * 14 / 16)
    gathered = load_recipe(RECIPES / "llama_70b.toml", ['checkpoint.optimizer_format="fully_reshardable"'])
    assert checkpoint_bytes(gathered, layout) == (total, busiest)
    assert plan_main([str(RECIPES / "llama_70b.toml"), "--gpus", "512", "--fs-gbps", "10"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint       {total / 1e9:,.1f} GB per save" in out and f"{total / 1e10:,.0f} s at 10 GB/s" in out
    assert "asynchronous" in out and "warning" not in out


def test_synchronous_saves_that_cost_too_much_time_are_warned_about(capsys):
    frequent = [str(RECIPES / "llama_70b.toml"), "--gpus", "512", "checkpoint.async_save=false"]
    assert plan_main([*frequent, "checkpoint.save_interval=1000"]) == 0
    assert "synchronous: 1.0% of training time" in capsys.readouterr().out
    assert plan_main([*frequent, "checkpoint.save_interval=50"]) == 0
    out = capsys.readouterr().out
    assert "synchronous: 17.4% of training time" in out and "warning        synchronous saves take more than 3%" in out
