"""Parse → build → train → close: what `launchers/run.py` runs on every rank."""

from functools import partial

import torch.distributed as dist
from megatron.core import parallel_state

from bigpt.checkpoint import load_checkpoint, store
from bigpt.data import build_validation_sets, default_validation_samples, micro_batches
from bigpt.data.datasets import checked_tokenizer
from bigpt.errors import Preempted
from bigpt.families import family_of
from bigpt.layout import Layout, Resumed, train_samples_needed
from bigpt.model import build_model_chunks
from bigpt.recipe import Recipe
from bigpt.runtime import console, preemption
from bigpt.runtime.distributed import destroy_distributed, init_distributed
from bigpt.runtime.seeding import seed_everything
from bigpt.train.callbacks import ConsoleLine, Evaluator, IntervalMeans, TensorBoard, Throughput, ValidationSet
from bigpt.train.checkpointing import Checkpointer, checkpointed
from bigpt.train.initial import load_initial_weights
from bigpt.train.moe_metrics import MoEMetrics
from bigpt.train.optim import (
    apply_recipe_hyperparameters,
    build_optimizer,
    build_scheduler,
    init_batch_calculator,
    wire_model_config,
    wrap_ddp,
)
from bigpt.train.preflight import (
    check_outputs,
    checkpoint_dir,
    resume_changes,
    resume_point,
    resumed_batch_changes,
    resumed_from,
    write_run_recipe,
)
from bigpt.train.tasks import TaskEvaluator, load_tasks
from bigpt.train.trainer import Trainer
from bigpt.train.wandb_logger import WandbLogger


def build_model_and_optimizer(
    recipe: Recipe, layout: Layout, *, initial_weights: bool = True, resumed: Resumed | None = None
):
    """The model chunks (wrapped for data parallelism), optimizer and learning-rate scheduler, on a
    process group that already exists. ``initial_weights``: load [init]'s weights (a resumed run
    skips them: its checkpoint replaces them anyway). ``resumed``: the checkpoint's counters and
    batch settings, which place the schedule's points."""
    seed_everything(recipe.train.seed)
    init_batch_calculator(recipe, layout)
    chunks, config = build_model_chunks(recipe, layout)
    if initial_weights:
        source = load_initial_weights(recipe, layout, chunks)
        if source is not None:
            console.say(f"starting from the weights in {source} (fresh optimizer and schedule, step 0)")
    model = wrap_ddp(recipe, config, chunks)
    optimizer = build_optimizer(recipe, model)
    wire_model_config(config, model, optimizer)
    scheduler = build_scheduler(recipe, optimizer, resumed)
    return model, optimizer, scheduler


def build_trainer(recipe: Recipe, layout: Layout, *, resumed: Resumed | None = None) -> Trainer:
    """Everything a run needs, on a process group that already exists; ``resumed``: the checkpoint
    it resumes from (then no initial weights: the checkpoint's replace them), which places the
    schedule and the data stream."""
    model, optimizer, scheduler = build_model_and_optimizer(
        recipe, layout, initial_weights=resumed is None, resumed=resumed
    )
    train = recipe.train
    train_ds, valid_ds = family_of(recipe.model).build_datasets(
        recipe,
        world_rank=dist.get_rank(),
        train_samples=train_samples_needed(train, recipe.model.seq_length, resumed),
        valid_samples=default_validation_samples(recipe),
    )
    batches = partial(
        micro_batches,
        micro_batch_size=recipe.train.micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=layout.dp,
        num_workers=recipe.data.num_workers,
    )
    experts = [MoEMetrics(recipe.model)] if recipe.model.family == "moe_decoder" else []
    line_fields = experts[0].line_fields if experts else {}
    callbacks = [Throughput(), *experts, IntervalMeans(["loss", *line_fields]), ConsoleLine(line_fields)]
    if recipe.logging.tensorboard:
        callbacks.append(TensorBoard(recipe.run_dir))
    if recipe.logging.wandb.project is not None:
        callbacks.append(WandbLogger())
    if recipe.eval.interval:
        callbacks.append(Evaluator(validation_sets(recipe, valid_ds, batches)))
        if recipe.eval.tasks:
            callbacks.append(TaskEvaluator(load_tasks(recipe, checked_tokenizer(recipe))))
    callbacks.append(Checkpointer(checkpoint_dir(recipe), recipe.checkpoint.async_save))
    return Trainer(
        recipe,
        layout,
        model,
        optimizer,
        scheduler,
        lambda position: batches(train_ds, consumed_samples=position),
        callbacks,
    )


def validation_sets(recipe: Recipe, valid_ds, batches) -> list[ValidationSet]:
    """eval.sets by name, or the validation split of data.blend as "valid". Every evaluation reads
    the same first global batches (full size) of each."""
    if not recipe.eval.sets:
        return (
            []
            if valid_ds is None
            else [ValidationSet("valid", partial(batches, valid_ds, consumed_samples=0), recipe.eval.iters)]
        )
    built = build_validation_sets(recipe, world_rank=dist.get_rank())
    return [
        ValidationSet(
            entry.name, partial(batches, built[entry.name], consumed_samples=0), entry.iters or recipe.eval.iters
        )
        for entry in recipe.eval.sets
    ]


def train(recipe: Recipe, layout: Layout, overwrite: bool = False) -> None:
    """``overwrite``: --overwrite, replace output files bigpt did not write."""
    with preemption.stopping_with_a_checkpoint():
        _train(recipe, layout, overwrite)


def _train(recipe: Recipe, layout: Layout, overwrite: bool) -> None:
    init_distributed(layout)
    lock = None
    try:
        check_outputs(recipe, overwrite)
        resume, model_changes = resume_point(recipe, warn=console.warn)  # reads only: a refused run changes nothing
        if dist.get_rank() == 0:
            lock = store.lock_directory(checkpoint_dir(recipe))
        resumed = resumed_from(recipe, resume) if resume is not None else None
        trainer = build_trainer(recipe, layout, resumed=resumed)
        if resume is not None and resumed is not None:
            load_checkpoint(checkpointed(trainer), resume)
            apply_recipe_hyperparameters(recipe, trainer.optimizer)
            changed = (
                f"; changed by checkpoint.allow_model_changes: {', '.join(model_changes)}" if model_changes else ""
            )
            console.say(
                f"resuming from {resume} (step {trainer.state.iteration}, "
                f"{trainer.state.consumed_samples:,} samples and {trainer.state.consumed_tokens:,} tokens "
                f"consumed{changed})"
            )
            if batch_changes := resumed_batch_changes(recipe, resumed):
                console.say(batch_changes)
            if console.speaks() and (schedule_changes := resume_changes(recipe, resume)):
                console.say(
                    f"the recipe's optimizer and schedule replace the checkpoint's: {'; '.join(schedule_changes)}"
                )
            if trainer.state.iteration >= recipe.train.train_iters:
                console.say(
                    f"training is already complete (train.train_iters = {recipe.train.train_iters}); raise "
                    "train.train_iters to continue, or start over elsewhere: checkpoint.load=none with a new run_dir"
                )
        if dist.get_rank() == 0:
            write_run_recipe(recipe)
        trainer.train()
        if trainer.preempted:
            raise Preempted(
                f"preempted at step {trainer.state.iteration}: checkpoint saved in {checkpoint_dir(recipe)}; "
                "re-run the same command to resume from it"
            )
    finally:
        destroy_distributed()
        if lock is not None:
            lock.close()
