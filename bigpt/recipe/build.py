"""Merged TOML dict -> typed ``Recipe``, with one clear error per mistake.

The dataclass annotations are the schema: no second list of keys or types to keep in sync.
Every error names the dotted key and the file (or CLI override) that set it.
"""

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from bigpt.errors import BigptError
from bigpt.recipe.fields import NOT_A_KEY, OUTPUT_PATH, RANGE, RECIPE_PATH
from bigpt.recipe.tables import Recipe


@dataclass(frozen=True)
class Origin:
    """Where a value came from: shown in errors, and the base of its relative paths."""

    label: str
    """A recipe file as the user would type it, or "override 'key=value'"."""
    directory: Path
    """Relative paths set here are resolved against this directory."""


class Origins:
    """Dotted key -> Origin of the layer that set it last (child recipes and overrides win)."""

    def __init__(self, default: Origin):
        self.default = default
        self.by_key: dict[str, Origin] = {}

    def record(self, table: dict, origin: Origin, prefix: str = "") -> None:
        for key, value in table.items():
            self.by_key[prefix + key] = origin
            if isinstance(value, dict):
                self.record(value, origin, f"{prefix}{key}.")

    def of(self, key: str) -> Origin:
        """The origin of key, or of the nearest enclosing key (a list element -> its list)."""
        key = key.split("[")[0]
        while key:
            if key in self.by_key:
                return self.by_key[key]
            key = key.rpartition(".")[0]
        return self.default

    def where(self, text: str) -> str:
        """The layers that set the keys ``text`` names, first named first, as a reader fixes them:
        "override 'train.global_batch_size=12' and recipes/a.toml"; the top recipe file when
        ``text`` names no key a layer set (defaults are changed there)."""
        labels: list[str] = []
        for key in _KEY_NAMED.findall(text):
            origin = self._set_by(key)
            if origin is not None and origin.label not in labels:
                labels.append(origin.label)
        return " and ".join(labels) or self.default.label

    def _set_by(self, key: str) -> Origin | None:
        """The layer that set ``key`` (or the list holding it), not merely its table; None for a default."""
        key = key.split("[")[0]
        while "." in key:
            if key in self.by_key:
                return self.by_key[key]
            key = key.rpartition(".")[0]
        return None


_KEY_NAMED = re.compile(r"\b[a-z_]+(?:\.[a-z_0-9]+|\[\d+\])+")
"""A dotted recipe key in a message: train.global_batch_size, data.phases[1].start_tokens."""


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def build_recipe(merged: dict, origins: Origins, source: str) -> Recipe:
    """Type-check ``merged`` against the Recipe dataclasses and construct it."""
    recipe = build_dataclass(Recipe, merged, origins, source=source)
    recipe.origins = origins
    return recipe


def build_dataclass(cls, merged: dict, origins: Origins, **extra):
    """Type-check ``merged`` against the dataclass ``cls`` (and the dataclasses of its fields)
    and construct it; ``extra`` are its fields that are not TOML keys (``NOT_A_KEY``)."""
    return _build(cls, merged, "", origins, **extra)


def _build(cls, table: dict, prefix: str, origins: Origins, **extra):
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get(NOT_A_KEY)}
    hints = typing.get_type_hints(cls)
    for key in table:
        if key not in fields:
            _unknown(key, table[key], prefix, sorted(fields), origins)
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in table:
            kwargs[name] = _convert(table[name], hints[name], f, key, origins)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _missing(key, prefix, origins)
    return cls(**kwargs, **extra)


def _convert(value, annotation, f, key: str, origins: Origins):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        # None only ever comes from a default: TOML has no null.
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            _wrong_type(key, value, "a table", origins)
        return _build(annotation, value, key + ".", origins)
    if typing.get_origin(annotation) is list:
        if not isinstance(value, list):
            _wrong_type(key, value, "a list", origins)
        (item_type,) = typing.get_args(annotation)
        return [_convert(item, item_type, f, f"{key}[{i}]", origins) for i, item in enumerate(value)]
    if typing.get_origin(annotation) is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            choices = ", ".join(repr(choice) for choice in allowed)
            raise BigptError(f"{key} must be one of {choices}, got {value!r} in {origins.of(key).label}.")
        return value
    value = _scalar(value, annotation, key, origins)
    if RANGE in f.metadata:
        predicate, wording = f.metadata[RANGE]
        if not predicate(value):
            raise BigptError(f"{key} must be {wording}, got {value!r} in {origins.of(key).label}.")
    if RECIPE_PATH in f.metadata and value not in f.metadata[RECIPE_PATH]:
        value = os.path.normpath(origins.of(key).directory / os.path.expanduser(value))
    if OUTPUT_PATH in f.metadata:
        value = os.path.expanduser(value)
    return value


def _scalar(value, annotation, key: str, origins: Origins):
    # bool is a subclass of int in Python, but `true` is never a sensible layer count.
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not annotation:
        _wrong_type(key, value, _EXPECTED[annotation], origins)
    if annotation is float and not math.isfinite(value):  # TOML spells them inf and nan
        raise BigptError(f"{key} must be a finite number, got {value!r} in {origins.of(key).label}.")
    return value


def _wrong_type(key: str, value, expected: str, origins: Origins):
    raise BigptError(f"{key} must be {expected}, got {value!r} ({type(value).__name__}) in {origins.of(key).label}.")


def _unknown(name: str, value, prefix: str, known: list[str], origins: Origins):
    key = prefix + name
    is_table = isinstance(value, dict)
    spell = (lambda key: f"[{key}]") if is_table else (lambda key: key)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {spell(prefix + close[0])}?" if close else f"known keys here: {', '.join(known)}."
    raise BigptError(f"unknown {'table' if is_table else 'key'} {spell(key)} in {origins.of(key).label}; {hint}")


def _missing(key: str, prefix: str, origins: Origins):
    where = f"the [{prefix.rstrip('.')}] table" if prefix else "the top level"
    raise BigptError(
        f"missing required key {key}: set it in {where} of {origins.default.label} "
        f"(or of a base recipe it inherits from)."
    )
