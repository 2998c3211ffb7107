"""Checkpoint callback: save every ``checkpoint.save_interval`` steps and at the end of training."""

from pathlib import Path

from bigpt.checkpoint import save_checkpoint
from bigpt.train.trainer import Callback


class Checkpointer(Callback):
    def __init__(self, root: Path):
        self.root = root
        self.last_saved = None

    def on_start(self, trainer):
        self.last_saved = trainer.state.iteration  # 0, or the checkpoint this run resumed from

    def on_step(self, trainer, metrics):
        interval = trainer.recipe.checkpoint.save_interval
        if interval and trainer.state.iteration % interval == 0:
            self.save(trainer)

    def on_end(self, trainer):
        if self.last_saved != trainer.state.iteration:
            self.save(trainer)

    def save(self, trainer):
        save_checkpoint(trainer, self.root)
        self.last_saved = trainer.state.iteration
