"""launchers/slurm.py: the rendered batch script, its checks, and jobs submitted with it to a real
SLURM cluster on this machine (the ``slurm`` fixture, tests/slurm_cluster.py: nodes n1 and n2):
a two-node run preempted by ``scancel --signal=USR1``, requeued and resumed to the losses of a
local run, and the time limit's signal lead time doing the same.
"""

import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from launchers.slurm import main as slurm_main
from multirank import MOCK_RECIPE, REPO, run_bigpt, scalars
from slurm_cluster import PARTITION, free_port

RECIPE_70B = REPO / "recipes" / "llama_70b.toml"
JOB_TIMEOUT_S = 300
"""A hang guard for the jobs here, which take well under a minute."""


def render(capsys, *argv) -> str:
    assert slurm_main([*map(str, argv)]) == 0
    return capsys.readouterr().out


def srun_command(script: str) -> list[str]:
    """The srun line with its continuations, as words (variables left unexpanded)."""
    line = re.search(r"^srun .*?[^\\]$", script, re.M | re.S).group(0)
    return shlex.split(line.replace("\\\n", " ").rstrip(" &"))


def test_rendered_script_launches_one_torchrun_per_node(capsys, tmp_path):
    script = render(
        capsys, RECIPE_70B, f"run_dir={tmp_path / 'run'}", "--nodes", 64, "--partition", "gpu", "--time", "48:00:00"
    )
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    for directive in (
        "--nodes=64",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--requeue",
        "--signal=B:USR1@300",
        "--partition=gpu",
        "--time=48:00:00",
        "--job-name=llama3-70b",
        f"--output={tmp_path / 'run'}/slurm-%j.out",
        f"--chdir={Path.cwd()}",
    ):
        assert f"#SBATCH {directive}\n" in script
    assert (tmp_path / "run").is_dir()  # SLURM needs the log's directory to exist at submission
    assert f"RECIPE={RECIPE_70B}\n" in script and "WORKERS_PER_NODE=8\n" in script
    assert "SHUTDOWN_TIMEOUT=270\n" in script and f"OVERRIDES=(run_dir={tmp_path / 'run'})\n" in script
    words = srun_command(script)
    torchrun = words.index("torchrun")
    assert words[:torchrun] == [
        "srun",
        "--ntasks-per-node=1",
        "--cpus-per-task=$SLURM_CPUS_ON_NODE",
        "--kill-on-bad-exit=1",
    ]
    assert words[torchrun:] == [
        "torchrun",
        "--nnodes=$SLURM_NNODES",
        "--nproc-per-node=$WORKERS_PER_NODE",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=$HEAD_NODE:$RDZV_PORT",
        "--rdzv-id=$SLURM_JOB_ID",
        "--max-restarts=0",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout=$SHUTDOWN_TIMEOUT",
        "$RUN_PY",
        "$RECIPE",
        "${OVERRIDES[@]}",
    ]


def test_nodes_without_gpus_get_the_workers_asked_for_and_no_gpu_request(capsys, tmp_path):
    script = render(
        capsys,
        MOCK_RECIPE,
        f"run_dir={tmp_path}",
        "parallel.tensor=2",
        "--nodes",
        2,
        "--workers-per-node",
        2,
        "--partition",
        "cpu",
    )
    assert "WORKERS_PER_NODE=2\n" in script and "#SBATCH --nodes=2\n" in script
    assert not [line for line in script.splitlines() if line.startswith("#SBATCH --gpus")]


