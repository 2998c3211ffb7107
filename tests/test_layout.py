"""Layout: derived degrees, megatron-core's layer split, and each divisibility rule.

Cases are the shipped tiny recipe (4 layers, 4 heads, 2 query groups, ffn 344, seq 128,
mbs 2, gbs 8, TP 2 × PP 2) plus overrides.
"""

from pathlib import Path

import pytest

from bigpt.errors import BigptError
from bigpt.layout import Layout
from bigpt.recipe import load_recipe

TINY = Path(__file__).resolve().parent.parent / "recipes/tiny.toml"


def layout(world_size, *overrides) -> Layout:
    return Layout.from_recipe(load_recipe(TINY, overrides), world_size)


def layout_error(world_size, *overrides) -> str:
    with pytest.raises(BigptError) as info:
        layout(world_size, *overrides)
    return str(info.value)


def test_data_parallel_is_derived_from_world_size():
    result = layout(8)
    assert (result.world_size, result.tp, result.pp, result.vpp, result.cp, result.dp) == (8, 2, 2, 1, 1, 2)
    assert result.num_microbatches == 2
    assert result.layers_per_stage == (2, 2)


def test_no_world_size_uses_parallel_data():
    assert layout(None).world_size == 4
    assert layout(None, "parallel.data=2", "train.global_batch_size=16").world_size == 8


def test_world_size_must_be_a_multiple_of_model_parallel():
    message = layout_error(6)
    assert "world size 6 is not a multiple of parallel.tensor × parallel.pipeline × parallel.context" in message


def test_parallel_data_must_agree_with_world_size():
    assert "parallel.data=4 but world size 8" in layout_error(8, "parallel.data=4")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["parallel.tensor=8", "model.num_attention_heads=8", "model.num_query_groups=4"],
            "model.num_query_groups=4 is not divisible by parallel.tensor=8",
        ),
        (["model.ffn_hidden_size=345"], "model.ffn_hidden_size=345 is not divisible by parallel.tensor=2"),
    ],
)
def test_tensor_parallel_needs_even_shards(overrides, expected):
    message = layout_error(16, *overrides)
    assert expected in message and "parallel.tensor can be one of [1" in message


def test_layers_must_split_evenly_over_pipeline_chunks():
    message = layout_error(4, "model.num_layers=5")
    assert "model.num_layers=5 does not split evenly" in message and "first_stage_layers" in message


def test_uneven_first_and_last_stages():
    result = layout(
        8,
        "parallel.pipeline=4",
        "parallel.tensor=1",
        "model.num_layers=10",
        "parallel.first_stage_layers=2",
        "parallel.last_stage_layers=2",
    )
    assert result.layers_per_stage == (2, 3, 3, 2)
    assert layout(4, "model.num_layers=5", "parallel.first_stage_layers=2").layers_per_stage == (2, 3)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.num_layers=5", "parallel.first_stage_layers=2", "parallel.last_stage_layers=2"],
        ["model.num_layers=4", "parallel.first_stage_layers=4"],
        ["model.num_layers=4", "parallel.first_stage_layers=6"],
    ],
)
def test_uneven_stages_never_drop_layers(overrides):
    assert "middle pipeline stage(s)" in layout_error(4, *overrides)


def test_uneven_stages_must_divide_into_virtual_chunks():
    message = layout_error(4, "model.num_layers=8", "parallel.virtual_pipeline=2", "parallel.first_stage_layers=3")
    assert "are not all multiples of parallel.virtual_pipeline=2" in message


def test_stage_layers_need_pipeline_parallelism():
    assert "need parallel.pipeline > 1" in layout_error(2, "parallel.pipeline=1", "parallel.first_stage_layers=2")


def test_interleaving():
    result = layout(4, "model.num_layers=8", "parallel.virtual_pipeline=2")
    assert (result.vpp, result.layers_per_stage) == (2, (4, 4))
    assert "needs parallel.pipeline > 1" in layout_error(2, "parallel.pipeline=1", "parallel.virtual_pipeline=2")


def test_interleaving_needs_microbatches_in_multiples_of_pipeline():
    message = layout_error(4, "model.num_layers=8", "parallel.virtual_pipeline=2", "train.global_batch_size=6")
    assert "gives 3 micro-batches, not a multiple of parallel.pipeline=2" in message
    assert "microbatch_group_size_per_vp_stage" in message


def test_global_batch_must_divide_by_micro_batch_times_data_parallel():
    message = layout_error(8, "train.global_batch_size=6")
    assert "train.global_batch_size 6 is not divisible by train.micro_batch_size × data parallel = 2×2 = 4" in message


def test_every_rampup_batch_size_must_divide():
    assert layout(4, "train.rampup_batch_size=[4, 2, 100]").num_microbatches == 4
    message = layout_error(8, "train.rampup_batch_size=[2, 2, 100]")
    assert "ramp-up batch size 2 (train.rampup_batch_size)" in message


def test_sequence_parallel_needs_tensor_parallel():
    message = layout_error(2, "parallel.tensor=1", "parallel.sequence_parallel=true")
    assert "parallel.sequence_parallel=true needs parallel.tensor > 1" in message


def test_sequence_parallel_needs_sequence_divisible_by_tensor():
    message = layout_error(4, "parallel.sequence_parallel=true", "model.seq_length=127")
    assert "model.seq_length / parallel.context = 127 is not divisible by parallel.tensor=2" in message


def test_context_parallel_needs_sequence_divisible_by_twice_context():
    assert layout(8, "parallel.context=2").cp == 2
    message = layout_error(12, "parallel.context=3")
    assert "model.seq_length=128 is not divisible by 2 × parallel.context = 6" in message


def test_param_gather_overlap_needs_distributed_optimizer():
    assert "parallel.overlap_param_gather=true needs" in layout_error(4, "parallel.overlap_param_gather=true")


@pytest.mark.parametrize("name", ["lion", "muon"])
def test_emerging_optimizers_shard_in_bf16_only(name):
    message = layout_error(4, f'optimizer.name="{name}"', 'precision.dtype="fp32"')
    assert f"optimizer.name={name!r} with parallel.distributed_optimizer=true needs precision.dtype='bf16'" in message
    layout(4, f'optimizer.name="{name}"', 'precision.dtype="fp32"', "parallel.distributed_optimizer=false")
