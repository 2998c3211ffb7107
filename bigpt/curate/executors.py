"""Run the planned jobs with datatrove's executors: local processes, chained SLURM arrays, or
actors on a Ray cluster.

Each job has its own logging folder ``work/logs/JOB``; datatrove writes a completion marker
per finished task there and skips marked tasks when the same job runs again, which is how an
interrupted curation resumes without redoing finished shards.
"""

import _thread
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import multiprocess.util
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.utils.word_tokenizers import load_word_tokenizer

from bigpt.curate.inputs import InputCutShort
from bigpt.curate.recipe import CurationRecipe, RayConfig
from bigpt.curate.stages import Job
from bigpt.errors import BigptError
from bigpt.paths import names_a_full_disk
from bigpt.runtime import console


def run_local(recipe: CurationRecipe, jobs: list[Job], work: Path) -> None:
    _load_word_tokenizers(recipe)
    _guard_forks()
    multiprocess.util.register_after_fork(_follow_parent, _follow_parent)
    for number, job in enumerate(jobs, 1):
        started = time.perf_counter()
        executor = LocalPipelineExecutor(
            job.pipeline,
            tasks=job.tasks,
            workers=min(recipe.executor.workers, job.tasks),
            logging_dir=str(work / "logs" / job.name),
            start_method="forkserver" if job.fresh_processes else "fork",
        )
        try:
            executor.run()
        except InputCutShort as err:  # from a worker: the input, not the program, is at fault
            raise err.refusal() from None
        except OSError as err:
            if not names_a_full_disk(err):
                raise
            raise BigptError(
                f"output.dir = {work.parent}: a worker's write failed: {err.strerror or err} (or over quota). "
                "Free space there, then run the same command again to resume (finished shards are kept)."
            ) from None
        _done(number, jobs, started)


def _done(number: int, jobs: list[Job], started: float) -> None:
    if sys.stderr.isatty():
        job = jobs[number - 1]
        console.note(
            f"[{number}/{len(jobs)}] {job.name}: {job.tasks} tasks done in {time.perf_counter() - started:.1f} s"
        )


def run_ray(recipe: CurationRecipe, jobs: list[Job], work: Path) -> None:
    """Each job with datatrove's Ray executor (in a ``ray_connection``), in order, this process
    waiting for each. datatrove logs a failed task and returns: a job with unfinished tasks
    stops the run here."""
    from datatrove.executor import RayPipelineExecutor

    config = recipe.executor.ray
    for number, job in enumerate(jobs, 1):
        started = time.perf_counter()
        executor = RayPipelineExecutor(
            job.pipeline,
            tasks=job.tasks,
            workers=min(recipe.executor.workers, job.tasks),
            logging_dir=str(work / "logs" / job.name),
            cpus_per_task=config.cpus_per_task,
            mem_per_cpu_gb=config.mem_per_cpu_gb,
        )
        executor.run()
        if failed := executor.get_incomplete_ranks(range(job.tasks)):
            raise BigptError(
                f"{len(failed)} of {job.tasks} tasks of step {job.name} failed on Ray; their logs "
                f"are in {work / 'logs' / job.name / 'logs'}. Run the same command again to retry "
                f"them (finished tasks are kept)."
            )
        _done(number, jobs, started)


@contextlib.contextmanager
def ray_connection(config: RayConfig):
    """This process connected to the cluster of ``executor.ray.address`` (or a local one it
    starts) for the block, unless it already is; a clear error before any work when it cannot."""
    try:
        import ray
    except ImportError:
        raise BigptError(
            "executor.kind = \"ray\" needs the Python package 'ray', which is not installed; "
            "install bigpt's ray extra: pip install -e '.[ray]'."
        ) from None
    if ray.is_initialized():
        yield
        return
    hint = (
        'start one with `ray start --head` on this machine (then address = "auto"), give its head node '
        'as HOST:PORT, or set executor.ray.address = "local" to start Ray here for the run'
    )
    if config.address not in ("auto", "local"):
        host, _, port = config.address.removeprefix("ray://").rpartition(":")
        try:  # Ray itself retries an unreachable address for minutes
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as err:
            raise BigptError(
                f'executor.ray.address = "{config.address}" is not a reachable Ray head node ({err}); {hint}.'
            ) from None
    try:
        ray.init(address=config.address, log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
    except ConnectionError:
        raise BigptError(f'executor.ray.address = "{config.address}" found no Ray cluster to join; {hint}.') from None
    try:
        yield
    finally:
        ray.shutdown()


def _follow_parent(_=None) -> None:
    """Run first in every process datatrove forks (its pool's workers, its manager): exit when
    the main process is gone (killed, they would wait for their next task forever)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _guard_forks() -> None:
    """Ctrl-C reaches every process of the terminal's group: forked processes ignore it (the main
    process stops them, with no traceback from each), and it is held while forking (arriving in
    a fork's handlers, it printed "Exception ignored" tracebacks and the run went on). Once per
    process: fork handlers cannot be removed."""
    if signal.getsignal(signal.SIGINT) is _on_ctrl_c or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _on_ctrl_c)
    os.register_at_fork(before=_hold_ctrl_c, after_in_parent=_release_ctrl_c, after_in_child=_ignore_ctrl_c)


_forking = False


def _hold_ctrl_c() -> None:
    global _forking
    _forking = True
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _release_ctrl_c() -> None:
    global _forking
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a held Ctrl-C arrives here
    _forking = False


def _ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _on_ctrl_c(signum, frame):
    if _forking:  # in a fork handler, where a KeyboardInterrupt is printed and dropped: again soon
        threading.Timer(0.05, _thread.interrupt_main).start()
        return
    raise KeyboardInterrupt


def _load_word_tokenizers(recipe: CurationRecipe) -> None:
    """Load the word tokenizers the stages use once, here: forked workers inherit them instead
    of each spending seconds loading spaCy."""
    languages = {getattr(recipe.params(stage), "language", None) for stage in recipe.stages}
    if "minhash_dedup" in recipe.stages:
        languages.add("en")  # its shingles are words of datatrove's default language
    for language in languages - {None}:
        load_word_tokenizer(language).word_tokenize("warm up")


def slurm_executors(recipe: CurationRecipe, jobs: list[Job], work: Path, finalize) -> list[SlurmPipelineExecutor]:
    """One executor per job, each depending on the one before; the last runs ``finalize``."""
    slurm = recipe.executor.slurm
    executors: list[SlurmPipelineExecutor] = []
    for job in [*jobs, Job("finalize", [finalize], 1)]:
        executors.append(
            SlurmPipelineExecutor(
                job.pipeline,
                tasks=job.tasks,
                workers=recipe.executor.workers,
                time=slurm.time,
                partition=slurm.partition,
                cpus_per_task=slurm.cpus_per_task,
                mem_per_cpu_gb=slurm.mem_per_cpu_gb,
                qos=slurm.qos,
                venv_path=slurm.venv_path or None,
                job_name=f"{recipe.name}_{job.name}",
                logging_dir=str(work / "logs" / job.name),
                depends=executors[-1] if executors else None,
            )
        )
    return executors


def submit_slurm(recipe: CurationRecipe, jobs: list[Job], work: Path, finalize) -> None:
    """sbatch every job (launching the last launches the chain of its dependencies)."""
    slurm_executors(recipe, jobs, work, finalize)[-1].run()
