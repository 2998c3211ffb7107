"""Run bigpt as users do (torchrun + launchers/run.py) over gloo on CPU, and read its results."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import zygote

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "launchers" / "run.py"
MOCK_RECIPE = Path(__file__).resolve().parent / "recipes" / "mock_tiny.toml"
FAULT_INJECTION = Path(__file__).resolve().parent / "fault_injection.py"


def run_bigpt(
    recipe,
    *overrides: str,
    nproc: int = 1,
    timeout: int = 300,
    check: bool = True,
    script=RUN,
    fault: str = "",
    rank_logs=None,
    real_launcher: bool = False,
):
    """``torchrun --nproc_per_node nproc launchers/run.py recipe overrides`` (or another torchrun
    ``script``) with one thread per rank (without it, 8 CPU ranks oversubscribe a small machine
    and crawl); one process runs as ``python launchers/run.py ...``, a world of one as a user
    starts it (torchrun's own start and exit cost seconds more, and the multi-rank runs test it).
    ``fault`` runs it through tests/fault_injection.py instead (e.g. "nan_loss@3").
    ``rank_logs``: each rank's stdout and stderr go to files there (``rank_output``), not to the
    result's. Unsafe unpickling is always refused (TORCH_FORCE_WEIGHTS_ONLY_LOAD), so no load can
    depend on it.
    The processes are forked from tests/zygote.py, which has imported torch, megatron-core and
    bigpt once, and behave as those of torchrun or python would; ``real_launcher`` starts the real
    ones instead, for a test of what only they do (a whole process's output, torchrun itself), as
    does a machine with a GPU (CUDA cannot be used in a process forked after its use)."""
    env = run_environment()
    if fault:
        env["BIGPT_TEST_FAULT"] = fault
        script = FAULT_INJECTION
    torchrun = nproc > 1 or bool(rank_logs)
    if real_launcher or torch.cuda.is_available():  # a zygote must not have touched CUDA: the real ones on GPUs
        launcher = [sys.executable]
        if torchrun:
            per_rank = ["--log-dir", str(rank_logs), "--redirects", "3"] if rank_logs else []
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *per_rank]
        command = [*launcher, str(script), str(recipe), *overrides]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    else:
        argv = [script, recipe, *overrides]
        result = zygote.run(
            argv, env=env, cwd=REPO, nproc=nproc, torchrun=torchrun, rank_logs=rank_logs, timeout=timeout
        )
    if check and result.returncode != 0:
        raise AssertionError(f"bigpt failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def run_environment() -> dict[str, str]:
    """The test's environment as every run gets it (one zygote serves every run of the same)."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_FORCE_WEIGHTS_ONLY_LOAD="1")


def rank_output(rank_logs, rank: int) -> tuple[str, str]:
    """(stdout, stderr) of one rank of a ``run_bigpt(..., rank_logs=...)`` job (torchrun's files)."""
    folder = next(Path(rank_logs).glob(f"*/attempt_0/{rank}"))
    return (folder / "stdout.log").read_text(), (folder / "stderr.log").read_text()


def scalars(run_dir, tag: str) -> list[float]:
    """Values of one TensorBoard scalar, in step order, read back with tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.value for event in sorted(accumulator.Scalars(tag), key=lambda e: e.step)]
