"""The one exception type for mistakes a user can make (recipe, data, checkpoint, layout).

Launchers and tools catch it, say its single-paragraph message without a traceback
(``bigpt.runtime.console``) and exit with ``EXIT_USER_ERROR``; anything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2


class BigptError(Exception):
    """A user-fixable problem. The message names the recipe key or file and what to do."""


class BigptErrors(BigptError):
    """Several independent problems found in one pass (each dataset of a blend): said together at
    a start, listed one by one by --dry-run."""

    def __init__(self, problems: list[str]):
        super().__init__(" ".join(problems))
        self.problems = problems


def raise_problems(problems: list[str]) -> None:
    """Raise what ``problems`` holds, if anything: one as a BigptError, several as BigptErrors."""
    if len(problems) == 1:
        raise BigptError(problems[0])
    if problems:
        raise BigptErrors(problems)


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved after SIGTERM/SIGUSR1/SIGINT; re-run the same command (requeue)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended (nothing saved)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``signum``) in a tool, raised as Ctrl-C is (``console.terminating_cleanly``), so
    that what cleans up after an interrupt cleans up after it too; the tool exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Preempted(Exception):
    """A preemption signal arrived; the run saved a checkpoint and stops so that it can be requeued."""
