"""Bad steps: a non-finite loss or gradient, or a loss spike. Every rank reaches the same verdict
(the loss is reduced over the whole world, the gradient flag is all-reduced) before the
optimizer touches the weights; ``train.on_bad_step`` decides whether the step is skipped or the
run stops with its last checkpoint intact."""

import math
from collections import deque

from bigpt.errors import BigptError
from bigpt.recipe.tables import TrainConfig

SPIKE_HISTORY = 100  # good steps whose mean loss a spike is measured against
SPIKE_WARMUP = 10  # good steps needed before spikes are judged at all


class BadStepStop(BigptError):
    """The guard stops the run: raised on every rank at the same step (the verdict is the world's)."""


class BadStepGuard:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.recent: deque[float] = deque(maxlen=SPIKE_HISTORY)
        self.bad_in_a_row = 0

    def verdict(self, loss: float, grads_finite: bool) -> str | None:
        """Why the step that produced ``loss`` must not update the weights, or None."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if not grads_finite:
            return "the gradients hold NaN or Inf"
        factor = self.config.loss_spike_factor
        if factor and len(self.recent) >= SPIKE_WARMUP:
            mean = sum(self.recent) / len(self.recent)
            if loss > factor * mean:
                return (
                    f"the loss {loss:.4f} is above train.loss_spike_factor = {factor} times the mean of the "
                    f"last {len(self.recent)} steps ({mean:.4f})"
                )
        return None

    def state_dict(self) -> dict:
        """What a checkpoint carries, so that a resumed run judges spikes as the uninterrupted one
        would (the same on every rank, as the losses are)."""
        return {"recent": list(self.recent), "bad_in_a_row": self.bad_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        """``state`` may be empty: a checkpoint saved before the guard's state was, a fresh history."""
        self.recent = deque(state.get("recent", ()), maxlen=SPIKE_HISTORY)
        self.bad_in_a_row = state.get("bad_in_a_row", 0)

    def record(self, step: int, loss: float, reason: str | None) -> None:
        """Remember a good loss, or apply the policy to a bad step (raising to stop the run)."""
        if reason is None:
            self.recent.append(loss)
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        policy = self.config.on_bad_step
        if policy == "skip" and self.bad_in_a_row <= self.config.max_skipped_steps:
            return
        limit = self.config.max_skipped_steps
        why = (
            'train.on_bad_step = "stop"'
            if policy == "stop"
            else f"{self.bad_in_a_row} bad steps in a row exceed train.max_skipped_steps = {limit}"
        )
        raise BadStepStop(
            f"step {step}: {reason}; stopping ({why}) without saving, so the last checkpoint in "
            "checkpoint.dir is intact. Resume from it after lowering optimizer.lr, "
            'raising train.clip_grad, or checking the data at this step; train.on_bad_step = "skip" '
            "skips such steps instead."
        )
