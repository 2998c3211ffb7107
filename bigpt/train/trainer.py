"""The loop: steps, counters and callbacks. The model-specific work lives in ``step.py``; logging,
throughput, evaluation and checkpointing are callbacks.

Metrics are a channel: each step's metrics (``train/<name>``) and whatever callbacks record with
``Trainer.record`` (``valid/<set>/loss``, ...) reach every callback's ``log_metrics`` once per
step, as named scalars; the console line, TensorBoard and Weights & Biases are such consumers."""

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.num_microbatches_calculator import (
    get_current_global_batch_size,
    get_num_microbatches,
    update_num_microbatches,
)
from megatron.core.pipeline_parallel import get_forward_backward_func

from bigpt.checkpoint.state import COUNTERS
from bigpt.families import family_of
from bigpt.layout import Layout, data_position
from bigpt.recipe import Recipe
from bigpt.runtime import console, preemption
from bigpt.runtime.device import device, on_gpu
from bigpt.train.guard import BadStepGuard, BadStepStop
from bigpt.train.step import reduce_losses


@dataclass
class TrainState:
    """What a checkpoint must carry for a resumed run to continue exactly."""

    iteration: int = 0
    consumed_samples: int = 0
    """Samples trained on: the batch ramp-up and the learning-rate schedule count these."""
    consumed_tokens: int = 0
    """Tokens trained on (each step's samples × its model.seq_length): the data stream continues
    after them (``layout.data_position``), and data phases start at a count of them."""


def logging_step(recipe: Recipe, step: int) -> bool:
    """A step whose metrics the console line shows: every logging.interval steps, and the last."""
    return step % recipe.logging.interval == 0 or step == recipe.train.train_iters


def evaluation_step(recipe: Recipe, step: int) -> bool:
    """A step at which validation sets and tasks are evaluated: every eval.interval steps (0:
    never), and the last."""
    interval = recipe.eval.interval
    return bool(interval) and (step % interval == 0 or step == recipe.train.train_iters)


