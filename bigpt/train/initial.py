"""[init]: the weights a fresh run starts from (continual pretraining).

Weights only: the optimizer, the learning-rate schedule (so its warmup runs again) and the
counters start fresh at step 0. A Hugging Face directory is first imported, by all ranks
together, into ``<run_dir>/init_from_hf`` (kept, so a later fresh start reuses it); then it loads
like any bigpt checkpoint, resharded to this run's layout. With init.upcycle the weights are a
dense model's: it is built beside the MoE model at the same layout, loaded, and converted by
megatron-core's upcycling (each rank its own experts), then dropped.
"""

import dataclasses
from pathlib import Path

from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

from bigpt.checkpoint import load_weights, store
from bigpt.hf.config import check_recipe_matches, model_from_hf
from bigpt.hf.convert import import_hf
from bigpt.hf.files import CONFIG, inspect_hf, read_config
from bigpt.layout import Layout
from bigpt.model import build_model_chunks
from bigpt.recipe import ModelConfig, Recipe
from bigpt.recipe.tables import MoEConfig
from bigpt.train.preflight import model_changes

IMPORT_DIR = "init_from_hf"


def initial_weights(recipe: Recipe) -> tuple[Path | None, list[str]]:
    """The checkpoint [init] names, importing it from Hugging Face first if need be (collective),
    and the [model] changes from its model that checkpoint.allow_model_changes lets through."""
    if recipe.init.from_checkpoint:
        return _checked_checkpoint(recipe)
    if not recipe.init.from_hf:
        return None, []
    source = Path(recipe.init.from_hf).resolve()
    changes = check_recipe_matches(
        weights_model(recipe),
        model_from_hf(read_config(source), source / CONFIG),
        source,
        allowed=recipe.checkpoint.allow_model_changes,
    )
    imported = Path(recipe.run_dir) / IMPORT_DIR
    if not (store.is_complete(imported) and store.read_marker(imported).get("imported_from") == str(source)):
        import_hf(source, imported)
    return imported, changes


def check_initial_weights(recipe: Recipe) -> str | None:
    """On paper, for --dry-run: what [init] names exists, is intact and computes what the recipe's
    [model] says (configs and tensor headers only, no weights read). A line saying so; None: random
    weights."""
    if recipe.init.from_checkpoint:
        path, changes = _checked_checkpoint(recipe)
        return f"weights of {path}" + _changed(changes)
    if recipe.init.from_hf:
        source = Path(recipe.init.from_hf).resolve()
        hf_model, _ = inspect_hf(source)
        changes = check_recipe_matches(
            weights_model(recipe), hf_model, source, allowed=recipe.checkpoint.allow_model_changes
        )
        return (
            f"weights of {source} (Hugging Face; imported into {Path(recipe.run_dir) / IMPORT_DIR} at the start)"
            + _changed(changes)
        )
    return None


def _changed(changes: list[str]) -> str:
    return f", changed by checkpoint.allow_model_changes: {', '.join(changes)}" if changes else ""


def _checked_checkpoint(recipe: Recipe) -> tuple[Path, list[str]]:
    assert recipe.init.from_checkpoint is not None  # the callers' condition
    path = store.checkpoint_at(
        Path(recipe.init.from_checkpoint),
        "init.from_checkpoint",
        alternatives="or at the output of tools/convert_hf.py import",
    )
    return path, model_changes(recipe, path, "init.from_checkpoint", weights_model(recipe))


def weights_model(recipe: Recipe) -> ModelConfig:
    """The [model] of the weights [init] names: the recipe's, or with init.upcycle its dense form."""
    if not recipe.init.upcycle:
        return recipe.model
    return dataclasses.replace(recipe.model, family="decoder", moe=MoEConfig())


def load_initial_weights(recipe: Recipe, layout: Layout, chunks) -> str | None:
    """Load [init]'s weights into the model chunks (unwrapped, at ``layout``); returns a line
    saying where they came from and what changed (None: random)."""
    path, changes = initial_weights(recipe)
    if path is None:
        return None
    if not recipe.init.upcycle:
        load_weights(chunks, path, recipe.model.vocab_size)
        return f"{path}{_changed(changes)}"
    dense, _ = build_model_chunks(dataclasses.replace(recipe, model=weights_model(recipe)), layout)
    load_weights(dense, path, recipe.model.vocab_size)
    for moe_chunk, dense_chunk in zip(chunks, dense, strict=True):
        # one chunk at a time: megatron-core 0.19's upcycle_state_dict swaps its arguments for several
        moe_chunk.load_state_dict(upcycle_state_dict([moe_chunk], [dense_chunk])["model"])
    return f"{path}{_changed(changes)}, upcycled: every expert from the dense MLP"
