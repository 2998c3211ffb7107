"""[init]: the weights a fresh run starts from (continual pretraining).

Weights only: the optimizer, the learning-rate schedule (so its warmup runs again) and the
counters start fresh at step 0. A Hugging Face directory is first imported, by all ranks
together, into ``<run_dir>/init_from_hf`` (kept, so a later fresh start reuses it); then it loads
like any bigpt checkpoint, resharded to this run's layout.
"""

from pathlib import Path

from bigpt.checkpoint import load_weights, store
from bigpt.hf.config import SHAPE_KEYS, check_recipe_matches, model_from_hf
from bigpt.hf.convert import checkpoint_model, import_hf
from bigpt.hf.files import CONFIG, inspect_hf, read_config
from bigpt.recipe import Recipe

IMPORT_DIR = "init_from_hf"


def initial_weights(recipe: Recipe) -> Path | None:
    """The checkpoint [init] names, importing it from Hugging Face first if need be (collective)."""
    if recipe.init.from_checkpoint:
        return _init_checkpoint(recipe)
    if not recipe.init.from_hf:
        return None
    source = Path(recipe.init.from_hf).resolve()
    check_recipe_matches(recipe.model, model_from_hf(read_config(source), source / CONFIG), source)
    imported = Path(recipe.run_dir) / IMPORT_DIR
    if not (store.is_complete(imported) and store.read_marker(imported).get("imported_from") == str(source)):
        import_hf(source, imported)
    return imported


def check_initial_weights(recipe: Recipe) -> str | None:
    """On paper, for --dry-run: what [init] names exists, is intact and fits the recipe's [model]
    (configs and tensor headers only, no weights read). A line saying so; None: random weights."""
    if recipe.init.from_checkpoint:
        path = _init_checkpoint(recipe)
        check_recipe_matches(recipe.model, vars(checkpoint_model(path)), path, key="init.from_checkpoint",
                             keys=SHAPE_KEYS)
        return f"weights of {path}"
    if recipe.init.from_hf:
        source = Path(recipe.init.from_hf).resolve()
        hf_model, _ = inspect_hf(source)
        check_recipe_matches(recipe.model, hf_model, source)
        return f"weights of {source} (Hugging Face; imported into {Path(recipe.run_dir) / IMPORT_DIR} at the start)"
    return None


def _init_checkpoint(recipe: Recipe) -> Path:
    return store.checkpoint_at(Path(recipe.init.from_checkpoint), "init.from_checkpoint",
                               alternatives="or at the output of tools/convert_hf.py import")


def load_initial_weights(recipe: Recipe, chunks) -> Path | None:
    """Load [init]'s weights into the model chunks; returns where they came from (None: random)."""
    path = initial_weights(recipe)
    if path is not None:
        load_weights(chunks, path, recipe.model.vocab_size)
    return path
