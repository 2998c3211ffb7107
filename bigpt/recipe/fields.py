"""Field markers for recipe dataclasses: value ranges and recipe-relative paths.

They only attach ``dataclasses.field`` metadata; the loader (``build.py``) reads it, so the
tables themselves stay plain dataclasses that can also be constructed in code.
"""

from dataclasses import MISSING, field

RANGE = "bigpt_range"
"""Metadata key: ``(predicate, wording)``; the loader rejects values failing the predicate."""

RECIPE_PATH = "bigpt_recipe_path"
"""Metadata key: keywords that are not paths; any other string is resolved against the
directory of the recipe file that set it (the working directory for CLI overrides)."""

OUTPUT_PATH = "bigpt_output_path"
"""Metadata key: a directory this program writes, relative to the working directory (``~`` is
the user's home, as in a shell)."""

NOT_A_KEY = "bigpt_not_a_key"
"""Metadata key: the field is filled by the loader, never read from TOML."""


def _ranged(default, predicate, wording):
    return field(default=default, metadata={RANGE: (predicate, wording)})


def positive(default=MISSING):
    """A number that must be > 0 (None passes when it is the default)."""
    return _ranged(default, lambda value: value > 0, "positive")


def non_negative(default=MISSING):
    """A number that must be >= 0."""
    return _ranged(default, lambda value: value >= 0, "zero or more")


def fraction(default=MISSING):
    """A probability-like number in [0, 1]."""
    return _ranged(default, lambda value: 0 <= value <= 1, "between 0 and 1")


def percentile(default=MISSING):
    """A percentile in [0, 100]."""
    return _ranged(default, lambda value: 0 <= value <= 100, "between 0 and 100")


def recipe_path(default=None, keywords=()):
    """A file or directory named relative to the recipe file that sets it."""
    return field(default=default, metadata={RECIPE_PATH: tuple(keywords)})


def output_path(default=MISSING):
    """A directory the program writes, named relative to the working directory it runs in."""
    return field(default=default, metadata={OUTPUT_PATH: True})
