"""The documentation that is generated stays in step with its source."""

from tools.recipe_reference import DOCS, references


def test_recipe_references_in_docs_are_current():
    """docs/*-reference.md are what tools/recipe_reference.py writes from the dataclasses' docstrings."""
    stale = [
        name for name, text in references().items() if not (DOCS / name).is_file() or (DOCS / name).read_text() != text
    ]
    assert not stale, f"{', '.join(stale)} in docs/ are stale: run python tools/recipe_reference.py"


def test_every_recipe_key_has_a_docstring():
    """A key without one would be an empty row of the reference."""
    missing = [
        line.split("|")[1].strip()
        for text in references().values()
        for line in text.splitlines()
        if line.startswith("| `") and line.rstrip().endswith("|  |")
    ]
    assert not missing, f"recipe keys without a docstring under their field: {missing}"
