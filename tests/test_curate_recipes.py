"""Every shipped curation recipe (recipes/data/*.toml) loads and names registered stages; the
curation schema reuses the training loader (base chains, overrides, strict keys)."""

from pathlib import Path

import pytest

from bigpt.curate import load_curation_recipe
from bigpt.curate.recipe import STAGE_NAMES

ROOT = Path(__file__).resolve().parent.parent
CURATION_RECIPES = sorted((ROOT / "recipes/data").glob("*.toml"))


@pytest.mark.parametrize("path", CURATION_RECIPES, ids=lambda p: p.name)
def test_shipped_curation_recipe_loads(path):
    recipe = load_curation_recipe(path)
    assert recipe.stages and set(recipe.stages) <= set(STAGE_NAMES)
    assert Path(recipe.input.path).is_absolute()  # resolved against the recipe file


def test_child_recipe_inherits_and_overrides_win():
    recipe = load_curation_recipe(
        ROOT / "recipes/data/astronomy.toml", ["stage.gopher_quality.min_doc_words=30", "executor.workers=4"]
    )
    assert recipe.stage.gopher_quality.min_doc_words == 30  # override over the base's 50
    assert recipe.stage.keywords.min_hits == 2  # the child's own table
    assert recipe.stage.minhash_dedup.num_buckets == 16  # inherited from web_quality.toml
    assert (recipe.executor.workers, recipe.name) == (4, "astronomy")


def test_registry_has_exactly_the_schema_stages():
    pytest.importorskip("datatrove", reason="the curation extra is not installed")
    from bigpt.curate.stages import STAGES

    assert tuple(STAGES) == STAGE_NAMES
