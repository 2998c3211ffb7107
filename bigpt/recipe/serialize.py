"""Recipe -> plain dict / TOML text: the fully resolved recipe, loadable as is.

A tiny writer for the few value kinds recipes use (scalars, lists, lists of tables), so no
TOML-writing dependency is needed. None means "unset" and is omitted, as TOML has no null.
"""

import dataclasses

from bigpt.recipe.fields import NOT_A_KEY
from bigpt.recipe.tables import Recipe


def recipe_to_dict(recipe) -> dict:
    """Nested dict of TOML keys (no ``source``, no None values) of a recipe dataclass (training or curation)."""
    return _to_dict(recipe)


def recipe_to_toml(recipe: Recipe) -> str:
    """TOML text that ``load_recipe`` reads back to an equal Recipe (no ``base``: all resolved)."""
    top = recipe_to_dict(recipe)
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items() if not isinstance(value, dict)]
    for name, table in top.items():
        if isinstance(table, dict) and table:  # a table left all-None (e.g. [init]) is omitted
            lines += ["", table_to_toml(name, table)]
    return "\n".join(lines) + "\n"


def table_to_toml(name: str, table: dict) -> str:
    """One ``[name]`` table of plain values (None values omitted)."""
    return "\n".join(
        [f"[{name}]"] + [f"{key} = {toml_value(value)}" for key, value in table.items() if value is not None]
    )


def _to_dict(obj) -> dict:
    return {
        f.name: _plain(getattr(obj, f.name))
        for f in dataclasses.fields(obj)
        if not f.metadata.get(NOT_A_KEY) and getattr(obj, f.name) is not None
    }


def _plain(value):
    if dataclasses.is_dataclass(value):
        return _to_dict(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def toml_value(value) -> str:
    """One value as TOML writes it (a string quoted and escaped, a bool lower-case, a table inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # Python's float reprs (1e-05, inf, nan) are valid TOML floats
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        return "[\n" + "".join(f"    {toml_value(item)},\n" for item in value) + "]"  # a table a line
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def _string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # TOML forbids raw control characters
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'
