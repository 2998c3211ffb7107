"""tools/reshard.py: a TP=2 × PP=2 checkpoint saved "dp_reshardable" (which no run can load at
another TP/PP/VPP) resharded offline on CPU processes, then resumed at other layouts; the loss
continues that of the uninterrupted run. And what it refuses, before any work."""

import subprocess
import sys

import pytest

from bigpt.checkpoint import store
from bigpt.errors import EXIT_USER_ERROR
from multirank import MOCK_RECIPE, REPO, run_bigpt, scalars
from tools.reshard import main as reshard_main

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = [
    f"train.train_iters={STEPS}",
    f"schedule.decay_iters={STEPS}",
    "checkpoint.save_interval=3",
    "checkpoint.keep_last=0",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The uninterrupted TP=2 × PP=2 run, saving "dp_reshardable" at step 3 (and 6): its run_dir."""
    run_dir = tmp_path_factory.mktemp("tp2_pp2")
    run_bigpt(
        MOCK_RECIPE,
        f"run_dir={run_dir}",
        *COMMON,
        "parallel.tensor=2",
        "parallel.pipeline=2",
        "checkpoint.optimizer_format=dp_reshardable",
        nproc=4,
    )
    return run_dir


def reshard(*args):
    command = [sys.executable, str(REPO / "tools" / "reshard.py"), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-6000:]
    return result


def test_a_resharded_checkpoint_resumes_at_another_layout_and_continues_the_loss(saved, tmp_path):
    """IN → TP=1 × PP=2 × VPP=2 written "dp_reshardable" (through a copy at TP=2 × PP=2: IN's
    format cannot reshard in place), which loads only at that very TP/PP/VPP; resumed there at
    DP=2 (so 2 micro-batches a step, not 4). One layout changes TP, VPP, DP and the micro-batch
    count at once: one resume instead of one per change."""
    out = tmp_path / "tp1_pp2_vpp2"
    written = reshard(
        saved / "checkpoints" / "iter_0000003",
        out,
        "parallel.tensor=1",
        "parallel.virtual_pipeline=2",
        "checkpoint.optimizer_format=dp_reshardable",
    )
    assert f"wrote {out / 'iter_0000003'} (step 3, 24 samples consumed" in written.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # the intermediate copy is gone
    marker = store.read_marker(out / "iter_0000003")
    assert marker["layout"] == {"tp": 1, "pp": 2, "vpp": 2, "cp": 1, "dp": 1}
    assert marker["optimizer_format"] == "dp_reshardable"
    run_bigpt(
        MOCK_RECIPE,
        f"run_dir={tmp_path / 'resumed'}",
        *COMMON,
        f"checkpoint.load={out}",
        "parallel.pipeline=2",
        "parallel.virtual_pipeline=2",
        nproc=4,
    )
    assert scalars(tmp_path / "resumed", "train/loss") == pytest.approx(scalars(saved, "train/loss")[3:], rel=1e-5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.tensor=3"], "model.num_attention_heads=4 is not divisible by parallel.tensor=3"),
        (["parallel.data=3"], "train.global_batch_size 8 is not divisible by train.micro_batch_size × data parallel"),
        (["parallel.virtual_pipeline=3"], "does not split evenly into parallel.pipeline × parallel.virtual_pipeline"),
        (
            ["model.hidden_size=128"],
            "tools/reshard.py changes only the layout (parallel.*) and checkpoint.optimizer_format",
        ),
    ],
)
def test_a_layout_that_cannot_be_or_another_change_is_refused_before_any_work(
    saved, tmp_path, capsys, overrides, message
):
    assert reshard_main([str(saved / "checkpoints"), str(tmp_path / "out"), *overrides]) == EXIT_USER_ERROR
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_out_that_exists_or_cannot_be_written_or_an_in_that_is_no_checkpoint_is_refused(saved, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert reshard_main([str(saved / "checkpoints"), str(tmp_path / "out"), "parallel.tensor=1"]) == EXIT_USER_ERROR
    assert f"OUT = {tmp_path / 'out'} exists" in capsys.readouterr().err
    assert reshard_main([str(tmp_path / "out"), str(tmp_path / "new"), "parallel.tensor=1"]) == EXIT_USER_ERROR
    assert f'IN = "{tmp_path / "out"}" cannot be loaded: it holds no intact checkpoint' in capsys.readouterr().err
    (tmp_path / "file").write_text("mine")
    under_a_file = tmp_path / "file" / "out"
    assert reshard_main([str(saved / "checkpoints"), str(under_a_file), "parallel.tensor=1"]) == EXIT_USER_ERROR
    assert f"OUT = {under_a_file} cannot be created: {tmp_path / 'file'} is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]
