"""What a start checks before step 1 that needs no process group, so that nothing is found only
after hours of training; ``--dry-run`` runs the same checks. Every output place can be written,
no file the run would replace is one bigpt did not write (unless --overwrite), the checkpoint to
resume from exists and computes what the recipe's [model] says, and the checkpoint directory holds
no checkpoints this run did not write."""

import os
import tomllib
from dataclasses import replace
from pathlib import Path

from bigpt.checkpoint import store
from bigpt.errors import BigptError
from bigpt.hf.config import check_recipe_matches
from bigpt.hf.convert import checkpoint_model
from bigpt.layout import Resumed, data_position, samples_by_step
from bigpt.paths import WRITTEN_BY, check_replaceable, check_writable, write_atomically, written_by_bigpt
from bigpt.recipe import ModelConfig, Recipe, load_recipe, recipe_to_dict, recipe_to_toml


def checkpoint_dir(recipe: Recipe) -> Path:
    return Path(recipe.checkpoint.dir or os.path.join(recipe.run_dir, "checkpoints"))


def output_places(recipe: Recipe) -> dict[str, Path]:
    """Recipe key -> a directory the run writes into."""
    places = {"run_dir": Path(recipe.run_dir), "checkpoint.dir": checkpoint_dir(recipe)}
    if recipe.data.source == "indexed":
        places["data.cache_dir"] = Path(recipe.data.cache_dir or os.path.join(recipe.run_dir, "data_cache"))
    return places


RUN_RECIPE = "recipe.toml"  # in run_dir: the resolved recipe the run ran with
TENSORBOARD = "tensorboard"  # in run_dir: TensorBoard's event files (new names, never replaced)


def check_outputs(recipe: Recipe, overwrite: bool = False) -> None:
    """Every output place can be written, and the files the run replaces there are bigpt's own
    (or ``overwrite``, --overwrite): a run_dir that is the recipe's own folder must not have the
    recipe written over."""
    for key, path in output_places(recipe).items():
        check_writable(path, key)
    run_dir = Path(recipe.run_dir)
    check_replaceable(run_dir / RUN_RECIPE, "run_dir", overwrite, ours=_run_recipe_is_ours)
    check_replaceable(checkpoint_dir(recipe) / store.LATEST, "checkpoint.dir", overwrite, ours=store.written_latest)
    tensorboard = run_dir / TENSORBOARD
    if recipe.logging.tensorboard and os.path.lexists(tensorboard) and not tensorboard.is_dir():
        raise BigptError(
            f"run_dir: {tensorboard} exists and is not a directory, so TensorBoard cannot write its event "
            "files there; move it away, choose another run_dir, or set logging.tensorboard = false."
        )


def _run_recipe_is_ours(path: Path) -> bool:
    """A run's recipe.toml bigpt wrote: marked as bigpt's, or, from before the mark, a resolved
    recipe exactly as bigpt writes one (a recipe of the user's has a base line, comments or keys
    left at their defaults, so it never reads back the same)."""
    if written_by_bigpt(path):
        return True
    try:
        return recipe_to_toml(load_recipe(path)) == path.read_text(encoding="utf-8")
    except (BigptError, OSError, UnicodeDecodeError):
        return False


def write_run_recipe(recipe: Recipe) -> None:
    """``run_dir/recipe.toml``: the resolved recipe, marked as bigpt's so that a resume replaces it."""
    os.makedirs(recipe.run_dir, exist_ok=True)
    header = f"{WRITTEN_BY}: the resolved recipe this run ran with (a resume rewrites this file)\n"
    write_atomically(Path(recipe.run_dir, RUN_RECIPE), header + recipe_to_toml(recipe), key="run_dir's recipe.toml")


def resume_point(recipe: Recipe, warn=lambda message: None) -> tuple[Path | None, list[str]]:
    """The checkpoint this run resumes from (None: a fresh start), after checking that it computes
    what [model] says and that checkpoint.dir holds only this run's history; and the [model]
    changes checkpoint.allow_model_changes lets through."""
    root = checkpoint_dir(recipe)
    resume = store.resolve_resume(recipe.checkpoint.load, str(root), warn)
    store.check_only_own_checkpoints(root, resume)
    if resume is None:
        return None, []
    changes = model_changes(recipe, resume, "checkpoint.load")
    return resume, changes


