"""Checkpoints that survive faults, run as users run bigpt (torchrun over gloo on CPU): a SIGKILL
at a random moment, preemption signals, a full disk, a NaN loss, and a layout change on resume.

Every run saves after each step. The uninterrupted runs are the reference: a resumed run must
log exactly their losses (bit-identical) at every later step, or within a tight tolerance when
it resumes at another layout."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from megatron.core import dist_checkpointing

from bigpt.checkpoint import store
from multirank import FAULT_INJECTION, MOCK_RECIPE, RUN, rank_output, run_bigpt, scalars

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = [
    f"train.train_iters={STEPS}",
    f"schedule.decay_iters={STEPS}",
    "checkpoint.save_interval=1",
    "checkpoint.keep_last=0",
    "checkpoint.load=auto",
]
LAYOUTS = {
    "tp2": ["parallel.tensor=2"],
    "pp2_vpp2": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
    "dp2": [],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per layout, run on first use: layout name → run_dir."""
    runs = {}

    def get(layout):
        if layout not in runs:
            run_dir = tmp_path_factory.mktemp(f"reference_{layout}")
            run_bigpt(MOCK_RECIPE, f"run_dir={run_dir}", *COMMON, *LAYOUTS[layout], nproc=2)
            runs[layout] = run_dir
        return runs[layout]

    return get


def start(run_dir, *overrides, checkpoint_dir, fault: str = ""):
    """Launch a 2-rank job whose stdout is read live (``fault``: as ``run_bigpt``'s)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", BIGPT_TEST_FAULT=fault)
    script = FAULT_INJECTION if fault else RUN
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(MOCK_RECIPE),
        f"run_dir={run_dir}",
        f"checkpoint.dir={checkpoint_dir}",
        *COMMON,
        *overrides,
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ranks_of(job) -> list[psutil.Process]:
    """torchrun's workers (torchrun starts each in a session of its own)."""
    return psutil.Process(job.pid).children()


def wait_for_step(job, step: int) -> None:
    for line in job.stdout:
        if line.startswith(f"step {step}/"):
            return
    raise AssertionError(f"the run ended before step {step}:\n{job.stderr.read()[-4000:]}")


def resumed_step(stdout: str) -> int:
    line = next(line for line in stdout.splitlines() if line.startswith("resuming from"))
    return int(line.split("(step ")[1].split(",")[0])


def saved_guard(checkpoint) -> dict:
    """The bad-step guard's state in a checkpoint."""
    return dist_checkpointing.load_common_state_dict(str(checkpoint))["train_state"]["guard"]


def losses(run_dir) -> list[float]:
    """The logged losses, step by step (none when a resumed run had nothing left to do)."""
    try:
        return scalars(run_dir, "train/loss")
    except KeyError:
        return []


# DP=2: the preemption and truncated-shard tests. At TP=2 the saves are asynchronous: the kill
# often lands while a save is being written behind the training steps.
@pytest.mark.parametrize("layout,async_save", [("tp2", "true"), ("pp2_vpp2", "false")])
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(layout, async_save, reference, tmp_path):
    rng = random.Random(layout)
    kill_after = rng.randint(2, STEPS - 2)
    job = start(
        tmp_path / "killed",
        *LAYOUTS[layout],
        f"checkpoint.async_save={async_save}",
        checkpoint_dir=tmp_path / "checkpoints",
    )
    wait_for_step(job, kill_after)
    time.sleep(rng.uniform(0, 0.3))  # often inside the save of that step
    doomed = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for process in doomed:  # all at once, as when a node dies
        process.kill()
    psutil.wait_procs(doomed, timeout=30)

    resumed = run_bigpt(
        MOCK_RECIPE,
        f"run_dir={tmp_path / 'resumed'}",
        f"checkpoint.dir={tmp_path / 'checkpoints'}",
        *COMMON,
        *LAYOUTS[layout],
        nproc=2,
    )
    start_step = resumed_step(resumed.stdout)
    assert kill_after - 1 <= start_step <= STEPS
    assert losses(tmp_path / "resumed") == losses(reference(layout))[start_step:]


