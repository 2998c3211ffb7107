"""[init]: the weights a fresh run starts from (continual pretraining).

Weights only: the optimizer, the learning-rate schedule (so its warmup runs again) and the
counters start fresh at step 0. A Hugging Face directory is first imported, by all ranks
together, into ``<run_dir>/init_from_hf`` (kept, so a later fresh start reuses it); then it loads
like any bigpt checkpoint, resharded to this run's layout.
"""

from pathlib import Path

from bigpt.checkpoint import load_weights, store
from bigpt.hf.config import check_recipe_matches, model_from_hf
from bigpt.hf.convert import import_hf
from bigpt.hf.files import CONFIG, read_config
from bigpt.recipe import Recipe

IMPORT_DIR = "init_from_hf"


def initial_weights(recipe: Recipe) -> Path | None:
    """The checkpoint [init] names, importing it from Hugging Face first if need be (collective)."""
    if recipe.init.from_checkpoint:
        return store.checkpoint_at(Path(recipe.init.from_checkpoint), "init.from_checkpoint",
                                   alternatives="or at the output of tools/convert_hf.py import")
    if not recipe.init.from_hf:
        return None
    source = Path(recipe.init.from_hf).resolve()
    check_recipe_matches(recipe.model, model_from_hf(read_config(source), source / CONFIG), source)
    imported = Path(recipe.run_dir) / IMPORT_DIR
    if not (store.is_complete(imported) and store.read_marker(imported).get("imported_from") == str(source)):
        import_hf(source, imported)
    return imported


def load_initial_weights(recipe: Recipe, chunks) -> Path | None:
    """Load [init]'s weights into the model chunks; returns where they came from (None: random)."""
    path = initial_weights(recipe)
    if path is not None:
        load_weights(chunks, path, recipe.model.vocab_size)
    return path
