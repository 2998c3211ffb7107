"""Checkpoint callback: save every ``checkpoint.save_interval`` steps and at the end of training
(or at preemption), asynchronously when ``checkpoint.async_save`` is set."""

from pathlib import Path

from bigpt.checkpoint import Checkpointed, CheckpointWriter
from bigpt.train.trainer import Callback, Trainer


def checkpointed(trainer: Trainer) -> Checkpointed:
    """The parts of ``trainer`` a checkpoint saves and restores."""
    return Checkpointed(
        model=trainer.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        counters=trainer.state,
        parts=trainer.stateful_parts(),
        layout=trainer.layout,
        recipe=trainer.recipe,
    )


class Checkpointer(Callback):
    priority = -100  # last: a save holds what every other callback did at this step

    def __init__(self, root: Path, asynchronous: bool):
        self.writer = CheckpointWriter(root, asynchronous)
        self.last_saved = None

    def on_start(self, trainer):
        self.last_saved = trainer.state.iteration  # 0, or the checkpoint this run resumed from

    def on_step(self, trainer, metrics):
        self.writer.poll()
        interval = trainer.recipe.checkpoint.save_interval
        if interval and trainer.state.iteration % interval == 0:
            self.save(trainer)

    def on_end(self, trainer):
        if self.last_saved != trainer.state.iteration:
            self.save(trainer)
        self.writer.wait()

    def on_stop(self, trainer):
        self.writer.wait()  # the save of the last good step: the checkpoint the guard's message points to

    def save(self, trainer):
        self.writer.save(checkpointed(trainer))
        self.last_saved = trainer.state.iteration
