"""Callbacks: throughput/MFU, the log line + TensorBoard, validation, checkpoints."""

import math
import os

import psutil
import torch

from bigpt.flops import flops_per_step, mfu_peak_flops_per_second
from bigpt.runtime import console
from bigpt.runtime.device import on_gpu
from bigpt.train.trainer import Callback, Trainer


def memory_gib() -> float:
    """Peak device memory on a GPU; resident memory of this process on CPU."""
    if on_gpu():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class Throughput(Callback):
    """Adds tokens/s, TFLOP/s per device and MFU (when the device's peak is known) to the metrics,
    from the same FLOPs model the planner uses: the model's FLOPs (recompute not counted), against
    the FP8 peak for an FP8 recipe (bigpt.flops.mfu_peak_flops_per_second)."""

    def on_start(self, trainer):
        name = torch.cuda.get_device_name() if on_gpu() else ""
        self.peak_flops_per_second = mfu_peak_flops_per_second(trainer.recipe, name)

    def on_step(self, trainer, metrics):
        recipe, seconds = trainer.recipe, metrics["step_time"]
        gbs = metrics["global_batch_size"]
        flops_per_second = flops_per_step(recipe, gbs) / seconds / trainer.layout.world_size
        metrics["tokens_per_s"] = gbs * recipe.model.seq_length / seconds
        metrics["tflops"] = flops_per_second / 1e12  # per device
        peak = self.peak_flops_per_second
        metrics["mfu"] = flops_per_second / peak if peak else math.nan
        metrics["memory_gib"] = memory_gib()


class MetricsLogger(Callback):
    """One line every ``logging.interval`` steps from the speaking rank (it holds the loss, as every
    rank does); every scalar to TensorBoard, which that rank writes. The line's loss is the mean
    over the steps since the previous line, skipped steps left out (as Megatron-LM's): one step's
    loss is noisy. TensorBoard keeps every step's train/loss and adds that mean as
    train/loss_interval_mean at the logging steps; the line's other numbers are its own step's."""

    def __init__(self, run_dir: str, line_fields: dict[str, str] | None = None):
        """``line_fields``: more metrics the line shows as interval means (a model family's, e.g.
        MoE's), each with its label."""
        self.run_dir = run_dir
        self.writer = None
        self.labels = {"loss": "loss", **(line_fields or {})}
        self.interval: dict[str, list[float]] = {name: [] for name in self.labels}  # since the last line

    def on_start(self, trainer):
        if trainer.recipe.logging.tensorboard and console.speaks():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))

    def on_step(self, trainer, metrics):
        step = trainer.state.iteration
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", float(value), step)
        if not metrics["skipped"]:
            for name, values in self.interval.items():
                if name in metrics:
                    values.append(metrics[name])
        if step % trainer.recipe.logging.interval and step != trainer.recipe.train.train_iters:
            return
        means = {name: sum(values) / len(values) for name, values in self.interval.items() if values}
        self.interval = {name: [] for name in self.labels}
        mean_loss = means.pop("loss", math.nan)
        extras = "".join(f" | {self.labels[name]} {mean:.4g}" for name, mean in means.items())
        if self.writer:
            self.writer.add_scalar("train/loss_interval_mean", mean_loss, step)
        tokens = trainer.state.consumed_tokens
        mfu = "n/a" if math.isnan(metrics["mfu"]) else f"{metrics['mfu']:.1%}"
        console.say(
            f"step {step}/{trainer.recipe.train.train_iters} | tokens {tokens:,} | loss {mean_loss:.4f} "
            f"| lr {metrics['lr']:.3e} | grad norm {metrics['grad_norm']:.3f} | {metrics['step_time']:.3f} s "
            f"| {metrics['tokens_per_s']:,.0f} tok/s | {metrics['tflops']:.3g} TFLOP/s/dev | MFU {mfu} "
            f"| mem {metrics['memory_gib']:.2f} GiB{extras}" + (" | skipped" if metrics["skipped"] else "")
        )

    def log_eval(self, step: int, loss: float) -> None:
        console.say(f"step {step} | validation loss {loss:.4f} | perplexity {math.exp(min(loss, 50)):.2f}")
        if self.writer:
            self.writer.add_scalar("valid/loss", loss, step)
            self.writer.add_scalar("valid/perplexity", math.exp(min(loss, 50)), step)

    def close(self, trainer):
        if self.writer:
            self.writer.close()


class Evaluator(Callback):
    """Validation loss every ``eval.interval`` steps over ``eval.iters`` global batches."""

    def __init__(self, make_iterator, logger: MetricsLogger):
        self.make_iterator, self.logger = make_iterator, logger

    def on_step(self, trainer: Trainer, metrics):
        interval = trainer.recipe.eval.interval
        step = trainer.state.iteration
        if interval and (step % interval == 0 or step == trainer.recipe.train.train_iters):
            self.logger.log_eval(step, trainer.evaluate(self.make_iterator, trainer.recipe.eval.iters))
