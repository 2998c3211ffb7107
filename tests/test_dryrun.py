"""The dry-run report spells out the plan and embeds a loadable resolved recipe."""

from pathlib import Path

import pytest

from bigpt.dryrun import describe
from bigpt.errors import BigptError
from bigpt.layout import Layout
from bigpt.recipe import load_recipe

TINY = Path(__file__).resolve().parent.parent / "recipes/tiny.toml"


def tiny_on_mock_data(tmp_path, tokenizer, *overrides):
    """The tiny recipe without its demo data, which a fresh clone has not built."""
    return load_recipe(
        TINY,
        ["data.source=mock", "data.blend=[]", f"data.tokenizer={tokenizer}", f"run_dir={tmp_path / 'run'}", *overrides],
    )


def test_describe_spells_out_the_batch_arithmetic(tmp_path, small_tokenizer):
    recipe = tiny_on_mock_data(tmp_path, small_tokenizer)
    report = describe(recipe, Layout.from_recipe(recipe, 8))
    assert "8 = TP 2 × PP 2 × CP 1 × DP 2" in report
    assert "global 8 = micro 2 × DP 2 × 2 micro-batches" in report
    assert "tokens per step  8 × seq 128 = 1,024" in report
    assert "training tokens  30 steps × 1,024 = 30,720" in report
    assert "[2, 2]" in report and "stage 1" in report and "FLOPs per step" in report


def test_describe_embeds_the_resolved_recipe(tmp_path, small_tokenizer):
    recipe = tiny_on_mock_data(tmp_path, small_tokenizer, "train.rampup_batch_size=[4, 4, 64]")
    report = describe(recipe, Layout.from_recipe(recipe, 4))
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(report.split("# Plan")[0])
    assert load_recipe(resolved) == recipe
    assert "batch ramp-up    from 4 by 4 over 64 samples" in report


def test_describe_plans_the_data(tmp_path, small_tokenizer):
    """Per phase and dataset: share, tokens drawn; a dataset that is not there is refused, as at a real start."""
    recipe = load_recipe(
        TINY,
        [
            f'data.blend=[{{path = "{tmp_path / "missing_text_document"}"}}]',
            f"data.tokenizer={small_tokenizer}",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(BigptError, match=r"data.blend\[0\].path: no indexed dataset at prefix .*missing_text_document"):
        describe(recipe, Layout.from_recipe(recipe, 4))
    mock = tiny_on_mock_data(tmp_path, small_tokenizer)
    assert "data: mock (random tokens), 30.7K tokens" in describe(mock, Layout.from_recipe(mock, 4))


def test_counts_read_with_three_significant_digits():
    from bigpt.numbers import short

    assert [short(n) for n in (999, 30_720, 125_829_120, 8_030_261_248, 70.55e9, 2.5e15)] == [
        "999",
        "30.7K",
        "126M",
        "8.03B",
        "70.5B",
        "2500T",
    ]
