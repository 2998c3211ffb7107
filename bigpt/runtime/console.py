"""Everything bigpt, its launchers and its tools print goes through here: which rank speaks, to
stdout or stderr, and how a line starts.

- One rank speaks for the job: the last one, which holds the loss (the last pipeline stage); a
  process outside a job (a tool, ``python launchers/run.py``) is a job of one. It says results
  and progress on stdout (``say``: step lines, validation, where a run starts from, what a tool
  wrote), notes and warnings on stderr (``note``: "bigpt: ...", ``warn``: "bigpt: warning: ...").
- Errors go to stderr: an error every rank meets alike is said once, by the speaking rank
  (``error``); one a rank may meet on its own is said by that rank, naming it in a job of several
  (``rank_error``).
- Every other rank prints nothing else; dependency output that is expected and says nothing a
  user can act on (no Apex/TE on CPU, deprecations inside megatron-core and of the APIs it calls,
  advice addressed to megatron-core's own callers) is dropped (``quiet_dependencies``).

The rank comes from torchrun's environment (RANK, WORLD_SIZE), so it is known before the process
groups exist, and in a signal handler.
"""

import contextlib
import errno
import functools
import logging
import os
import signal
import sys
import threading
import warnings

from bigpt.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, BigptError, Terminated
from bigpt.paths import names_a_full_disk

_EXPECTED_WARNINGS = (
    r".*(Apex|Transformer Engine and Apex) (is|are) not installed.*",
    r"full scope is deprecated.*",
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor.*",
    r"When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS.*",
    r"MimoModelConfig is experimental.*",  # an import side effect
    # torch.distributed.checkpoint, as megatron-core's dist_checkpointing calls it
    r"The argument order of load has been changed.*",
    r"torch\.distributed is disabled, unavailable or uninitialized.*",
    r"Please use DTensor instead and we are deprecating ShardedTensor.*",
)

_EXPECTED_LOG_LINES = {  # megatron-core logger -> the start of a message that is not for bigpt's users
    # bigpt stays on GPTModel on purpose: docs/megatron-core.md, "GPTModel, not HybridModel".
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    # DDP computes the same layout the distributed optimizer would be asked for.
    "megatron.core.distributed.distributed_data_parallel": "DistributedDataParallel: full_param_layout not provided",
    # dist_checkpointing's own load and (synchronous) save still go through these.
    "megatron.core.dist_checkpointing.strategies.common": "load_common is deprecated",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    "megatron.core.datasets.gpt_dataset": "Unable to save MockGPTDataset indexes",  # mock data has no cache
}


def quiet_dependencies() -> None:
    """Drop the expected dependency output; call before megatron-core is imported (it warns then)."""
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, start in _EXPECTED_LOG_LINES.items():
        logging.getLogger(name).addFilter(_DroppingLinesStartingWith(start))


class _DroppingLinesStartingWith(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def speaks() -> bool:
    """This process speaks for the job: the last rank, or the only one."""
    return rank() == world_size() - 1


def say(message: str) -> None:
    if speaks():
        print(message, flush=True)


def note(message: str) -> None:
    if speaks():
        print(f"bigpt: {message}", file=sys.stderr, flush=True)


def warn(message: str, *, here: bool = False) -> None:
    """``here``: said by this rank whichever it is (what this rank alone found, e.g. as rank 0)."""
    if here or speaks():
        print(f"bigpt: warning: {message}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    if speaks():
        print(f"bigpt: error: {message}", file=sys.stderr, flush=True)


def rank_error(message: str) -> None:
    who = f" (rank {rank()})" if world_size() > 1 else ""
    print(f"bigpt: error{who}: {message}", file=sys.stderr, flush=True)


def reports_user_errors(main):
    """Decorates a tool's ``main(argv) -> int``, the one place every tool ends:

    - a BigptError is said as its one paragraph, without a traceback (exit ``EXIT_USER_ERROR``);
    - Ctrl-C (KeyboardInterrupt) or SIGTERM is one line (exit 130, or 143 for SIGTERM): SIGTERM
      is raised as ``Terminated`` so that the ``finally`` blocks that remove partial outputs run;
    - a full disk (or quota) that no writer named is one paragraph naming the file, when known.

    Each tool removes what it had half written (``bigpt.paths``: temporary names, renamed when
    complete) on the way out, so the line can say so."""

    @functools.wraps(main)
    def run(argv=None) -> int:
        with terminating_cleanly():
            try:
                return main(argv)
            except BigptError as err:  # a tool under torchrun: each rank, as it may exit first
                rank_error(str(err))
                return EXIT_USER_ERROR
            except KeyboardInterrupt as err:
                code = 128 + err.signum if isinstance(err, Terminated) else EXIT_INTERRUPTED  # as a shell reports it
                note(f"{_interruption(err)}; the output being written was removed (exit {code})")
                return code
            except OSError as err:
                if not names_a_full_disk(err):
                    raise
                where = f"writing {err.filename}" if err.filename else "writing the output"
                rank_error(
                    f"{where} failed: {os.strerror(errno.ENOSPC)} (or over quota); what was half "
                    "written was removed. Free space there or write elsewhere, then run again."
                )
                return EXIT_USER_ERROR

    return run


def _interruption(err: KeyboardInterrupt) -> str:
    """What stopped the process, in words: interrupted (Ctrl-C), or stopped by a signal."""
    return f"stopped by {signal.Signals(err.signum).name}" if isinstance(err, Terminated) else "interrupted (Ctrl-C)"


@contextlib.contextmanager
def terminating_cleanly():
    """SIGTERM (a ``kill``, a scheduler's cancel) raises ``Terminated`` in this process for the
    block, as Ctrl-C raises KeyboardInterrupt, instead of ending it where it stands (a half-written
    output left behind). Processes forked meanwhile keep the default: they end at once. Outside
    the main thread (a tool's main called from a thread) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != owner:  # a forked worker: die as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
