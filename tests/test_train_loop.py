"""The training loop end to end on one CPU rank: logged scalars, validation, refusals, ramp-up
(exact resume is tested after SIGKILL and preemption in test_fault_tolerance.py)."""

import json
import math

import pytest

from bigpt.checkpoint import store
from bigpt.paths import WRITTEN_BY
from multirank import MOCK_RECIPE, run_bigpt, scalars

pytestmark = pytest.mark.slow


DROPOUT = ("model.hidden_dropout=0.1", "model.attention_dropout=0.1")


def test_tensorboard_has_every_logged_scalar_and_dropout_resumes_exactly(tmp_path):
    result = run_bigpt(
        MOCK_RECIPE,
        f"run_dir={tmp_path}",
        "eval.interval=3",
        "eval.iters=1",
        "checkpoint.save_interval=3",
        "logging.interval=4",
        *DROPOUT,
    )
    for tag in ("loss", "lr", "grad_norm", "step_time", "tokens_per_s", "tflops", "memory_gib"):
        assert len(scalars(tmp_path, f"train/{tag}")) == 6, tag
    losses = scalars(tmp_path, "train/loss")
    means = [sum(losses[:4]) / 4, sum(losses[4:]) / 2]  # the logging steps 4 and 6 (the last)
    assert scalars(tmp_path, "train/loss_interval_mean") == pytest.approx(means, rel=1e-6)
    assert f"step 6/6 | tokens 3,072 | loss {means[1]:.4f} |" in result.stdout
    valid = scalars(tmp_path, "valid/loss")
    assert len(valid) == 2  # steps 3 and 6
    assert scalars(tmp_path, "valid/perplexity") == pytest.approx([math.exp(v) for v in valid])
    assert "step 6/6" in result.stdout and "validation loss" in result.stdout
    assert (tmp_path / "recipe.toml").is_file()
    # Dropout draws from the RNG the checkpoint carries: resumed at step 3 and evaluated at other
    # steps (evaluations and the resume make new data iterators), the run trains bit-identically.
    # The checkpoint says it was saved at data parallel 2 (as a DP=2 run's would): TP and PP are
    # unchanged, so the RNG state is restored all the same (it was dropped at any layout change).
    resumed = tmp_path / "resumed"
    checkpoint = tmp_path / "checkpoints" / "iter_0000003"
    marker = json.loads((checkpoint / "bigpt.json").read_text())
    (checkpoint / "bigpt.json").write_text(json.dumps({**marker, "layout": {**marker["layout"], "dp": 2}}))
    run_bigpt(
        MOCK_RECIPE, f"run_dir={resumed}", f"checkpoint.load={checkpoint}", "eval.interval=1", "eval.iters=1", *DROPOUT
    )
    assert scalars(resumed, "train/loss") == scalars(tmp_path, "train/loss")[3:]
    # A 4× longer context as a new phase from these weights, YaRN over the 64 tokens they were
    # trained at (docs/huggingface.md): it loads and trains.
    longer = run_bigpt(
        MOCK_RECIPE,
        f"run_dir={tmp_path / 'longer'}",
        f"init.from_checkpoint={tmp_path / 'checkpoints'}",
        "model.seq_length=256",
        'model.rope_scaling="yarn"',
        "model.rope_scaling_factor=4.0",
        "model.rope_original_max_position_embeddings=64",
        'checkpoint.allow_model_changes=["rope_scaling"]',
        "train.train_iters=2",
        "schedule.warmup_iters=1",
    )
    assert "changed by checkpoint.allow_model_changes: model.rope_scaling 'none' -> 'yarn'" in longer.stdout
    assert "step 2/2 | tokens 4,096 |" in longer.stdout
    assert all(math.isfinite(loss) for loss in scalars(tmp_path / "longer", "train/loss"))


