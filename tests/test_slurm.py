"""launchers/slurm.py: the rendered batch script, its checks, and a two-node job on loopback.

The two-node test runs the rendered script itself with bash, with stand-ins for srun and
scontrol (tests/fake_slurm/) that start one torchrun per "node" on this machine: c10d rendezvous,
the USR1 sent before a time limit, the requeue, and the resumed run after it.
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.slurm import main as slurm_main
from multirank import MOCK_RECIPE, REPO, scalars

RECIPE_70B = REPO / "recipes" / "llama_70b.toml"
FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"


def render(capsys, *argv) -> str:
    assert slurm_main([*map(str, argv)]) == 0
    return capsys.readouterr().out


def srun_command(script: str) -> list[str]:
    """The srun line with its continuations, as words (variables left unexpanded)."""
    line = re.search(r"^srun .*?[^\\]$", script, re.M | re.S).group(0)
    return shlex.split(line.replace("\\\n", " ").rstrip(" &"))


def test_rendered_script_launches_one_torchrun_per_node(capsys, tmp_path):
    script = render(capsys, RECIPE_70B, f"run_dir={tmp_path / 'run'}", "--nodes", 64,
                    "--partition", "gpu", "--time", "48:00:00")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    for directive in ("--nodes=64", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue",
                      "--signal=B:USR1@300", "--partition=gpu", "--time=48:00:00", "--job-name=llama3-70b",
                      f"--output={tmp_path / 'run'}/slurm-%j.out", f"--chdir={Path.cwd()}"):
        assert f"#SBATCH {directive}\n" in script
    assert (tmp_path / "run").is_dir()  # SLURM needs the log's directory to exist at submission
    assert f"RECIPE={RECIPE_70B}\n" in script and "GPUS_PER_NODE=8\n" in script
    assert "SHUTDOWN_TIMEOUT=270\n" in script and f"OVERRIDES=(run_dir={tmp_path / 'run'})\n" in script
    words = srun_command(script)
    torchrun = words.index("torchrun")
    assert words[:torchrun] == ["srun", "--ntasks-per-node=1", "--cpus-per-task=$SLURM_CPUS_ON_NODE",
                                "--kill-on-bad-exit=1"]
    assert words[torchrun:] == [
        "torchrun", "--nnodes=$SLURM_NNODES", "--nproc-per-node=$GPUS_PER_NODE", "--rdzv-backend=c10d",
        "--rdzv-endpoint=$HEAD_NODE:$RDZV_PORT", "--rdzv-id=$SLURM_JOB_ID", "--max-restarts=0",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=$SHUTDOWN_TIMEOUT",
        "$RUN_PY", "$RECIPE", "${OVERRIDES[@]}"]


def test_template_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "launchers" / "bigpt.sbatch")], check=True)


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "3"], "--nodes 3 × --gpus-per-node 8 = 24 GPUs cannot host"),
    (["--nodes", "128", "--gpus-per-node", "4"], "parallel.tensor=8 in"),
    (["--nodes", "64", "parallel.data=8"], "parallel.data=8 but world size 512"),
])
def test_a_layout_the_nodes_cannot_host_is_refused_before_anything_is_written(capsys, tmp_path, argv, message):
    out = tmp_path / "job.sbatch"
    assert slurm_main([str(RECIPE_70B), f"run_dir={tmp_path / 'run'}", "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigpt: error: ") and message in err
    assert not out.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--time", "48h"], "--time '48h' is not a SLURM time limit"),
    (["--time", "1:75:00"], "--time '1:75:00' is not a SLURM time limit"),
    (["--time", "0"], "--time '0' is not a SLURM time limit"),
    (["--time", "4"], "--signal-seconds 300 is not shorter than --time 4 (240 s)"),
    (["--time", "1-00:03", "--signal-seconds", "90000"], "--signal-seconds must be between 60"),
    (["--port", "70000"], "--port must be a TCP port between 1 and 65535, got 70000"),
    (["--port", "0"], "--port must be a TCP port between 1 and 65535, got 0"),
])
def test_slurm_arguments_are_checked(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_:
        slurm_main([str(RECIPE_70B), f"run_dir={tmp_path / 'run'}", "--nodes", "64", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("time_limit, seconds", [("30", 1800), ("30:15", 1815), ("48:00:00", 172800), ("2-0", 172800),
                                                 ("1-12:30", 131400), ("1-00:00:10", 86410), ("UNLIMITED", 0)])
def test_slurm_time_formats(time_limit, seconds):
    from launchers.slurm import time_limit_seconds

    assert time_limit_seconds(time_limit) == seconds


def test_an_output_path_that_cannot_be_written_is_refused(capsys, tmp_path):
    (tmp_path / "file").write_text("mine")
    for out, message in ((tmp_path / "file" / "job.sbatch", "is a file, not a directory"),
                         (tmp_path, "is a directory; name a file to write")):
        assert slurm_main([str(RECIPE_70B), f"run_dir={tmp_path / 'run'}", "--nodes", "64", "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bigpt: error: ") and message in err and "Traceback" not in err
    assert slurm_main([str(RECIPE_70B), f"run_dir={tmp_path / 'file' / 'run'}", "--nodes", "64"]) == 2
    assert "run_dir = " in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"


def test_submit_without_sbatch_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm_main([str(RECIPE_70B), f"run_dir={tmp_path / 'run'}", "--nodes", "64", "--submit"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err and not (tmp_path / "run").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(script: Path, log: Path, restart_count: int, preempt_after: str | None = None):
    """Run the batch script as sbatch would on 2 nodes; send USR1 (the time-limit warning) once
    ``preempt_after`` appears in its log."""
    env = dict(os.environ, PATH=f"{FAKE_SLURM}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]", SLURM_CPUS_ON_NODE="1",
               SLURM_RESTART_COUNT=str(restart_count), FAKE_SLURM_LOG=str(script.parent / "scontrol.log"))
    with open(log, "w") as out:
        job = subprocess.Popen(["bash", str(script)], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while preempt_after and job.poll() is None and time.monotonic() < deadline:
            if preempt_after in log.read_text():
                job.send_signal(signal.SIGUSR1)
                break
            time.sleep(0.1)
        job.wait(timeout=max(1.0, deadline - time.monotonic()))
    return job.returncode, log.read_text()


@pytest.mark.slow
def test_two_nodes_on_loopback_train_requeue_and_resume(capsys, tmp_path):
    """TP2 × PP2 over two 2-"GPU" nodes; the time-limit signal makes every rank save and stop,
    the job requeues itself, and the requeued job resumes from that checkpoint and finishes."""
    run_dir = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    assert slurm_main([str(MOCK_RECIPE), "parallel.tensor=2", "parallel.pipeline=2", f"run_dir={run_dir}",
                       "train.train_iters=7", "checkpoint.save_interval=3", "--nodes", "2", "--gpus-per-node", "2",
                       "--port", str(free_port()), "-o", str(script)]) == 0

    status, first = run_job(script, tmp_path / "attempt0.log", 0, preempt_after="step 4/7")
    assert status == 0, first[-4000:]
    assert "rendezvous at 127.0.0.1" in first and "world_size=4, tp=2, pp=2" in first
    assert "got SIGUSR1" in first and "step 7/7" not in first
    preempted_at = int(re.search(r"bigpt: preempted at step (\d+): checkpoint saved", first).group(1))
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"

    status, second = run_job(script, tmp_path / "attempt1.log", 1)
    assert status == 0, second[-4000:]
    assert "checkpoint.load=auto" in second and "resuming from" in second and "step 7/7" in second
    resumed_at = int(re.search(r"resuming from \S+ \(step (\d+)", second).group(1))
    assert resumed_at == preempted_at >= 4 and f"step {resumed_at + 1}/7" in second
    assert len(scalars(run_dir, "train/loss")) >= 7