def test_preemption_saves_and_exits_for_requeue_even_when_signalled_twice(reference, tmp_path):
    """SIGUSR1 to every rank's process group (what SLURM's --signal and torchrun's forwarding
    reach, megatron-core's checkpoint writer processes included), then SIGTERM during the
    (asynchronous) save."""
    job = start(tmp_path / "preempted", "checkpoint.async_save=true", checkpoint_dir=tmp_path / "checkpoints")
    wait_for_step(job, 2)
    ranks = ranks_of(job)
    assert len(ranks) == 2
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        for rank in ranks:
            os.killpg(rank.pid, signum)
        time.sleep(0.05)
    stdout, stderr = job.communicate(timeout=120)
    assert "bigpt: preempted at step" in stderr and "(exit 75)" in stderr
    assert "exitcode  : 75" in stderr  # what torchrun reports for the ranks
    saved = (tmp_path / "checkpoints" / "latest").read_text().strip()
    preempted_at = int(stderr.split("preempted at step ")[1].split(":")[0])
    assert saved == f"iter_{preempted_at:07d}" and preempted_at < STEPS

    resumed = run_bigpt(
        MOCK_RECIPE, f"run_dir={tmp_path / 'resumed'}", f"checkpoint.dir={tmp_path / 'checkpoints'}", *COMMON, nproc=2
    )
    assert resumed_step(resumed.stdout) == preempted_at
    assert losses(tmp_path / "resumed") == losses(reference("dp2"))[preempted_at:]
    # The bad-step guard's history went through the checkpoint: the resumed run judges (spikes) as the
    # uninterrupted one, whose history holds every step's loss.
    final = f"iter_{STEPS:07d}"
    assert saved_guard(tmp_path / "checkpoints" / final) == saved_guard(reference("dp2") / "checkpoints" / final)
    assert saved_guard(tmp_path / "checkpoints" / final)["recent"] == pytest.approx(losses(reference("dp2")), rel=1e-6)


@pytest.mark.parametrize("layout", ["tp2", "pp2_vpp2"])
def test_resume_at_another_layout_continues_the_loss(layout, reference, tmp_path):
    """A DP=2 checkpoint (distributed optimizer sharded over DP) resumed at TP=2 or PP=2 × VPP=2."""
    checkpoint = reference("dp2") / "checkpoints" / "iter_0000003"
    run_bigpt(MOCK_RECIPE, f"run_dir={tmp_path}", *COMMON, f"checkpoint.load={checkpoint}", *LAYOUTS[layout], nproc=2)
    assert losses(tmp_path) == pytest.approx(losses(reference("dp2"))[3:], rel=1e-5)


