"""Stopping with a checkpoint: SIGTERM or SIGUSR1 (what SLURM sends before it kills or requeues a
job), SIGINT (Ctrl-C) or the loss of the launcher ask the run to finish its current step, save a
checkpoint and exit with ``EXIT_PREEMPTED``.

The handler only records the signal, so a second SIGTERM/SIGUSR1 during the save cannot interrupt
it; every rank learns of a signal that reached any of them through the trainer's per-step flags.
A second Ctrl-C exits at once, without saving (torchrun starts each rank in a session of its own,
so a Ctrl-C reaches a rank once, forwarded by torchrun). A rank whose launcher died (torchrun
killed with SIGKILL: it can pass nothing on) is re-parented; it notices at the next step and stops
the same way, rather than train on unwatched.
"""

import contextlib
import ctypes
import os
import signal
import sys

from bigpt.runtime import console

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies
_received: list[str] = []
_launcher: list[int] = []


@contextlib.contextmanager
def stopping_with_a_checkpoint():
    """The stop signals are recorded for the block (a run); the handlers before it are restored
    after, so a process that goes on (tools/ladder.py's runs, a test) is not left with handlers
    that make a SIGTERM do nothing: datatrove's and multiprocessing's pools stop their workers with it."""
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _received.clear()
    _launcher[:] = [os.getppid()]
    for signum in SIGNALS:
        signal.signal(signum, _record)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        _launcher.clear()


def _record(signum, frame) -> None:
    if signum == signal.SIGINT:
        # The next Ctrl-C ends the process in the kernel: it works even while a collective or a
        # write holds the interpreter, where no Python handler could run.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if console.speaks():
            _say(
                "bigpt: interrupted: finishing this step, saving a checkpoint, then exiting (Ctrl-C again to stop "
                "at once, without saving)\n"
            )
    _received.append(signal.Signals(signum).name)


def _say(text: str) -> None:
    os.write(sys.stderr.fileno(), text.encode())  # not print: it may be what the signal interrupted


def requested() -> bool:
    """A stop was asked for: a signal, or the launcher that started this process is gone."""
    return bool(_received) or (bool(_launcher) and os.getppid() != _launcher[0])


def start_helper_process() -> None:
    """For a rank's helper processes: they ignore the stop signals (they must finish their part of
    the save, and may get the signal too), and end with their rank however it ends (a second
    Ctrl-C, SIGKILL), instead of living on holding its output pipes open."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
