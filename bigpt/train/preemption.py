"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before it kills or requeues a job) asks the
run to finish its current step, save a checkpoint and exit with ``EXIT_PREEMPTED``.

The handler only records the signal, so a second signal during the save cannot interrupt it;
every rank learns of a signal that reached any of them through the trainer's per-step flags.
"""

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[str] = []


def install() -> None:
    _received.clear()
    for signum in SIGNALS:
        signal.signal(signum, _record)


def _record(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def requested() -> bool:
    return bool(_received)


def ignore_preemption_signals() -> None:
    """For helper processes that must finish their part of the save (they get the signal too)."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