def test_template_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "launchers" / "bigpt.sbatch")], check=True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nodes", "3"], "--nodes 3 × --gpus-per-node 8 = 24 GPUs cannot host"),
        (["--nodes", "128", "--gpus-per-node", "4"], "parallel.tensor=8 in"),
        (["--nodes", "64", "parallel.data=8"], "parallel.data=8 but world size 512"),
        (["--nodes", "3", "--workers-per-node", "2"], "--nodes 3 × --workers-per-node 2 = 6 workers cannot host"),
        (["--nodes", "256", "--workers-per-node", "2"], "is more than --workers-per-node 2: tensor parallelism"),
        # A value set on the command line is attributed to the override, not to the recipe file.
        (
            ["--nodes", "256", "--workers-per-node", "4", "parallel.tensor=8"],
            "parallel.tensor=8 in override 'parallel.tensor=8' is more than --workers-per-node 4",
        ),
    ],
)
def test_a_layout_the_nodes_cannot_host_is_refused_before_anything_is_written(capsys, tmp_path, argv, message):
    out = tmp_path / "job.sbatch"
    assert slurm_main([str(RECIPE_70B), f"run_dir={tmp_path / 'run'}", "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigpt: error: ") and message in err
    assert not out.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--time", "48h"], "--time '48h' is not a SLURM time limit"),
        (["--time", "1:75:00"], "--time '1:75:00' is not a SLURM time limit"),
        (["--time", "0"], "--time '0' is not a SLURM time limit"),
        (["--time", "4"], "--signal-seconds 300 is not shorter than --time 4 (240 s)"),
        (["--time", "1-00:03", "--signal-seconds", "90000"], "--signal-seconds must be between 60"),
        (["--port", "70000"], "--port must be a TCP port between 1 and 65535, got 70000"),
        (["--port", "0"], "--port must be a TCP port between 1 and 65535, got 0"),
    ],
)
def test_slurm_arguments_are_checked(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_:
        slurm_main([str(RECIPE_70B), f"run_dir={tmp_path / 'run'}", "--nodes", "64", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "time_limit, seconds",
    [
        ("30", 1800),
        ("30:15", 1815),
        ("48:00:00", 172800),
        ("2-0", 172800),
        ("1-12:30", 131400),
        ("1-00:00:10", 86410),
        ("UNLIMITED", 0),
    ],
)
def test_slurm_time_formats(time_limit, seconds):
    from launchers.slurm import time_limit_seconds

    assert time_limit_seconds(time_limit) == seconds


def test_an_output_path_that_cannot_be_written_is_refused(capsys, tmp_path):
    (tmp_path / "file").write_text("mine")
    for out, message in (
        (tmp_path / "file" / "job.sbatch", "is a file, not a directory"),
        (tmp_path, "is a directory; name a file to write"),
    ):
        assert slurm_main([str(RECIPE_70B), f"run_dir={tmp_path / 'run'}", "--nodes", "64", "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bigpt: error: ") and message in err and "Traceback" not in err
    assert slurm_main([str(RECIPE_70B), f"run_dir={tmp_path / 'file' / 'run'}", "--nodes", "64"]) == 2
    assert "run_dir = " in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"


def test_submit_without_sbatch_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm_main([str(RECIPE_70B), f"run_dir={tmp_path / 'run'}", "--nodes", "64", "--submit"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err and not (tmp_path / "run").exists()


def submit(capsys, *argv) -> str:
    """``launchers/slurm.py ... --submit`` to the test cluster; the job's id."""
    assert slurm_main([*map(str, argv), "--partition", PARTITION, "--port", str(free_port()), "--submit"]) == 0
    return re.fullmatch(r"Submitted batch job (\d+)\n", capsys.readouterr().out).group(1)


def wait_for_log(slurm, job: str, log: Path, pattern: str) -> re.Match:
    """The first match of ``pattern`` in the job's log, once it is there."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        text = log.read_text() if log.exists() else ""
        match = re.search(pattern, text)
        if match:
            return match
        if time.monotonic() > deadline or not slurm.command("squeue", "--noheader", f"--jobs={job}").strip():
            raise AssertionError(f"no {pattern!r} in {log}:\n{text[-4000:]}\n{slurm.logs()}")
        time.sleep(0.2)


def attempts(log: Path) -> list[str]:
    """The job's log split at each attempt's first line (the log is appended to across requeues)."""
    return re.split(r"(?m)^(?=bigpt: job \d+ attempt )", log.read_text())[1:]


@pytest.mark.slow
def test_two_node_job_preempted_by_scancel_is_requeued_and_resumes_to_the_losses_of_a_local_run(
    slurm, capsys, tmp_path
):
    """PP2 over n1 and n2 (a worker each): USR1 from scancel makes both ranks save, the job
    requeues itself, resumes from that checkpoint and finishes with the losses of an uninterrupted
    local torchrun of the same layout."""
    recipe = [MOCK_RECIPE, "parallel.pipeline=2", "train.train_iters=20"]
    run_bigpt(*recipe, f"run_dir={tmp_path / 'local'}", nproc=2, real_launcher=True)
    run_dir = tmp_path / "slurm"
    job = submit(capsys, *recipe, f"run_dir={run_dir}", "--nodes", 2, "--workers-per-node", 1)
    log = run_dir / f"slurm-{job}.out"
    wait_for_log(slurm, job, log, r"step 2/20")
    slurm.command("scancel", "--batch", "--signal=USR1", job)
    slurm.wait_until_no_jobs(JOB_TIMEOUT_S)

    state = slurm.job(job)
    first, second = attempts(log)
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), log.read_text()[-4000:]
    assert "attempt 0: 2 nodes × 1 worker(s), rendezvous at n1:" in first and "world_size=2, tp=1, pp=2" in first
    assert "got SIGUSR1" in first and "requeueing job" in first
    preempted_at = int(re.search(r"bigpt: preempted at step (\d+): checkpoint saved", first).group(1))
    assert "checkpoint.load=auto" in second and "resuming from" in second and "step 20/20" in second
    assert int(re.search(r"resuming from \S+ \(step (\d+)", second).group(1)) == preempted_at < 20
    assert scalars(run_dir, "train/loss") == scalars(tmp_path / "local", "train/loss")


@pytest.mark.slow
def test_time_limit_signal_lead_time_makes_the_job_save_requeue_and_resume_and_scancel_stops_it(
    slurm, capsys, tmp_path
):
    """Once the job is within --signal-seconds of its time limit, SLURM sends USR1 (at its next
    time-limit check, every 30 s): bigpt saves, the job requeues itself and resumes from there.
    The test brings the limit near by shortening it once training runs (as an administrator can).
    Then ``scancel`` (TERM): bigpt saves again, and the job stays cancelled."""
    run_dir = tmp_path / "run"
    job = submit(
        capsys,
        MOCK_RECIPE,
        "train.train_iters=100000",
        f"run_dir={run_dir}",
        "--nodes",
        1,
        "--workers-per-node",
        1,
        "--time",
        10,
        "--signal-seconds",
        100,
    )
    log = run_dir / f"slurm-{job}.out"
    wait_for_log(slurm, job, log, r"step 1/")
    # A limit 60-120 s away: inside the lead time (100 s + the 30 s between checks), and far
    # enough that the check that signals cannot also be the one that ends the job.
    hours, minutes, _ = map(int, slurm.job(job)["RunTime"].split(":"))
    slurm.command("scontrol", "update", f"JobId={job}", f"TimeLimit={hours * 60 + minutes + 2}")
    wait_for_log(slurm, job, log, r"requeueing job")
    slurm.command("scontrol", "update", f"JobId={job}", "TimeLimit=10")  # the limit holds for each attempt
    wait_for_log(slurm, job, log, r"resuming from .*\n(?:.*\n)*?step \d+/")
    slurm.command("scancel", job)
    slurm.wait_until_no_jobs(JOB_TIMEOUT_S)

    first, second = attempts(log)
    assert "got SIGUSR1" in first and "requeueing job" in first
    preempted_at = re.search(r"bigpt: preempted at step (\d+): checkpoint saved", first).group(1)
    assert f"(step {preempted_at}, " in re.search(r"resuming from .*", second).group(0)
    assert "got SIGTERM" in second and "bigpt: preempted at step" in second and "requeueing" not in second
    assert slurm.job(job)["JobState"] == "CANCELLED"