def model_changes(recipe: Recipe, checkpoint: Path, key: str, model: ModelConfig | None = None) -> list[str]:
    """The model ``checkpoint`` was saved with against the recipe's (or ``model``; ``key``: the
    recipe key that named it). A difference is refused unless checkpoint.allow_model_changes
    allows it; returns the allowed ones, worded for the log."""
    return check_recipe_matches(
        model or recipe.model,
        vars(checkpoint_model(checkpoint)),
        checkpoint,
        key=key,
        allowed=recipe.checkpoint.allow_model_changes,
    )


# What a resume takes from the recipe although the checkpoint saved its own: the optimizer's
# hyperparameters and the learning-rate schedule (and so the run's length). The checkpoint keeps
# the position: step, samples consumed, optimizer moments.
RECIPE_WINS_ON_RESUME = ("optimizer", "schedule", "train.train_iters", "train.clip_grad")


def resume_changes(recipe: Recipe, resume: Path) -> list[str]:
    """The keys of RECIPE_WINS_ON_RESUME that differ from the recipe the checkpoint was saved with,
    worded for the log ("schedule.decay_iters 80 -> 160")."""
    path = resume / "recipe.toml"
    saved = tomllib.loads(path.read_text()) if path.is_file() else {}
    ours = recipe_to_dict(recipe)
    changes = []
    for name in RECIPE_WINS_ON_RESUME:
        table, _, key = name.partition(".")
        mine, theirs = ours.get(table, {}), saved.get(table, {})
        for item in [key] if key else sorted(set(mine) | set(theirs)):
            if mine.get(item) != theirs.get(item):
                changes.append(f"{table}.{item} {theirs.get(item, 'unset')} -> {mine.get(item, 'unset')}")
    return changes


def resumed_from(recipe: Recipe, checkpoint: Path) -> Resumed:
    """The counters of ``checkpoint`` and the batch settings and sequence length it was saved with."""
    saved = store.saved_progress(checkpoint, recipe.model.seq_length)
    train = saved["train"]
    return Resumed(
        iteration=saved["iteration"],
        consumed_samples=saved["consumed_samples"],
        consumed_tokens=saved["consumed_tokens"],
        seq_length=saved["seq_length"],
        train=replace(
            recipe.train,
            global_batch_size=train.get("global_batch_size", recipe.train.global_batch_size),
            rampup_batch_size=train.get("rampup_batch_size"),
        ),
    )


def resumed_batch_changes(recipe: Recipe, resumed: Resumed) -> str:
    """What a resume with another batch size, ramp-up or sequence length than its checkpoint's does
    (worded for the log; empty when none changed). Nothing is refused: the counters are kept in
    samples and tokens, so every point the recipe names stays where it says."""
    before, now = resumed.train, recipe.train
    changes = [
        f"{key} {old} -> {new}"
        for key, old, new in (
            ("train.global_batch_size", before.global_batch_size, now.global_batch_size),
            ("train.rampup_batch_size", before.rampup_batch_size, now.rampup_batch_size),
            ("model.seq_length", resumed.seq_length, recipe.model.seq_length),
        )
        if old != new
    ]
    if not changes:
        return ""
    seq_length = recipe.model.seq_length
    position = data_position(resumed.consumed_tokens, seq_length)
    remaining = max(now.train_iters - resumed.iteration, 0)
    stream = (
        f"the training data is cut into {seq_length}-token samples now, so it continues after the tokens "
        "consumed, not at the same documents (some text is read again or skipped); "
        if seq_length != resumed.seq_length
        else ""
    )
    phases = ", data phases at their data.phases[].start_tokens" if recipe.data.phases else ""
    return (
        f"resuming with {'; '.join(changes)} since the checkpoint: its counters stay true "
        f"({resumed.consumed_samples:,} samples and {resumed.consumed_tokens:,} tokens consumed by step "
        f"{resumed.iteration}); {stream}the {remaining} step{'s' * (remaining != 1)} left read "
        f"{samples_by_step(now, remaining, resumed.consumed_samples):,} samples from sample {position:,} of the "
        f"training stream on. The schedule's points stay at their steps{phases} (between points the lr "
        "follows the new batches' share of the samples left, so it may step at this resume)."
    )