def single_process(run_dir, *overrides):
    """`python launchers/run.py` (a world of one, as an interactive user starts it), stdout read live."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [
        sys.executable,
        str(RUN),
        str(MOCK_RECIPE),
        f"run_dir={run_dir}",
        "train.train_iters=1000",
        "checkpoint.save_interval=0",
        *overrides,
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_saves_and_exits_for_a_resume_and_a_second_one_exits_at_once(tmp_path):
    job = single_process(tmp_path / "once")
    wait_for_step(job, 2)
    job.send_signal(signal.SIGINT)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 75 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    stopped_at = int(stderr.split("preempted at step ")[1].split(":")[0])
    assert (tmp_path / "once" / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped_at:07d}"

    job = single_process(tmp_path / "twice")
    wait_for_step(job, 2)
    job.send_signal(signal.SIGINT)
    for line in job.stderr:  # the first Ctrl-C has been seen
        if "interrupted: finishing this step, saving a checkpoint" in line:
            break
    job.send_signal(signal.SIGINT)
    stdout, stderr = job.communicate(timeout=120)  # returns: no helper process lives on holding the pipes
    assert job.returncode == -signal.SIGINT and "Traceback" not in stderr  # a shell says 130


def test_ranks_whose_launcher_was_killed_save_and_stop(tmp_path):
    """kill -9 of torchrun: it can tell its ranks nothing, so they notice they were re-parented."""
    job = start(tmp_path / "orphaned", "train.train_iters=1000", checkpoint_dir=tmp_path / "checkpoints")
    wait_for_step(job, 2)
    ranks = ranks_of(job)
    psutil.Process(job.pid).kill()
    job.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, "the ranks outlived their launcher"
    saved = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert store.is_complete(tmp_path / "checkpoints" / saved) and int(saved[5:]) >= 2


def test_a_truncated_shard_falls_back_to_the_previous_checkpoint(reference, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(reference("dp2") / "checkpoints", checkpoints)
    shard = max((checkpoints / "iter_0000006").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    resumed = run_bigpt(MOCK_RECIPE, f"run_dir={tmp_path}", f"checkpoint.dir={checkpoints}", *COMMON, nproc=2)
    assert f"names iter_0000006, which cannot be loaded: {shard.name} has" in resumed.stderr
    assert resumed_step(resumed.stdout) == 5
    assert losses(tmp_path) == losses(reference("dp2"))[5:]


def test_dp_reshardable_checkpoints_resume_exactly_and_refuse_another_tensor_parallel_size(reference, tmp_path):
    """checkpoint.optimizer_format = "dp_reshardable" (no exchange at save): bit-identical resume at
    the layout it was saved with, resumes at another DP size; at TP=2 a clear refusal before
    anything is loaded."""
    dp_only = [*COMMON, "checkpoint.optimizer_format=dp_reshardable"]
    run_bigpt(MOCK_RECIPE, f"run_dir={tmp_path / 'saved'}", *dp_only, "train.train_iters=3", nproc=2)
    checkpoint = tmp_path / "saved" / "checkpoints" / "iter_0000003"
    run_bigpt(MOCK_RECIPE, f"run_dir={tmp_path / 'resumed'}", *dp_only, f"checkpoint.load={checkpoint}", nproc=2)
    assert losses(tmp_path / "resumed") == losses(reference("dp2"))[3:]
    run_bigpt(MOCK_RECIPE, f"run_dir={tmp_path / 'dp1'}", *dp_only, f"checkpoint.load={checkpoint}", nproc=1)
    assert losses(tmp_path / "dp1") == pytest.approx(losses(reference("dp2"))[3:], rel=1e-5)
    refused = run_bigpt(
        MOCK_RECIPE,
        f"run_dir={tmp_path / 'tp2'}",
        *dp_only,
        f"checkpoint.load={checkpoint}",
        "parallel.tensor=2",
        nproc=2,
        check=False,
    )
    assert refused.returncode != 0 and "exitcode  : 2" in refused.stderr  # each rank: a user error
    assert (
        'saved with checkpoint.optimizer_format = "dp_reshardable"' in refused.stderr and "tp 1 -> 2" in refused.stderr
    )
    out = tmp_path / "saved" / "checkpoints_tp2_pp1_vpp1"
    assert (
        f"python tools/reshard.py {checkpoint} {out} parallel.tensor=2 parallel.pipeline=1 "
        f'parallel.virtual_pipeline=1 parallel.context=1, then resume with checkpoint.load = "{out}"'
    ) in refused.stderr


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(async_save, tmp_path):
    result = run_bigpt(
        MOCK_RECIPE,
        f"run_dir={tmp_path}",
        *COMMON,
        f"checkpoint.async_save={async_save}",
        nproc=2,
        fault="disk_full@3",
        check=False,
    )
    assert result.returncode != 0
    assert "saving checkpoint" in result.stderr and "No space left on device" in result.stderr
    assert "the previous checkpoint" in result.stderr and "iter_0000002) is intact" in result.stderr
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["bigpt.lock", "iter_0000001", "iter_0000002", "latest"]
    resumed = run_bigpt(MOCK_RECIPE, f"run_dir={tmp_path}", *COMMON, nproc=2)
    assert resumed_step(resumed.stdout) == 2


def test_a_nan_loss_is_skipped_on_every_rank(tmp_path):
    """Also what each rank prints (README, "One rank speaks"): the last one, which holds the loss
    (the last pipeline stage), its step lines on stdout and notes on stderr; rank 0 nothing."""
    run_bigpt(
        MOCK_RECIPE,
        f"run_dir={tmp_path}",
        *COMMON,
        "parallel.pipeline=2",
        nproc=2,
        fault="nan_loss@3",
        rank_logs=tmp_path / "logs",
    )
    assert rank_output(tmp_path / "logs", 0) == ("", "")
    stdout, stderr = rank_output(tmp_path / "logs", 1)
    assert [line.split(" | ")[0] for line in stdout.splitlines()] == [
        "step 1/6",
        "step 2/6",
        'step 3: skipped, the loss is nan (train.on_bad_step = "skip")',
        *(f"step {n}/6" for n in range(3, 7)),
    ]
    assert stderr and all(line.startswith("bigpt: ") for line in stderr.splitlines())
    assert scalars(tmp_path, "train/skipped") == [0, 0, 1, 0, 0, 0]
    later = scalars(tmp_path, "train/loss")[3:]
    assert all(loss == loss for loss in later)  # not NaN: the weights were never touched


def test_a_nan_loss_stops_the_run_with_the_last_checkpoint_intact(tmp_path):
    """Asynchronous saves: the save of step 2, in flight when step 3 stops the run, is finished."""
    result = run_bigpt(
        MOCK_RECIPE,
        f"run_dir={tmp_path}",
        *COMMON,
        "train.on_bad_step=stop",
        "checkpoint.async_save=true",
        nproc=2,
        fault="nan_loss@3",
        check=False,
    )
    assert result.returncode != 0
    assert 'step 3: the loss is nan; stopping (train.on_bad_step = "stop") without saving' in result.stderr
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    assert not (tmp_path / "checkpoints" / "iter_0000003").exists()
    assert len(losses(tmp_path)) == 2


# ------------------------------------------------------------------------ fp16 loss scaling
FP16 = [
    "precision.dtype=fp16",
    "precision.hysteresis=1",
    "parallel.tensor=2",
    "checkpoint.save_interval=100",
]  # a save at the end of each run only


def test_fp16_training_tracks_fp32(reference, tmp_path):
    run_bigpt(MOCK_RECIPE, f"run_dir={tmp_path}", *COMMON, *FP16, "precision.initial_loss_scale=256", nproc=2)
    assert scalars(tmp_path, "train/skipped") == [0] * STEPS
    assert losses(tmp_path) == pytest.approx(losses(reference("tp2")), rel=1e-4)  # measured: 4e-6


def test_fp16_overflow_skips_steps_halves_the_scale_and_resumes_with_it(tmp_path):
    """At 2**16 this model's fp16 gradients overflow until the scale is down to 2**13: steps 1-3
    are skipped. The checkpoint of step 2 holds an optimizer that never stepped; the run resumed
    from it goes on with the scale it had, not the initial one."""
    overflowing = [*COMMON, *FP16, "precision.initial_loss_scale=65536"]
    run_bigpt(MOCK_RECIPE, f"run_dir={tmp_path}", *overflowing, "train.train_iters=2", nproc=2)
    resumed = run_bigpt(MOCK_RECIPE, f"run_dir={tmp_path}", *overflowing, nproc=2)
    assert resumed_step(resumed.stdout) == 2
    assert scalars(tmp_path, "train/skipped") == [1, 1, 1, 0, 0, 0]
    assert scalars(tmp_path, "train/loss_scale") == [2**15, 2**14, 2**13, 2**13, 2**13, 2**13]
    assert scalars(tmp_path, "train/lr")[:3] == [0, 0, 0]  # no update, no scheduler step


def test_the_planner_predicts_what_a_save_writes(reference):
    """tools/plan.py's checkpoint size against a real DP=2 save: the whole, and the busiest rank's
    file (each data-parallel rank writes its optimizer shard and about half the weights)."""
    from bigpt.layout import Layout
    from bigpt.plan import checkpoint_bytes
    from bigpt.recipe import load_recipe

    recipe = load_recipe(MOCK_RECIPE, COMMON)
    total, busiest = checkpoint_bytes(recipe, Layout.from_recipe(recipe, 2))
    shards = [path.stat().st_size for path in (reference("dp2") / "checkpoints" / "iter_0000006").glob("*.distcp")]
    assert sum(shards) == pytest.approx(total, rel=0.1)  # measured: +6.5 % (per-tensor headers, small state)
    assert max(shards) == pytest.approx(busiest, rel=0.1)


def test_a_run_leaves_the_signal_handlers_as_it_found_them():
    """A run records the stop signals (to save before stopping) and gives the handlers back when
    it ends: a process that goes on (tools/ladder.py's in-process runs, a test worker) must still
    stop its pools' workers with SIGTERM, which a recording handler would swallow."""
    from bigpt.runtime import preemption

    before = {signum: signal.getsignal(signum) for signum in preemption.SIGNALS}
    with preemption.stopping_with_a_checkpoint():
        assert all(signal.getsignal(signum) is not before[signum] for signum in preemption.SIGNALS)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested()
    assert {signum: signal.getsignal(signum) for signum in preemption.SIGNALS} == before
