"""A real-text demo corpus from what every Python installation carries: the standard library's
docstrings. Offline, a few MB, a couple of seconds, and the same for the same Python.

One document per module (its docstring and its functions'), one per class (with its
methods') and one per topic of the interactive help (``pydoc_data.topics``: the language
reference in prose), in sorted order.
"""

import importlib
import inspect
import json
import pkgutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from bigpt.paths import write_atomically

# Modules that act when imported (open a browser, print, start a GUI), test suites, and the
# help topics (read as text below) and codec tables (boilerplate).
_SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "encodings",
}


def write_demo_corpus(out_dir, name: str = "demo.jsonl") -> tuple[Path, int, int]:
    """Write ``out_dir/name``; return (path, documents, bytes)."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    documents = 0

    def write(stream) -> None:
        nonlocal documents
        for source, text in stdlib_documents():
            stream.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
            documents += 1

    write_atomically(path, write, key="--out")
    return path, documents, path.stat().st_size


def stdlib_documents() -> Iterator[tuple[str, str]]:
    """(dotted name, text) for every documented public module and class of the stdlib."""
    seen: set[int] = set()  # objects re-exported by several modules are written once
    for module in _stdlib_modules():
        functions = []
        for name, member in _public_members(module):
            if id(member) in seen or not _defined_in(member, module):
                continue
            seen.add(id(member))
            if inspect.isclass(member):
                text = _class_text(f"{module.__name__}.{name}", member)
                if text:
                    yield f"{module.__name__}.{name}", text
            elif callable(member) and inspect.getdoc(member):
                functions.append(_callable_text(f"{module.__name__}.{name}", member))
        doc = _own_doc(module)
        if doc or functions:
            parts = [f"Module {module.__name__}", doc, *functions]
            yield module.__name__, "\n\n".join(parts).strip()
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        yield f"pydoc_data.topics.{topic}", topics[topic].strip()


def _stdlib_modules():
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in _SKIP:
            continue
        module = _quiet_import(top)
        if module is None:
            continue
        yield module
        if hasattr(module, "__path__"):
            subnames = sorted(
                info.name for info in pkgutil.walk_packages(module.__path__, f"{top}.", onerror=lambda _: None)
            )
            for subname in subnames:
                parts = subname.split(".")
                if any(part.startswith("_") or part in ("test", "tests") for part in parts):
                    continue  # also skips __main__ modules, which run when imported
                submodule = _quiet_import(subname)
                if submodule is not None:
                    yield submodule


def _quiet_import(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # platform-specific or optional modules
            return None


def _public_members(obj):
    try:
        members = inspect.getmembers(obj)
    except Exception:  # a few modules have attributes that raise on access
        return []
    return [(name, member) for name, member in members if not name.startswith("_")]


def _defined_in(member, module) -> bool:
    """Defined by the module itself or by its private C/Python helper (``_io`` for ``io``)."""
    home = getattr(member, "__module__", None)
    return isinstance(home, str) and (home == module.__name__ or home.lstrip("_") == module.__name__.rsplit(".", 1)[-1])


def _own_doc(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


class _Elided:
    def __repr__(self):
        return "..."


def _signature(obj) -> str:
    """The call signature, with defaults other than plain numbers, booleans and None elided:
    their reprs can hold this machine's state (``os.environ``, object addresses)."""
    try:
        signature = inspect.signature(obj)
    except Exception:  # C functions whose text signature names things that do not exist here
        return "(...)"
    plain = (type(None), bool, int, float)
    parameters = [
        parameter
        if parameter.default is parameter.empty or type(parameter.default) in plain
        else parameter.replace(default=_Elided())
        for parameter in signature.parameters.values()
    ]
    return str(signature.replace(parameters=parameters))


def _callable_text(name: str, obj) -> str:
    return f"{name}{_signature(obj)}\n{_own_doc(obj)}"


def _class_text(name: str, cls) -> str:
    doc = _own_doc(cls)
    methods = [
        _callable_text(method_name, method)
        for method_name, method in _public_members(cls)
        if callable(method) and method_name in vars(cls) and _own_doc(method)
    ]
    if not doc and not methods:
        return ""
    return "\n\n".join([f"class {name}{_signature(cls)}", doc, *methods]).strip()
