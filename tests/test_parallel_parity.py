"""Every parallel layout trains like a single rank: megatron-core over gloo on CPU.

Different layouts draw initial weights differently, so one single-rank run makes a checkpoint,
and every layout starts from it (`init.from_checkpoint`; dist_checkpointing reshards it), then
trains the same steps on the same data. The per-step losses must agree closely.
"""

import pytest

from multirank import MOCK_RECIPE, run_bigpt, scalars

pytestmark = pytest.mark.slow

STEPS = 4
LAYOUTS = [  # name, processes, overrides
    pytest.param("tp2", 2, ["parallel.tensor=2"], id="tp2"),
    pytest.param("pp2", 2, ["parallel.pipeline=2"], id="pp2"),
    pytest.param("pp2_vpp2", 2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"], id="pp2_vpp2"),
    pytest.param("dp2", 2, ["parallel.distributed_optimizer=true"], id="dp2_distributed_optimizer"),
    pytest.param("tp2_pp2", 4, ["parallel.tensor=2", "parallel.pipeline=2"], id="tp2_pp2"),
    # Recompute changes memory, never the numbers; sequence parallelism splits the norms' and
    # dropouts' sequence over the tensor-parallel ranks.
    pytest.param(
        "pp2_full_recompute", 2, ["parallel.pipeline=2", "recompute.granularity=full"], id="pp2_full_recompute"
    ),
    pytest.param(
        "tp2_sp_selective_recompute",
        2,
        # Unfused attention (CPU): both modules bigpt offers save memory.
        [
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
            "recompute.granularity=selective",
            'recompute.modules=["core_attn","mlp"]',
            "precision.transformer_engine=off",
        ],
        id="tp2_sp_selective_recompute",
    ),
]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A trained-for-a-few-steps single-rank checkpoint, and the single-rank losses from it."""
    root = tmp_path_factory.mktemp("parity")
    run_bigpt(MOCK_RECIPE, f"run_dir={root / 'init'}", "train.train_iters=3", "schedule.warmup_iters=1")
    checkpoint = root / "init" / "checkpoints" / "iter_0000003"
    reference = root / "reference"
    run_bigpt(MOCK_RECIPE, *_from(checkpoint, reference))
    return root, checkpoint, scalars(reference, "train/loss")


def _from(checkpoint, run_dir):
    return [f"run_dir={run_dir}", f"init.from_checkpoint={checkpoint}", f"train.train_iters={STEPS}"]


@pytest.mark.parametrize("layout,nproc,overrides", LAYOUTS)
def test_layout_matches_single_rank(start, layout, nproc, overrides):
    root, checkpoint, reference = start
    run_dir = root / layout
    run_bigpt(MOCK_RECIPE, *_from(checkpoint, run_dir), *overrides, nproc=nproc)
    losses = scalars(run_dir, "train/loss")
    assert len(losses) == STEPS
    assert losses == pytest.approx(reference, rel=2e-5), f"{layout}: {losses} vs single rank {reference}"


def test_loss_decreases_on_learnable_data(start):
    _, _, reference = start
    assert reference[-1] < reference[0] - 0.05, reference
