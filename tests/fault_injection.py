"""`launchers/run.py` with one fault injected, for the fault-tolerance tests (never used by bigpt).

BIGPT_TEST_FAULT selects it:
  nan_loss@K      the loss of step K is NaN (and so are its gradients)
  disk_full@K     writing checkpoint files fails with ENOSPC once the save of step K starts
  without_fix@F   bigpt/runtime/megatron_fixes.py's fix F (a function name) is not applied
"""

import builtins
import errno
import io
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launchers"))

import run  # noqa: E402

from bigpt.families import decoder  # noqa: E402
from bigpt.runtime import megatron_fixes  # noqa: E402
from bigpt.train import trainer  # noqa: E402


def nan_loss_at(bad_step: int) -> None:
    current = {"step": 0}
    train_step, token_loss = trainer.Trainer.train_step, decoder.token_loss  # the loss of both decoder families

    def counting_train_step(self, data_iterator):
        current["step"] = self.state.iteration + 1
        return train_step(self, data_iterator)

    def poisoned_token_loss(loss_mask, per_token_loss):
        if current["step"] == bad_step:
            per_token_loss = per_token_loss * float("nan")
        return token_loss(loss_mask, per_token_loss)

    trainer.Trainer.train_step = counting_train_step
    decoder.token_loss = poisoned_token_loss


def disk_full_at(full_step: int) -> None:
    """Files opened for writing inside a checkpoint being written (``iter_*.tmp``) accept no data."""
    real_open = builtins.open
    target = f"iter_{full_step:07d}.tmp"

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if any(flag in mode for flag in "wa") and target in str(file):
            return FullDisk(handle)
        return handle

    builtins.open = io.open = open_on_a_full_disk  # io.open: what pathlib (torch's checkpoint writer) calls


def without_fix(name: str) -> None:
    assert callable(getattr(megatron_fixes, name)), name
    setattr(megatron_fixes, name, lambda: None)


if __name__ == "__main__":
    kind, _, at = os.environ["BIGPT_TEST_FAULT"].partition("@")
    if kind == "without_fix":
        without_fix(at)
    else:
        {"nan_loss": nan_loss_at, "disk_full": disk_full_at}[kind](int(at))
    run.exit_without_final_gc(run.main())
