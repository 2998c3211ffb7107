"""tests/zygote.py, which starts the suite's runs, against what it stands in for: a rank forked from
it sees what a rank of torchrun sees, and a failure or a timeout ends the run as torchrun would."""

import json
import subprocess
import sys
import time

import psutil
import pytest

import zygote
from multirank import run_environment

RANK_REPORT = """
import json, os, sys, time
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "main": __name__,
    "env": {k: v for k, v in os.environ.items() if k not in BEFORE},
}), flush=True)
print("rank", os.environ.get("RANK"), "says", file=sys.stderr, flush=True)
if os.environ["BEHAVE"] == "fail" and os.environ.get("RANK") == "1":
    while len(os.listdir()) < int(os.environ["WORLD_SIZE"]):  # this script and the others' pid files
        time.sleep(0.05)
    sys.exit(2)
if os.environ["BEHAVE"] in ("fail", "hang"):  # the others wait, to be stopped
    open(f"pid_{os.getpid()}", "w").close()
    time.sleep(600)
"""


def environment(behave: str) -> dict:
    return dict(run_environment(), BEHAVE=behave)  # run_bigpt's: the same zygote


@pytest.fixture
def script(tmp_path):
    """Reports what a rank sees, with the variables added to ``environment``'s."""
    path = tmp_path / "report.py"
    path.write_text(f"BEFORE = {sorted(environment(''))!r}\n{RANK_REPORT}")
    return path


def reports(stdout: str) -> list[dict]:
    return sorted((json.loads(line) for line in stdout.splitlines()), key=lambda r: r["env"].get("RANK", ""))


def test_a_rank_sees_what_a_rank_of_torchrun_sees(script, tmp_path):
    """Arguments, working directory, sys.path[0], __main__ and the variables torchrun adds (their
    values too, but for those naming the run or its port); rank logs where torchrun writes them."""
    env = environment("report")
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
    env = environment("report")
    result = zygote.run([script, "x"], env=env, cwd=tmp_path)
    assert result.args == [sys.executable, str(script), "x"] and result.returncode == 0
    (report,) = reports(result.stdout)
    assert report == {
        "argv": [str(script), "x"],
        "cwd": str(tmp_path),
        "path0": str(tmp_path),
        "main": "__main__",
        "env": {},
    }


def test_a_failed_rank_stops_the_others_and_fails_the_job_as_torchrun_does(script, tmp_path):
    result = zygote.run(
        [script],
        env=environment("fail"),
        cwd=tmp_path,
        nproc=3,
        torchrun=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "rank      : 1 (local_rank: 1)\n  exitcode  : 2" in result.stderr  # torchrun's report
    assert "Signal 15 (SIGTERM)" in result.stderr  # the two others, stopped
    assert len(list(tmp_path.glob("pid_*"))) == 2


def test_a_run_past_its_timeout_is_killed_with_every_rank(script, tmp_path):
    zygote.run([script], env=environment("report"), cwd=tmp_path)  # started
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as timeout:
        env = environment("hang")
        zygote.run([script], env=env, cwd=tmp_path, nproc=2, torchrun=True, timeout=3)
    assert time.monotonic() - start < 30
    pids = [int(path.name.split("_")[1]) for path in tmp_path.glob("pid_*")]
    assert pids and timeout.value.output.count('"argv"') == len(pids)  # what the ranks had printed
    deadline = time.monotonic() + 30  # SIGKILL is sent; ranks that wait for a CPU die when they get one
    while any(map(alive, pids)):
        assert time.monotonic() < deadline, "a rank outlived its run's timeout"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """Running: not gone, nor dead and waiting to be collected (their parent, the job, is killed too)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
