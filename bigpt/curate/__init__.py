"""Data curation before tokenization: a TOML recipe of Hugging Face datatrove stages.

    recipe = load_curation_recipe("recipes/data/web_quality.toml", ["executor.workers=4"])
    summary = curate(recipe)

``recipe.py`` is the schema (no datatrove import, so a recipe can be checked without it),
``stages.py`` maps stage names to datatrove blocks, ``plan.py`` turns the ordered stages into
executor jobs, ``audit.py`` counts what each stage keeps and drops, ``report.py`` writes the
JSON and PNG report. Only this package imports datatrove: the trainer install stays lean.
"""

from bigpt.curate.recipe import CurationRecipe, load_curation_recipe

__all__ = ["CurationRecipe", "load_curation_recipe"]
