"""Every shipped recipe loads, validates at its intended world size, and round-trips as TOML.

The intended world size is read from the recipe's own `# intended world size: N` comment, so
that comment cannot go stale.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bigpt.layout import Layout
from bigpt.recipe import load_recipe, recipe_to_toml

ROOT = Path(__file__).resolve().parent.parent
# recipes/data/ holds curation recipes (their own schema, tests/test_curate_recipes.py).
RECIPES = sorted(
    p
    for p in (ROOT / "recipes").rglob("*.toml")
    if not {"base", "data"} & set(p.relative_to(ROOT / "recipes").parent.parts)
)
WORLD_SIZE_COMMENT = re.compile(r"^# intended world size: (\d+)", re.MULTILINE)


def intended_world_size(path: Path) -> int:
    match = WORLD_SIZE_COMMENT.search(path.read_text())
    assert match, f"{path} needs a '# intended world size: N' comment"
    return int(match.group(1))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_validates_at_its_intended_world_size(path):
    world_size = intended_world_size(path)
    layout = Layout.from_recipe(load_recipe(path), world_size)
    assert layout.world_size == world_size


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_round_trips_through_toml(path, tmp_path):
    recipe = load_recipe(path)
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(recipe_to_toml(recipe))
    assert load_recipe(resolved) == recipe


def test_shipped_recipes_found():
    names = {p.name for p in RECIPES}
    assert {"llama_70b.toml", "llama3_8b.toml", "llama3_1b.toml", "tiny.toml"} <= names


def test_llama_70b_layout():
    layout = Layout.from_recipe(load_recipe(ROOT / "recipes/llama_70b.toml"), 512)
    assert (layout.tp, layout.pp, layout.vpp, layout.dp) == (8, 4, 5, 16)
    assert layout.layers_per_stage == (20, 20, 20, 20)
    assert layout.num_microbatches == 64


def test_dry_run_cli_prints_the_plan(tmp_path, small_tokenizer):
    """On a machine without the recipe's data (a real start would refuse it, so would the dry run)."""
    result = subprocess.run(
        [
            sys.executable,
            "launchers/run.py",
            "recipes/llama_70b.toml",
            "--dry-run",
            "--world-size",
            "512",
            "data.source=mock",
            "data.blend=[]",
            f"data.tokenizer={small_tokenizer}",
            f"run_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "512 = TP 8 × PP 4 × CP 1 × DP 16" in result.stdout
    assert "global 1024 = micro 1 × DP 16 × 64 micro-batches" in result.stdout
