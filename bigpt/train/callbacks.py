"""Callbacks: throughput/MFU, interval means, validation (producers of metrics); the console line
and TensorBoard (consumers of them, through ``log_metrics``). Checkpoints: ``checkpointing.py``."""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

from bigpt.flops import flops_per_step, mfu_peak_flops_per_second
from bigpt.runtime import console
from bigpt.runtime.device import on_gpu
from bigpt.train.trainer import Callback, Trainer, evaluation_step, logging_step


def memory_gib() -> float:
    """Peak device memory on a GPU; resident memory of this process on CPU."""
    if on_gpu():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class Throughput(Callback):
    """Adds tokens/s, TFLOP/s per device and MFU (when the device's peak is known) to the metrics,
    from the same FLOPs model the planner uses: the model's FLOPs (recompute not counted), against
    the FP8 peak for an FP8 recipe (bigpt.flops.mfu_peak_flops_per_second)."""

    priority = 100

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


class IntervalMeans(Callback):
    """At each logging step, adds ``<name>_interval_mean`` for the loss and a family's line fields:
    their mean over the steps since the previous logging step, skipped steps left out (as
    Megatron-LM's line): one step's loss is noisy."""

    priority = 80  # after the callbacks that add the fields

    def __init__(self, names):
        self.interval: dict[str, list[float]] = {name: [] for name in names}

    def on_step(self, trainer, metrics):
        if not metrics["skipped"]:
            for name, values in self.interval.items():
                if name in metrics:
                    values.append(metrics[name])
        if logging_step(trainer.recipe, trainer.state.iteration):
            for name, values in self.interval.items():
                metrics[f"{name}_interval_mean"] = sum(values) / len(values) if values else math.nan
                values.clear()


class ConsoleLine(Callback):
    """One line per logging step from the speaking rank (it holds the loss, as every rank does):
    the interval's mean loss (and a family's fields, each with its label), the step's other
    numbers; then one line per evaluation this step made."""

    priority = 20

    def __init__(self, line_fields: dict[str, str] | None = None):
        """``line_fields``: more metrics the line shows as interval means (a model family's, e.g.
        MoE's), each with its label."""
        self.labels = line_fields or {}

    def log_metrics(self, trainer, step, metrics):
        recipe = trainer.recipe
        if "train/loss_interval_mean" in metrics:
            extras = "".join(
                f" | {label} {metrics[f'train/{name}_interval_mean']:.4g}"
                for name, label in self.labels.items()
                if not math.isnan(metrics.get(f"train/{name}_interval_mean", math.nan))
            )
            tokens = trainer.state.consumed_tokens
            mfu = metrics["train/mfu"]
            console.say(
                f"step {step}/{recipe.train.train_iters} | tokens {tokens:,} "
                f"| loss {metrics['train/loss_interval_mean']:.4f} | lr {metrics['train/lr']:.3e} "
                f"| grad norm {metrics['train/grad_norm']:.3f} | {metrics['train/step_time']:.3f} s "
                f"| {metrics['train/tokens_per_s']:,.0f} tok/s | {metrics['train/tflops']:.3g} TFLOP/s/dev "
                f"| MFU {'n/a' if math.isnan(mfu) else f'{mfu:.1%}'} | mem {metrics['train/memory_gib']:.2f} GiB"
                + extras
                + (" | skipped" if metrics["train/skipped"] else "")
            )
        for name, value in metrics.items():
            if name.startswith("valid/") and name.endswith("/loss"):
                label = "validation" if name == "valid/loss" else f"validation {name[len('valid/') : -len('/loss')]}"
                console.say(f"step {step} | {label} loss {value:.4f} | perplexity {perplexity(value):.2f}")
            elif name.startswith("task/") and name.endswith("/acc"):
                task = name[len("task/") : -len("/acc")]
                console.say(
                    f"step {step} | task {task} | acc {value:.4f} | acc_norm {metrics[f'task/{task}/acc_norm']:.4f}"
                )


class TensorBoard(Callback):
    """Every scalar of every step into TensorBoard's event files under <run_dir>/tensorboard,
    written by the speaking rank."""

    priority = 10

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.writer = None

    def on_start(self, trainer):
        if console.speaks():
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
            writer.add_custom_scalars(dashboard_layout(trainer.recipe))
            self.writer = writer

    def log_metrics(self, trainer, step, metrics):
        if self.writer:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def close(self, trainer):
        if self.writer:
            self.writer.close()


def dashboard_layout(recipe) -> dict:
    """TensorBoard's Custom Scalars layout: one group each for training, the validation sets side
    by side, the downstream tasks and the MoE routers (the charts match tags by regular expression)."""
    train = {
        "loss": ["Multiline", [r"train/loss$", r"train/loss_interval_mean"]],
        "learning rate": ["Multiline", [r"train/lr$"]],
        "gradient norm": ["Multiline", [r"train/grad_norm$"]],
        "tokens per second": ["Multiline", [r"train/tokens_per_s$"]],
        "memory (GiB)": ["Multiline", [r"train/memory_gib$"]],
    }
    groups = {"train": train}
    if recipe.eval.interval:
        groups["validation"] = {
            "loss": ["Multiline", [r"valid/(.+/)?loss$"]],
            "perplexity": ["Multiline", [r"valid/(.+/)?perplexity$"]],
        }
        if recipe.eval.tasks:
            groups["tasks"] = {
                "acc": ["Multiline", [r"task/.+/acc$"]],
                "acc_norm": ["Multiline", [r"task/.+/acc_norm$"]],
            }
    if recipe.model.family == "moe_decoder":
        groups["MoE routers"] = {
            "balancing losses": ["Multiline", [r"train/moe_.*loss$"]],
            "load imbalance": ["Multiline", [r"train/moe_load_imbalance$"]],
        }
    return groups


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))


@dataclass
class ValidationSet:
    name: str
    """"valid" (the validation split of data.blend, without eval.sets) or an eval.sets name."""
    make_iterator: Callable
    """A fresh micro-batch iterator over its first samples: every evaluation reads the same ones."""
    iters: int
    """Global batches per evaluation."""

    @property
    def prefix(self) -> str:
        return "valid" if self.name == "valid" else f"valid/{self.name}"


class Evaluator(Callback):
    """Every ``eval.interval`` steps (and at the last), each validation set's mean token loss and
    perplexity, recorded as ``valid/loss`` (no eval.sets) or ``valid/<name>/loss``."""

    priority = 50

    def __init__(self, sets: list[ValidationSet]):
        self.sets = sets

    def on_step(self, trainer: Trainer, metrics):
        if evaluation_step(trainer.recipe, trainer.state.iteration):
            for validation in self.sets:
                loss = trainer.evaluate(validation.make_iterator, validation.iters)
                trainer.record(f"{validation.prefix}/loss", loss)
                trainer.record(f"{validation.prefix}/perplexity", perplexity(loss))
