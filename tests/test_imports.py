"""Imports between bigpt's packages go one way (the layers in bigpt/__init__.py), and form no cycle."""

import ast
from pathlib import Path

BIGPT = Path(__file__).resolve().parent.parent / "bigpt"
LAYERS = [  # lowest first; a unit is a subpackage or a top-level module of bigpt
    {"bigpt", "errors", "paths", "numbers", "cli"},
    {"recipe"},
    {"layout", "flops", "memory", "plan", "scaling"},
    {"runtime"},
    {"model", "data", "checkpoint", "hf", "families"},
    {"train", "curate"},
    {"dryrun", "logits", "ladder"},
]
LAYER = {unit: number for number, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "bigpt"


def bigpt_imports() -> set[tuple[str, str]]:
    """(importing module, imported module) for every import of bigpt inside bigpt, function-level ones too."""
    edges = set()
    for path in BIGPT.rglob("*.py"):
        parts = path.relative_to(BIGPT.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            edges.update((module, name) for name in names if name.split(".")[0] in ("bigpt", "launchers", "tools"))
    return edges


def test_every_unit_has_a_layer():
    units = {
        path.stem if path.is_file() else path.name
        for path in BIGPT.iterdir()
        if path.suffix == ".py" or (path / "__init__.py").exists()
    }
    assert units - {"__init__"} | {"bigpt"} == set(LAYER)


def test_imports_go_down_the_layers_without_cycles():
    edges = bigpt_imports()
    assert not {target for _, target in edges if not target.startswith("bigpt")}, "bigpt imports launchers/ or tools/"
    upward = sorted(
        f"{source} -> {target}" for source, target in edges if LAYER[unit_of(target)] > LAYER[unit_of(source)]
    )
    assert not upward, f"imports up the layers of bigpt/__init__.py: {upward}"
    graph = {}
    for source, target in edges:
        if unit_of(source) != unit_of(target):
            graph.setdefault(unit_of(source), set()).add(unit_of(target))

    def cycle_from(unit, path):
        if unit in path:
            return path[path.index(unit) :] + [unit]
        return next((found for after in graph.get(unit, ()) if (found := cycle_from(after, path + [unit]))), None)

    cycles = [cycle for unit in graph if (cycle := cycle_from(unit, []))]
    assert not cycles, f"an import cycle between bigpt's packages: {' -> '.join(cycles[0])}"
