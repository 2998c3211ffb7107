"""The dry-run report spells out the plan and embeds a loadable resolved recipe."""

from pathlib import Path

from bigpt.dryrun import describe
from bigpt.layout import Layout
from bigpt.recipe import load_recipe

TINY = Path(__file__).resolve().parent.parent / "recipes/tiny.toml"


def test_describe_spells_out_the_batch_arithmetic():
    recipe = load_recipe(TINY)
    report = describe(recipe, Layout.from_recipe(recipe, 8))
    assert "8 = TP 2 × PP 2 × CP 1 × DP 2" in report
    assert "global 8 = micro 2 × DP 2 × 2 micro-batches" in report
    assert "tokens per step  8 × seq 128 = 1,024" in report
    assert "training tokens  30 steps × 1,024 = 30,720" in report
    assert "[2, 2]" in report and "stage 1" in report and "FLOPs per step" in report


def test_describe_embeds_the_resolved_recipe(tmp_path):
    recipe = load_recipe(TINY, ["train.rampup_batch_size=[4, 4, 64]"])
    report = describe(recipe, Layout.from_recipe(recipe, 4))
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(report.split("# Plan")[0])
    assert load_recipe(resolved) == recipe
    assert "batch ramp-up    from 4 by 4 over 64 samples" in report


def test_describe_plans_the_data(tmp_path):
    """Per phase and dataset: share, tokens drawn; datasets not built yet are named, not fatal."""
    recipe = load_recipe(TINY, [f"data.blend=[{{path = \"{tmp_path / 'missing_text_document'}\"}}]"])
    report = describe(recipe, Layout.from_recipe(recipe, 4))
    plan = report.split("data plan\n")[1]
    assert "data.blend" in plan and "missing_text_document" in plan and "not found" in plan
    assert "100.0%" in plan and "30.7K" in plan
    mock = load_recipe(TINY, ["data.source=mock"])
    assert "data: mock (random tokens), 30.7K tokens" in describe(mock, Layout.from_recipe(mock, 4))
