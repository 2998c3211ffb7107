"""Write the recipe references in docs/ from the recipe dataclasses' docstrings:
docs/recipe-reference.md (training recipes, bigpt/recipe/tables.py) and
docs/curation-reference.md (curation recipes, bigpt/curate/recipe.py).

    python tools/recipe_reference.py

tests/test_docs.py fails when either file differs from what this writes: edit the docstring
under a field, then re-run this.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import Parser  # noqa: E402
from bigpt.curate.recipe import CurationRecipe  # noqa: E402
from bigpt.recipe import Recipe  # noqa: E402
from bigpt.recipe.reference import reference_markdown  # noqa: E402
from bigpt.runtime import console  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"

REFERENCES = {
    "recipe-reference.md": (
        Recipe,
        "Training recipe reference",
        "Every key of a training recipe (`launchers/run.py RECIPE`), by TOML table. "
        "Precedence: command-line overrides > the recipe > its `base` chain > these defaults.",
    ),
    "curation-reference.md": (
        CurationRecipe,
        "Curation recipe reference",
        "Every key of a curation recipe (`tools/curate.py RECIPE`), by TOML table; "
        "only the stages named in `stages` run.",
    ),
}
"""File name in docs/ -> (recipe dataclass, title, introduction)."""


def references() -> dict[str, str]:
    return {name: reference_markdown(*spec) for name, spec in REFERENCES.items()}


parser = Parser(__doc__)

if __name__ == "__main__":
    parser.parse_args()
    for name, text in references().items():
        (DOCS / name).write_text(text)
        console.say(str(DOCS / name))
