"""Read a recipe: its ``base`` chain, CLI overrides, and the merge of all of them.

Precedence, lowest first: dataclass defaults < the oldest base < ... < the recipe < overrides.
Tables merge key by key; any other value (lists included) is replaced whole.
"""

import os
import tomllib
from collections.abc import Iterable
from pathlib import Path

from bigpt.errors import BigptError
from bigpt.paths import not_a_file
from bigpt.recipe.build import Origin, Origins, build_recipe
from bigpt.recipe.checks import check_recipe
from bigpt.recipe.tables import Recipe


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Load, merge, type-check and cross-check a recipe; raises BigptError on any mistake."""
    merged, origins = merge_layers(path, overrides)
    recipe = build_recipe(merged, origins, source=str(path))
    check_recipe(recipe)
    return recipe


def merge_layers(path: str | os.PathLike, overrides: Iterable[str] = ()) -> tuple[dict, Origins]:
    """The merged TOML of ``path``, its base chain and ``overrides``, and where each key came from.

    Any TOML schema builds on this (training recipes, curation recipes): pass the result to
    ``build.build_dataclass`` with the schema's root dataclass.
    """
    layers = _read_chain(Path(path), chain=())
    origins = Origins(default=layers[-1][1])
    layers += [(_parse_override(text), Origin(f"override '{text}'", Path.cwd())) for text in overrides]
    merged: dict = {}
    for table, origin in layers:
        origins.record(table, origin)
        merged = _deep_merge(merged, table)
    return merged, origins


def _read_chain(path: Path, chain: tuple[Path, ...]) -> list[tuple[dict, Origin]]:
    """[(table, origin)] from the root base down to ``path``; ``chain`` are the files below it."""
    resolved = path.resolve()
    origin = Origin(_display(path), resolved.parent)
    if resolved in chain:
        cycle = " -> ".join(_display(p) for p in (*chain, resolved))
        raise BigptError(f"recipe inheritance cycle: {cycle}; remove one of these base keys.")
    if why := not_a_file(resolved):
        if chain:
            raise BigptError(
                f"base recipe {_display(path)} {why} (named by base in {_display(chain[-1])}); "
                f"base paths are relative to the file that names them."
            )
        raise BigptError(f"recipe file {_display(path)} {why}; check the path.")
    try:
        table = tomllib.loads(resolved.read_text())
    except tomllib.TOMLDecodeError as err:
        raise BigptError(f"{origin.label} is not valid TOML: {err}. Fix the syntax there.") from None
    base = table.pop("base", None)
    if base is None:
        return [(table, origin)]
    if not isinstance(base, str):
        raise BigptError(f"base must be a string (a path to another recipe), got {base!r} in {origin.label}.")
    return _read_chain(resolved.parent / os.path.expanduser(base), (*chain, resolved)) + [(table, origin)]


def _parse_override(text: str) -> dict:
    """'a.b=value' -> {"a": {"b": value}}; value is TOML when it parses, else a bare string."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise BigptError(f"override {text!r} is not of the form table.key=value (e.g. parallel.tensor=4).")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw  # model.activation=gelu: save users from shell-quoting TOML strings
    for part in reversed(parts):
        value = {part.strip(): value}
    return value


def _deep_merge(base: dict, child: dict) -> dict:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _display(path: Path) -> str:
    """The path relative to the working directory when it is below it, else absolute."""
    absolute = path.resolve()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)