def test_checkpoint_of_another_shape_and_a_fresh_start_over_a_run_are_refused(tmp_path):
    run_bigpt(
        MOCK_RECIPE,
        f"run_dir={tmp_path}",
        "train.train_iters=3",
        "schedule.warmup_iters=1",
        "checkpoint.save_interval=1",
    )
    checkpoints = tmp_path / "checkpoints"
    before = {p: p.read_bytes() for p in sorted(checkpoints.rglob("*")) if p.is_file()}
    result = run_bigpt(
        MOCK_RECIPE,
        f"run_dir={tmp_path}",
        "checkpoint.load=auto",
        "model.hidden_size=128",
        "model.ffn_hidden_size=320",
        check=False,
    )
    assert result.returncode != 0  # torchrun reports 1 for any failed rank; the rank itself exits 2
    assert "does not match the recipe's model: model.hidden_size = 128 (the checkpoint has 64)" in result.stderr
    assert "Traceback" not in result.stderr.split("bigpt: error")[1].split("\n")[0]
    # The same mistake as a fresh start (what the error used to advise): refused, nothing overwritten or pruned.
    result = run_bigpt(
        MOCK_RECIPE,
        f"run_dir={tmp_path}",
        "checkpoint.load=none",
        "model.hidden_size=128",
        "model.ffn_hidden_size=320",
        "checkpoint.save_interval=2",
        "checkpoint.keep_last=1",
        check=False,
    )
    assert result.returncode != 0
    assert (
        f"checkpoint.dir {checkpoints} holds checkpoints of another run (iter_0000002, iter_0000003)" in result.stderr
    )
    assert {p: p.read_bytes() for p in sorted(checkpoints.rglob("*")) if p.is_file()} == before
    # A resume with a longer run, a later decay and new lr bounds (a re-warmed continual run): the
    # recipe's optimizer and schedule win, said in the log and in recipe.toml. With twice the batch
    # and half the sequence: the counters stay true (tokens counted as consumed, not recomputed from
    # the new batch and length), and the schedule's points stay at their steps.
    resume = (
        "checkpoint.load=auto",
        "train.train_iters=4",
        "schedule.warmup_iters=1",
        "schedule.decay_iters=12",
        "optimizer.lr=2e-3",
        "optimizer.min_lr=2e-4",
        "train.global_batch_size=16",
        "model.seq_length=32",
    )
    # megatron-core alone cannot load the optimizer state with other lr bounds (its groups are keyed by them).
    failed = run_bigpt(
        MOCK_RECIPE, f"run_dir={tmp_path}", *resume, fault="without_fix@_resume_with_new_lr_bounds", check=False
    )
    assert failed.returncode != 0 and "KeyError" in failed.stderr
    result = run_bigpt(MOCK_RECIPE, f"run_dir={tmp_path}", *resume)
    assert (
        "the recipe's optimizer and schedule replace the checkpoint's: optimizer.lr 0.003 -> 0.002; "
        "optimizer.min_lr 0.0003 -> 0.0002; schedule.decay_iters unset -> 12; train.train_iters 3 -> 4"
    ) in result.stdout
    assert (
        "resuming with train.global_batch_size 8 -> 16; model.seq_length 64 -> 32 since the checkpoint: its counters "
        "stay true (24 samples and 1,536 tokens consumed by step 3); the training data is cut into 32-token samples "
        "now" in result.stdout
    )
    assert "the 1 step left read 16 samples from sample 48 of the training stream on" in result.stdout
    assert "step 4/4 | tokens 2,048 |" in result.stdout  # 1,536 + 16 × 32
    marker = store.read_marker(checkpoints / "iter_0000004")
    assert (marker["consumed_samples"], marker["consumed_tokens"], marker["seq_length"]) == (40, 2048, 32)
    # cosine from lr 2e-3 to min_lr 2e-4, in samples: warmup ends at step 1 (8 samples, as consumed), decay at
    # step 12 (24 samples by step 3, then 16 a step: 168); after step 4: 40
    expected = 2e-4 + 0.5 * (math.cos(math.pi * (40 - 8) / (168 - 8)) + 1) * (2e-3 - 2e-4)
    assert scalars(tmp_path, "train/lr")[3] == pytest.approx(expected, rel=1e-6)  # the checkpoint's: 3e-4
    assert "decay_iters = 12" in (tmp_path / "recipe.toml").read_text()  # its own recipe.toml, rewritten
    assert (tmp_path / "recipe.toml").read_text().startswith(WRITTEN_BY)


def test_launching_the_wrong_number_of_ranks_is_refused(tmp_path):
    result = run_bigpt(MOCK_RECIPE, f"run_dir={tmp_path}", "parallel.tensor=2", nproc=3, check=False)
    assert result.returncode != 0
    assert "world size 3 is not a multiple of parallel.tensor" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_global_batch_ramps_up(tmp_path):
    """train.rampup_batch_size=[4, 4, 16]: batches of 4 until 16 samples are consumed, then 8; warmup
    (2 steps) and decay (to step 6) end where the recipe says; evaluations run full batches."""
    run_bigpt(
        MOCK_RECIPE, f"run_dir={tmp_path}", "train.rampup_batch_size=[4, 4, 16]", "eval.interval=3", "eval.iters=1"
    )
    assert scalars(tmp_path, "train/global_batch_size") == [4, 4, 4, 4, 8, 8]
    lrs = scalars(tmp_path, "train/lr")
    assert max(lrs) == lrs[1] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(3e-4)
    assert len(scalars(tmp_path, "valid/loss")) == 2