class Callback:
    """Hooks that every rank reaches alike (collectives allowed), except ``close``.

    Callbacks run in descending ``priority`` (ties in the order given): those that add to a step's
    metrics before those that read them. A callback with a ``state_name`` is a stateful part of the
    checkpoint: its ``state_dict()`` (plain Python values, the same on every rank) is saved under
    that name and handed back to ``load_state_dict`` on resume (an empty dict when the checkpoint
    has none: saved before the part existed)."""

    priority: int = 0
    state_name: str | None = None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def on_start(self, trainer: "Trainer") -> None:
        pass

    def on_step(self, trainer: "Trainer", metrics: dict) -> None:
        """After every optimizer step; ``metrics`` may be extended for later callbacks."""

    def log_metrics(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None:
        """After every step's ``on_step``: every scalar of this step, by name (``train/loss``,
        ``valid/loss``, ...); a consumer (console, TensorBoard, W&B) writes what it wants of them."""

    def on_end(self, trainer: "Trainer") -> None:
        """The run reached train.train_iters, or a preemption signal stops it."""

    def on_stop(self, trainer: "Trainer") -> None:
        """The bad-step guard stops the run without saving: finish what is in flight."""

    def close(self, trainer: "Trainer") -> None:
        """Last, however the run ends, an exception on this rank alone included: release what this
        rank holds (files, writers), without collectives (the other ranks may never reach them)."""


class Trainer:
    def __init__(self, recipe: Recipe, layout: Layout, model, optimizer, scheduler, batches, callbacks):
        """``batches(position)`` returns a fresh micro-batch iterator for this rank, from that sample on."""
        self.recipe, self.layout = recipe, layout
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.batches = batches
        self.callbacks = sorted(callbacks, key=lambda callback: -callback.priority)  # stable: ties keep their order
        self.state = TrainState()
        self.guard = BadStepGuard(recipe.train)
        self.recorded: dict[str, float] = {}  # this step's metrics besides the step's own (evaluations)
        self.preempted = False
        self.family = family_of(recipe.model)

    def data_iterator(self, make_iterator):
        """One iterator per virtual pipeline chunk over the same stream, or a single one."""
        if len(self.model) == 1:
            return make_iterator()
        return [make_iterator() for _ in self.model]

    def run_schedule(self, data_iterator, num_microbatches: int, forward_only: bool, forward_step=None) -> list[dict]:
        """megatron-core's schedule over the model chunks; ``forward_step``: another than the
        family's (the same inputs, other losses)."""
        model = self.model if len(self.model) > 1 else self.model[0]
        return get_forward_backward_func()(
            forward_step_func=forward_step or self.family.forward_step,
            data_iterator=data_iterator,
            model=model,
            num_microbatches=num_microbatches,
            seq_length=self.recipe.model.seq_length,
            micro_batch_size=self.recipe.train.micro_batch_size,
            forward_only=forward_only,
        )

    def train(self) -> None:
        """Run to train.train_iters, or until a preemption signal (then ``self.preempted``; the
        signals are recorded inside ``preemption.stopping_with_a_checkpoint``, as bigpt.train.main runs it)."""
        with contextlib.ExitStack() as closing:  # every close runs, even when one of them raises
            for callback in self.callbacks:
                closing.callback(callback.close, self)
                callback.on_start(self)
            update_num_microbatches(self.state.consumed_samples, consistency_check=False)
            position = data_position(self.state.consumed_tokens, self.recipe.model.seq_length)
            train_iterator = self.data_iterator(lambda: self.batches(position))
            try:
                while self.state.iteration < self.recipe.train.train_iters and not self.preempted:
                    self.after_step(self.train_step(train_iterator))
            except BadStepStop:
                for callback in self.callbacks:
                    callback.on_stop(self)
                raise
            for callback in self.callbacks:
                callback.on_end(self)

    def stateful_parts(self) -> dict:
        """What a checkpoint saves besides model, optimizer, scheduler, counters and RNG, by name:
        the bad-step guard and every callback that has a ``state_name``."""
        parts = {"guard": self.guard}
        for callback in self.callbacks:
            if callback.state_name is not None:
                assert callback.state_name not in (*parts, *COUNTERS), f"a second part named {callback.state_name}"
                parts[callback.state_name] = callback
        return parts

    def record(self, name: str, value: float) -> None:
        """A metric of this step besides the step's own (e.g. ``valid/loss``): it reaches every
        callback's ``log_metrics`` with them."""
        self.recorded[name] = float(value)

    def after_step(self, step_metrics: dict) -> None:
        """Every callback's ``on_step`` (which may extend ``step_metrics`` or ``record`` more), then
        every callback's ``log_metrics`` with all of this step's metrics, by name."""
        for callback in self.callbacks:
            callback.on_step(self, step_metrics)
        metrics = {f"train/{name}": float(value) for name, value in step_metrics.items()}
        metrics.update(self.recorded)
        self.recorded = {}
        for callback in self.callbacks:
            callback.log_metrics(self, self.state.iteration, metrics)

    def train_step(self, data_iterator) -> dict:
        update_num_microbatches(self.state.consumed_samples, consistency_check=True)
        global_batch_size = get_current_global_batch_size()
        start = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.run_schedule(data_iterator, get_num_microbatches(), forward_only=False)
        loss_sum, tokens = reduce_losses(losses).tolist()
        loss = loss_sum / max(tokens, 1)
        grads_finite, self.preempted = self._world_flags()
        step = self.state.iteration + 1
        bad = self.guard.verdict(loss, grads_finite)
        self.guard.record(step, loss, bad)
        if bad is None:
            updated, grad_norm, _ = self.optimizer.step()
        else:
            updated, grad_norm = False, None
            console.say(f'step {step}: skipped, {bad} (train.on_bad_step = "skip")')
        if updated:
            self.scheduler.step(increment=global_batch_size)
        if on_gpu():
            torch.cuda.synchronize()
        self.state.iteration += 1
        self.state.consumed_samples += global_batch_size
        self.state.consumed_tokens += global_batch_size * self.recipe.model.seq_length
        return {
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": math.nan if grad_norm is None else float(grad_norm),
            "loss_scale": float(self.optimizer.get_loss_scale()),
            "skipped": not updated,
            "global_batch_size": global_batch_size,
            "step_time": time.perf_counter() - start,
        }

    def _world_flags(self) -> tuple[bool, bool]:
        """(gradients finite everywhere, a preemption signal reached some rank): one all-reduce.
        Under fp16 the loss scaler already skips non-finite gradients, and lowers the scale."""
        check_grads = self.recipe.precision.dtype != "fp16"
        sums = [
            torch.sum(buffer.grad_data, dtype=torch.float32)
            for chunk in self.model
            if check_grads
            for buffer in chunk.buffers + chunk.expert_parallel_buffers
        ]
        grads_bad = (~torch.isfinite(torch.stack(sums))).any() if sums else torch.tensor(False)
        flags = torch.stack([grads_bad.float().cpu(), torch.tensor(float(preemption.requested()))]).to(device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        grads_bad, preempt = flags.tolist()
        return not grads_bad, bool(preempt)

    @torch.no_grad()
    def evaluate(self, make_iterator, iters: int) -> float:
        """Mean token loss over ``iters`` global batches of the validation set, of the full
        train.global_batch_size during a batch ramp-up too (as Megatron-LM's), so that every
        evaluation measures the same samples."""
        for chunk in self.model:
            chunk.eval()
        total = torch.zeros(2, dtype=torch.float64)
        data_iterator = self.data_iterator(make_iterator)
        for _ in range(iters):
            total += reduce_losses(self.run_schedule(data_iterator, self.layout.num_microbatches, forward_only=True))
        for chunk in self.model:
            chunk.train()
        return (total[0] / total[1].clamp(min=1)).item()
