"""Downstream tasks in the loop: zero-shot multiple-choice tasks (bigpt/data/tasks.py's format)
scored by the model's log-likelihood of each choice, through megatron-core's forward-only
schedule, so at any TP/PP/VPP/CP/DP layout. Each data-parallel rank scores its share of the
choices; the last pipeline stage's per-sequence sums are gathered on every rank."""

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_batch_on_this_cp_rank

from bigpt.data import micro_batches
from bigpt.data.tasks import Example, accuracies, blank_sample, read_task, scoring_samples
from bigpt.data.tokenizer import Tokenizer
from bigpt.recipe import Recipe
from bigpt.runtime.device import device
from bigpt.train.trainer import Callback, Trainer, evaluation_step


@dataclass
class Task:
    name: str
    examples: list[Example]
    samples: list[dict]
    """One scoring sample per (example, choice)."""


def load_tasks(recipe: Recipe, tokenizer: Tokenizer) -> list[Task]:
    """eval.tasks, read and turned into scoring samples."""
    tasks = []
    for i, entry in enumerate(recipe.eval.tasks):
        examples = read_task(entry.path, f"eval.tasks[{i}].path")[: entry.limit]
        tasks.append(Task(entry.name, examples, scoring_samples(examples, tokenizer, recipe.model.seq_length)))
    return tasks


class _Reading:
    """The micro-batch iterator a family's forward step reads, remembering the batch it took."""

    def __init__(self, iterator):
        self.iterator = iterator
        self.batch: dict = {}

    def __next__(self):
        self.batch = next(self.iterator)
        return self.batch


def _per_sequence_step(forward_step):
    """A forward step whose loss function reports each sequence's masked loss sum ("sequence
    loss"), from the family's per-token losses (the family's own step computes them)."""

    def step(data_iterator, model):
        reading = _Reading(data_iterator)
        output, _ = forward_step(reading, model)
        mask = reading.batch["loss_mask"]
        if parallel_state.get_context_parallel_world_size() > 1:  # this rank's chunks, as the step split the tokens
            mask = get_batch_on_this_cp_rank(
                {"loss_mask": mask}, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
            )["loss_mask"]

        def loss(per_token: torch.Tensor):
            sums = (per_token.float() * mask.to(per_token.device)).sum(dim=1)
            return sums.sum(), mask.sum().clamp(min=1).to(torch.int), {"sequence loss": sums.detach()}

        return output, loss

    return step


@torch.no_grad()
def loglikelihoods(trainer: Trainer, samples: list[dict]) -> list[float]:
    """Each sample's log-likelihood of its masked tokens, known on every rank."""
    recipe, layout = trainer.recipe, trainer.layout
    batch, micro = layout.global_batch_size, recipe.train.micro_batch_size
    padded = samples + [blank_sample(recipe.model.seq_length, 0)] * (-len(samples) % batch)
    dp_rank = parallel_state.get_data_parallel_rank()
    data_iterator = trainer.data_iterator(
        lambda: micro_batches(padded, consumed_samples=0, micro_batch_size=micro, dp_rank=dp_rank, dp_size=layout.dp)
    )
    sums = torch.zeros(len(padded), dtype=torch.float64)
    step = _per_sequence_step(trainer.family.forward_step)
    for chunk in trainer.model:
        chunk.eval()
    for first in range(0, len(padded), batch):
        outputs = trainer.run_schedule(data_iterator, layout.num_microbatches, forward_only=True, forward_step=step)
        for index, output in enumerate(outputs):  # the last stage's: micro-batch index of this rank's
            start = first + index * micro * layout.dp + dp_rank * micro  # micro_batches' order
            sums[start : start + micro] = output["sequence loss"].to("cpu", torch.float64)
    for chunk in trainer.model:
        chunk.train()
    sums = sums.to(device())
    torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    torch.distributed.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    return (-sums[: len(samples)]).tolist()


def score(trainer: Trainer, task: Task) -> dict[str, float]:
    """acc and acc_norm of ``task`` (every rank)."""
    return accuracies(task.examples, loglikelihoods(trainer, task.samples))


class TaskEvaluator(Callback):
    """Every ``eval.interval`` steps (and at the last), each task's accuracies, recorded as
    ``task/<name>/acc`` and ``task/<name>/acc_norm``."""

    priority = 40

    def __init__(self, tasks: list[Task]):
        self.tasks = tasks

    def on_step(self, trainer, metrics):
        if evaluation_step(trainer.recipe, trainer.state.iteration):
            for task in self.tasks:
                for name, value in score(trainer, task).items():
                    trainer.record(f"task/{task.name}/{name}", value)
