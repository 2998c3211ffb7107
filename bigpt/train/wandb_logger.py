"""[logging.wandb]: every metric of every step to a Weights & Biases run, from the speaking rank.

The run's id is a stateful part of the checkpoint, so a resumed run logs to the same W&B run
(``resume = "allow"``), its steps continuing where the checkpoint's left off."""

import secrets
import tomllib

import torch.distributed as dist

from bigpt.errors import BigptError
from bigpt.recipe import recipe_to_toml
from bigpt.runtime import console
from bigpt.train.trainer import Callback


class WandbLogger(Callback):
    priority = 10
    state_name = "wandb"

    def __init__(self):
        self.run_id: str | None = None  # from the checkpoint, or chosen at the start
        self.run = None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id")

    def on_start(self, trainer):
        import wandb

        if self.run_id is None:  # a fresh run: one id, chosen by rank 0, for every rank's checkpoint state
            chosen = [secrets.token_hex(4) if dist.get_rank() == 0 else None]  # W&B's id: 8 of [a-z0-9]
            dist.broadcast_object_list(chosen, src=0)
            self.run_id = chosen[0]
        if not console.speaks():
            return
        recipe, settings = trainer.recipe, trainer.recipe.logging.wandb
        try:
            self.run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                name=settings.name or recipe.name,
                tags=settings.tags or None,
                mode=settings.mode,
                dir=recipe.run_dir,
                id=self.run_id,
                resume="allow",  # a resumed run continues the W&B run of its checkpoint
                config=tomllib.loads(recipe_to_toml(recipe)),
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
        except wandb.errors.Error as err:
            raise BigptError(
                f"Weights & Biases could not start the run of logging.wandb.project = {settings.project!r} "
                f"({err}); log in (wandb login, or WANDB_API_KEY), check logging.wandb.entity, or set "
                'logging.wandb.mode = "offline" to write the run under run_dir and upload it later (wandb sync).'
            ) from None

    def log_metrics(self, trainer, step, metrics):
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self, trainer):
        if self.run is not None:
            self.run.finish()
            self.run = None
