"""optimizer.name = "lion" and "muon" (megatron-core's emerging optimizers) with the distributed
optimizer, as users run them (torchrun over gloo on CPU, bf16, which megatron-core's layer-wise
distributed optimizer needs).

Per optimizer, from one AdamW-trained checkpoint (weights only): a single rank and a parallel
layout (Lion, element-wise: DP2; Muon, which orthogonalises whole matrices: TP2 × DP2) train the
same steps to the same losses, and each saves every step. Step 1's loss is made NaN (skipped), so
the checkpoint of step 1 holds an optimizer that never stepped: the single rank resumes from it
exactly. The parallel layout resumes from its checkpoint of step 2, whose optimizer holds a
momentum, bit-identically. The single rank saves in the fully_reshardable optimizer format, the
parallel layout in the default one (fully_sharded_model_space): each is resumed."""

import math

import pytest

from multirank import MOCK_RECIPE, run_bigpt, scalars

pytestmark = pytest.mark.slow

STEPS = 4
COMMON = [
    "precision.dtype=bf16",
    f"train.train_iters={STEPS}",
    "schedule.warmup_iters=0",  # every step updates
    "checkpoint.save_interval=1",
    "checkpoint.keep_last=0",
]
PARALLEL = {"lion": (2, []), "muon": (4, ["parallel.tensor=2"])}  # name: processes, overrides
SINGLE = (1, ["checkpoint.optimizer_format=fully_reshardable"])


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adamw")
    run_bigpt(MOCK_RECIPE, f"run_dir={run_dir}", "train.train_iters=3", "schedule.warmup_iters=1")
    return run_dir / "checkpoints" / "iter_0000003"


@pytest.fixture(scope="module")
def runs(weights, tmp_path_factory):
    """Optimizer → (single-rank run_dir, parallel run_dir), run on first use."""
    done = {}

    def get(name):
        if name not in done:
            root = tmp_path_factory.mktemp(name)
            for layout, (nproc, overrides) in (("single", SINGLE), ("parallel", PARALLEL[name])):
                run_bigpt(
                    MOCK_RECIPE,
                    f"run_dir={root / layout}",
                    f"optimizer.name={name}",
                    f"init.from_checkpoint={weights}",
                    *COMMON,
                    *overrides,
                    nproc=nproc,
                    fault="nan_loss@1",
                )
            done[name] = root / "single", root / "parallel"
        return done[name]

    return get


def _losses(run_dir) -> list[float]:
    return scalars(run_dir, "train/loss")


@pytest.mark.parametrize("name", PARALLEL)
def test_parallel_layout_trains_like_one_rank(runs, name):
    single, parallel = runs(name)
    reference, losses = _losses(single), _losses(parallel)
    assert math.isnan(reference[0]) and math.isnan(losses[0])  # step 1 skipped on both
    assert losses[1:] == pytest.approx(reference[1:], rel=1e-4), (
        f"{name}: {PARALLEL[name]} {losses} vs one rank {reference}"
    )
    assert reference[-1] < reference[1] - 0.1  # it learns (step 1 was skipped)


@pytest.mark.parametrize("name", PARALLEL)
def test_resume_is_bit_identical(runs, name, tmp_path):
    single, parallel = runs(name)
    for run_dir, (nproc, overrides), saved_at in ((single, SINGLE, 1), (parallel, PARALLEL[name], 2)):
        checkpoint = run_dir / "checkpoints" / f"iter_{saved_at:07d}"
        resumed = tmp_path / f"{run_dir.name}_from_{saved_at}"
        run_bigpt(
            MOCK_RECIPE,
            f"run_dir={resumed}",
            f"optimizer.name={name}",
            f"checkpoint.load={checkpoint}",
            *COMMON,
            *overrides,
            nproc=nproc,
        )
        assert _losses(resumed) == _losses(run_dir)[saved_at:], f"{name} resumed at step {saved_at}, {nproc} rank(s)"


def test_without_the_state_keys_fix_a_lion_checkpoint_does_not_resume(runs, tmp_path):
    """megatron-core 0.19 names the state of lion's AdamW part (embeddings, norms) after Lion: in the
    fully_reshardable and dp_reshardable formats it saves exp_avg only, and the load asks for
    exp_avg_sq. (The model-space format names the state the optimizer holds.)"""
    single, _ = runs("lion")
    failed = run_bigpt(
        MOCK_RECIPE,
        f"run_dir={tmp_path}",
        "optimizer.name=lion",
        *COMMON,
        f"checkpoint.load={single / 'checkpoints' / 'iter_0000003'}",
        check=False,
        fault="without_fix@_name_the_state_of_the_optimizer_it_wraps",
    )
    assert failed.returncode != 0 and "KeyError: 'exp_avg_sq'" in failed.stderr
