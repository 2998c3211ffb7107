"""The dry-run report spells out the plan and embeds a loadable resolved recipe."""

import subprocess
import sys
from pathlib import Path

import pytest

from bigpt.dryrun import describe
from bigpt.errors import EXIT_USER_ERROR, BigptError
from bigpt.layout import Layout
from bigpt.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes/tiny.toml"
MOCK = ROOT / "tests/recipes/mock_tiny.toml"


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


def test_the_readme_dry_run_shows_the_plan_then_every_problem_on_a_fresh_clone():
    """README's on-paper command, where the Llama-3 tokenizer and data are not there: the whole
    plan first, then every problem (the tokenizer, each dataset of the blend), exit 2."""
    if (ROOT / "data/llama3").exists():
        pytest.skip("data/llama3 exists here: not a fresh clone")
    result = subprocess.run(
        [sys.executable, "launchers/run.py", "recipes/llama_70b.toml", "--dry-run", "--world-size", "512"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == EXIT_USER_ERROR and "Traceback" not in result.stderr, result.stderr
    assert "world size       512 = TP 8 × PP 4 × CP 1 × DP 16" in result.stdout
    assert "FLOPs per step" in result.stdout and "start            fresh at step 0" in result.stdout
    assert "data plan        not known: see the problems below" in result.stdout
    problems = result.stderr.splitlines()
    assert problems[0] == "bigpt: error: 3 problems a start would refuse:", result.stderr
    assert "tokenizer file" in problems[1] and "data/llama3/tokenizer.json does not exist" in problems[1]
    assert "data.blend[0].path: no indexed dataset at prefix" in problems[2] and "web_text_document" in problems[2]
    assert "data.blend[1].path: no indexed dataset at prefix" in problems[3] and "code_text_document" in problems[3]


def test_a_dry_run_collects_every_problem_after_the_plan(tmp_path):
    """Unwritable outputs, a missing tokenizer and a dataset index no machine holds: all listed."""
    recipe = load_recipe(
        MOCK,
        [
            f"run_dir={tmp_path}",
            "checkpoint.dir=/sys/bigpt_checkpoints",
            f"data.tokenizer={tmp_path / 'missing.json'}",
            f"train.train_iters={10**13}",
        ],
    )
    problems: list[str] = []
    report = describe(recipe, Layout.from_recipe(recipe, 1), problems)
    assert "# Plan" in report and "FLOPs per step" in report and "data plan        not known" in report
    assert len(problems) == 3, problems
    assert "checkpoint.dir = /sys/bigpt_checkpoints is not writable" in problems[0]
    assert "missing.json does not exist" in problems[1]
    assert (
        "train.train_iters: 80,000,000,000,000 samples of model.seq_length=64 tokens read megatron-core's mock"
        in (problems[2])
    )
    with pytest.raises(BigptError, match="is not writable"):  # without a list: the first refusal, as a start
        describe(recipe, Layout.from_recipe(recipe, 1))


def test_every_missing_dataset_of_every_phase_is_named(tmp_path, small_tokenizer):
    """Listed one by one by a dry run; said together, in one paragraph, by a start."""
    from bigpt.data.phases import plan_phases

    recipe = load_recipe(
        TINY,
        [
            f'data.blend=[{{path = "{tmp_path / "web"}"}}, {{path = "{tmp_path / "books"}"}}]',
            f'data.phases=[{{start_tokens = 10240, blend = [{{path = "{tmp_path / "anneal"}"}}]}}]',
            f"data.tokenizer={small_tokenizer}",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    problems: list[str] = []
    describe(recipe, Layout.from_recipe(recipe, 4), problems)
    assert [problem.split(":")[0] for problem in problems] == [
        "data.blend[0].path",
        "data.blend[1].path",
        "data.phases[0].blend[0].path",
    ]
    with pytest.raises(BigptError) as info:
        plan_phases(recipe, 240)
    assert "\n" not in str(info.value) and all(problem in str(info.value) for problem in problems)


def test_a_training_length_no_dataset_index_holds_is_refused_before_building_it(tmp_path, small_tokenizer):
    """megatron-core would count the epochs one by one and then build an index of every epoch's
    documents: hours or out of memory before step 1, without a word."""
    from bigpt.data.datasets import build_datasets
    from test_data_support import write_indexed

    prefix = write_indexed(tmp_path / "small_text_document", [[5] * 10] * 10)
    recipe = load_recipe(
        TINY,
        [f'data.blend=[{{path = "{prefix}"}}]', f"data.tokenizer={small_tokenizer}", f"train.train_iters={10**11}"],
    )
    with pytest.raises(
        BigptError,
        match=r"data.blend\[0\].path: .* read the train split of .* times over.*"
        r"more than its int32 epoch counter holds",
    ):
        build_datasets(recipe, world_rank=0, train_samples=8 * 10**11, valid_samples=0)
    mock = load_recipe(MOCK, [f"train.train_iters={10**13}"])
    with pytest.raises(BigptError, match="lower train.train_iters or train on more data"):
        build_datasets(mock, world_rank=0, train_samples=8 * 10**13, valid_samples=0)
    with pytest.raises(BigptError, match="lower eval.iters or train on more data"):
        build_datasets(mock, world_rank=0, train_samples=8, valid_samples=8 * 10**13)


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
