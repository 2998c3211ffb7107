"""tests/zygote.py, which starts the suite's runs, against what it stands in for: a rank forked from
it sees what a rank of torchrun sees, and a failure or a timeout ends the run as torchrun would."""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

import zygote

RANK_REPORT = """
import json, os, sys, time
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "main": __name__,
    "env": {k: v for k, v in os.environ.items() if k not in BEFORE},
}), flush=True)
print("rank", os.environ.get("RANK"), "says", file=sys.stderr, flush=True)
if os.environ["BEHAVE"] == "fail" and os.environ.get("RANK") == "1":
    sys.exit(2)
if os.environ["BEHAVE"] in ("fail", "hang"):  # the others wait, to be stopped
    open(f"pid_{os.getpid()}", "w").close()
    time.sleep(600)
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "report.py"
    path.write_text(f"BEFORE = {sorted(os.environ)!r}\n{RANK_REPORT}")
    return path


def reports(stdout: str) -> list[dict]:
    return sorted((json.loads(line) for line in stdout.splitlines()), key=lambda r: r["env"].get("RANK", ""))


def test_a_rank_sees_what_a_rank_of_torchrun_sees(script, tmp_path):
    """Arguments, working directory, sys.path[0], __main__ and the variables torchrun adds (their
    values too, but for those naming the run or its port); rank logs where torchrun writes them."""
    env = dict(os.environ, BEHAVE="report", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    real = subprocess.run([*torchrun, str(script), "x", "--y"], env=env, cwd=tmp_path, capture_output=True, text=True)
    forked = zygote.run([script, "x", "--y"], env=env, cwd=tmp_path, nproc=2, torchrun=True)
    assert (real.returncode, forked.returncode) == (0, 0), real.stderr + forked.stderr
    assert forked.args == real.args
    # where the rendezvous is; the agent's store (the zygote has none: rank 0 hosts it)
    per_run = {"MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE"}
    per_run.add("TORCHELASTIC_ERROR_FILE")
    for ours, theirs in zip(reports(forked.stdout), reports(real.stdout), strict=True):
        assert sorted(ours["env"]) == sorted(theirs["env"])
        for report in (ours, theirs):
            assert report["env"]["TORCHELASTIC_ERROR_FILE"].endswith(f"/attempt_0/{report['env']['RANK']}/error.json")
            report["env"] = {k: v for k, v in report["env"].items() if k not in per_run}
        assert ours == theirs
    assert sorted(forked.stderr.splitlines()) == sorted(real.stderr.splitlines()) == ["rank 0 says", "rank 1 says"]

    logs = tmp_path / "logs"
    forked = zygote.run([script], env=env, cwd=tmp_path, nproc=2, torchrun=True, rank_logs=logs)
    assert (forked.stdout, forked.stderr) == ("", "")
    for rank in (0, 1):
        (folder,) = logs.glob(f"*/attempt_0/{rank}")
        assert json.loads((folder / "stdout.log").read_text())["env"]["RANK"] == str(rank)
        assert (folder / "stderr.log").read_text() == f"rank {rank} says\n"


def test_one_plain_process_is_python_script(script, tmp_path):
    env = dict(os.environ, BEHAVE="report")
    result = zygote.run([script, "x"], env=env, cwd=tmp_path)
    assert result.args == [sys.executable, str(script), "x"] and result.returncode == 0
    (report,) = reports(result.stdout)
    assert report == {
        "argv": [str(script), "x"],
        "cwd": str(tmp_path),
        "path0": str(tmp_path),
        "main": "__main__",
        "env": {"BEHAVE": "report"},
    }


def test_a_failed_rank_stops_the_others_and_fails_the_job_as_torchrun_does(script, tmp_path):
    result = zygote.run([script], env=dict(os.environ, BEHAVE="fail"), cwd=tmp_path, nproc=3, torchrun=True, timeout=60)
    assert result.returncode == 1
    assert "rank      : 1 (local_rank: 1)\n  exitcode  : 2" in result.stderr  # torchrun's report
    assert "Signal 15 (SIGTERM)" in result.stderr  # the two others, stopped
    assert len(list(tmp_path.glob("pid_*"))) == 2


def test_a_run_past_its_timeout_is_killed_with_every_rank(script, tmp_path):
    zygote.run([script], env=dict(os.environ, BEHAVE="report"), cwd=tmp_path)  # the zygote's start is not timed
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as timeout:
        zygote.run([script], env=dict(os.environ, BEHAVE="hang"), cwd=tmp_path, nproc=2, torchrun=True, timeout=10)
    assert time.monotonic() - start < 60
    assert timeout.value.output.count('"argv"') == 2  # what it had printed
    pids = [int(path.name.split("_")[1]) for path in tmp_path.glob("pid_*")]
    assert len(pids) == 2
    for pid in pids:  # gone, or dead and not yet collected by init (their parent, the job, was killed too)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
