"""What a start refuses before step 1, seen through `launchers/run.py --dry-run` (one process, no
process group): unwritable outputs, checkpoints of another run, a checkpoint to resume from that
is missing or computes something else, FP8 without Transformer Engine. The user's files are left
byte-identical."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bigpt.checkpoint import store
from bigpt.errors import EXIT_USER_ERROR, BigptError
from bigpt.layout import Layout
from bigpt.paths import check_writable
from bigpt.recipe import load_recipe, recipe_to_toml

ROOT = Path(__file__).resolve().parent.parent
MOCK = ROOT / "tests/recipes/mock_tiny.toml"


def dry_run(*overrides, ok=False) -> str:
    """The --dry-run report, or the one-paragraph error it ends with (in-process: a CLI start costs
    seconds of imports, and test_cli_dry_run_reports_a_refusal_without_a_traceback covers the CLI)."""
    from bigpt.dryrun import describe

    try:
        recipe = load_recipe(MOCK, list(overrides))
        report = describe(recipe, Layout.from_recipe(recipe, 1))
    except BigptError as err:
        assert not ok, str(err)
        assert "\n" not in str(err)
        return str(err)
    assert ok, report
    return report


def test_cli_dry_run_reports_a_refusal_without_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "launchers/run.py",
            str(MOCK),
            f"run_dir={tmp_path}",
            "checkpoint.dir=/sys/bigpt_checkpoints",
            "--dry-run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == EXIT_USER_ERROR and "Traceback" not in result.stderr
    assert "bigpt: error: checkpoint.dir = /sys/bigpt_checkpoints is not writable" in result.stderr


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def saved_run(root: Path, *iterations: int, overrides=()) -> Path:
    """A finished run's checkpoint directory as a save leaves it (recipe.toml, marker, shards)."""
    recipe = recipe_to_toml(load_recipe(MOCK, list(overrides)))
    for iteration in iterations:
        path = root / store.checkpoint_name(iteration)
        path.mkdir(parents=True)
        (path / "__0_0.distcp").write_bytes(b"x" * 10)
        (path / "metadata.json").write_text("{}")
        (path / "recipe.toml").write_text(recipe)
        (path / store.MARKER).write_text(json.dumps({"iteration": iteration, "files": store.manifest(path)}))
    (root / store.LATEST).write_text(store.checkpoint_name(iterations[-1]) + "\n")
    return root


# ---------------------------------------------------------------- outputs that cannot be written
@pytest.mark.parametrize("key", ["run_dir", "checkpoint.dir"])
def test_a_file_where_an_output_directory_belongs_is_refused(tmp_path, key):
    (tmp_path / "taken").write_text("mine")
    message = dry_run(f"run_dir={tmp_path / 'run'}", f"{key}={tmp_path / 'taken' / 'sub'}")
    assert f"{key} = {tmp_path / 'taken' / 'sub'} cannot be created: {tmp_path / 'taken'} is a file" in message
    assert (tmp_path / "taken").read_text() == "mine"


def test_an_output_on_a_place_nobody_may_write_is_refused(tmp_path):
    """/sys refuses new files even to root (a read-only mount fails the same check, with its own reason)."""
    message = dry_run(f"run_dir={tmp_path}", "checkpoint.dir=/sys/bigpt_checkpoints")
    assert "checkpoint.dir = /sys/bigpt_checkpoints is not writable: creating a file in /sys fails" in message


def test_a_name_too_long_for_the_filesystem_is_refused(tmp_path):
    with pytest.raises(BigptError, match="run_dir = .*: the name xxxx.* is longer than the 255"):
        check_writable(tmp_path / ("x" * 300) / "run", "run_dir")
    check_writable(tmp_path / "a" / "b", "run_dir")
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind


def test_the_data_cache_is_an_output_too(tmp_path):
    from bigpt.train.preflight import output_places

    recipe = load_recipe(ROOT / "recipes/tiny.toml", [f"run_dir={tmp_path}"])
    assert output_places(recipe)["data.cache_dir"] == tmp_path / "data_cache"


# ---------------------------------------------------------------- files the run would replace
def test_a_run_dir_that_is_the_recipes_own_folder_leaves_the_recipe_alone(tmp_path):
    """The run writes run_dir/recipe.toml: there it is the user's recipe (comments, base line)."""
    from bigpt.dryrun import describe

    mine = tmp_path / "recipe.toml"
    mine.write_text(f'# my experiment\nbase = "{MOCK}"\nrun_dir = "{tmp_path}"\n')
    before = snapshot(tmp_path)
    recipe = load_recipe(mine)
    with pytest.raises(BigptError) as refused:
        describe(recipe, Layout.from_recipe(recipe, 1))
    assert f"run_dir: {mine} exists and bigpt did not write it" in str(refused.value)
    assert "--overwrite" in str(refused.value) and "\n" not in str(refused.value)
    assert snapshot(tmp_path) == before
    assert "data plan" in describe(recipe, Layout.from_recipe(recipe, 1), overwrite=True)


def test_a_resume_rewrites_the_run_recipe_it_wrote(tmp_path):
    from bigpt.train.preflight import check_outputs, write_run_recipe

    recipe = load_recipe(MOCK, [f"run_dir={tmp_path}"])
    check_outputs(recipe)
    write_run_recipe(recipe)
    check_outputs(recipe)  # its own recipe.toml: replaceable
    longer = load_recipe(MOCK, [f"run_dir={tmp_path}", "train.train_iters=99"])
    write_run_recipe(longer)
    assert load_recipe(tmp_path / "recipe.toml") == longer
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.toml"]  # no temporary file left


def test_a_resume_of_a_run_from_before_the_mark_rewrites_its_recipe(tmp_path):
    """Runs started before bigpt marked its recipe.toml: the file reads back as exactly the
    resolved recipe bigpt writes, which no recipe of a user's does."""
    from bigpt.recipe import recipe_to_toml
    from bigpt.train.preflight import check_outputs

    recipe = load_recipe(MOCK, [f"run_dir={tmp_path}"])
    (tmp_path / "recipe.toml").write_text(recipe_to_toml(recipe))  # as bigpt wrote it before the mark
    check_outputs(recipe)
    (tmp_path / "recipe.toml").write_text(recipe_to_toml(recipe) + "# my note\n")
    with pytest.raises(BigptError, match="exists and bigpt did not write it"):
        check_outputs(recipe)


def test_a_latest_bigpt_did_not_write_is_refused(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / store.LATEST).write_text("the latest of my notes\n")
    message = dry_run(f"run_dir={tmp_path}", "checkpoint.load=none")
    assert f"checkpoint.dir: {checkpoints / store.LATEST} exists and bigpt did not write it" in message
    assert "--overwrite" in message
    assert (checkpoints / store.LATEST).read_text() == "the latest of my notes\n"
    (checkpoints / store.LATEST).unlink()
    (checkpoints / store.LATEST).mkdir()
    assert f"checkpoint.dir = {checkpoints / store.LATEST} is a directory" in dry_run(f"run_dir={tmp_path}")


def test_a_file_where_tensorboard_writes_is_refused(tmp_path):
    (tmp_path / "tensorboard").write_text("mine")
    message = dry_run(f"run_dir={tmp_path}", "logging.tensorboard=true")
    assert f"run_dir: {tmp_path / 'tensorboard'} exists and is not a directory" in message
    assert (tmp_path / "tensorboard").read_text() == "mine"


def test_a_full_disk_while_writing_the_run_recipe_leaves_the_old_one_whole(tmp_path, monkeypatch):
    import errno
    import os

    from bigpt.train.preflight import write_run_recipe

    write_run_recipe(load_recipe(MOCK, [f"run_dir={tmp_path}"]))
    before = snapshot(tmp_path)

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(BigptError, match="writing run_dir's recipe.toml = .* failed: No space left on device"):
        write_run_recipe(load_recipe(MOCK, [f"run_dir={tmp_path}", "train.train_iters=99"]))
    assert snapshot(tmp_path) == before  # the old file whole, no temporary file left


# ---------------------------------------------------------------- checkpoints of another run
def test_a_fresh_start_into_a_copied_run_is_refused_and_touches_nothing(tmp_path):
    checkpoints = saved_run(tmp_path / "run" / "checkpoints", 25, 30)
    before = snapshot(tmp_path)
    message = dry_run(f"run_dir={tmp_path / 'run'}", "checkpoint.load=none", "checkpoint.save_interval=2")
    assert f"checkpoint.dir {checkpoints} holds checkpoints of another run (iter_0000025, iter_0000030)" in message
    assert snapshot(tmp_path) == before


def test_resuming_a_run_says_so(tmp_path):
    saved_run(tmp_path / "checkpoints", 25, 30)
    report = dry_run(f"run_dir={tmp_path}", "checkpoint.load=auto", "train.train_iters=40", ok=True)
    assert f"start            resume from {tmp_path / 'checkpoints' / 'iter_0000030'}" in report


def test_a_checkpoint_to_resume_that_is_missing_is_refused(tmp_path):
    message = dry_run(f"run_dir={tmp_path}", f"checkpoint.load={tmp_path / 'gone' / 'iter_0000005'}")
    assert "checkpoint.load = " in message and "cannot be loaded: there is no such directory" in message


def test_a_checkpoint_of_another_shape_is_refused_on_paper(tmp_path):
    saved_run(tmp_path / "checkpoints", 3)
    message = dry_run(
        f"run_dir={tmp_path}", "checkpoint.load=auto", "model.hidden_size=128", "model.ffn_hidden_size=320"
    )
    assert "does not match the recipe's model: model.hidden_size = 128 (the checkpoint has 64)" in message


# ---------------------------------------------------------------- weights into another architecture
@pytest.mark.parametrize(
    "override", ["model.rope_base=500000.0", "model.norm_epsilon=1e-6", "model.rope_scaling=llama3"]
)
def test_a_checkpoint_into_a_model_that_computes_something_else_is_refused(tmp_path, override):
    saved = saved_run(tmp_path / "saved", 3)
    key = override.split("=")[0]
    for load in (f"checkpoint.load={saved / 'iter_0000003'}", f"init.from_checkpoint={saved / 'iter_0000003'}"):
        message = dry_run(f"run_dir={tmp_path / 'run'}", load, override)
        assert f"does not match the recipe's model: {key} = " in message
        assert "list it in checkpoint.allow_model_changes" in message


def test_a_change_the_recipe_asks_for_is_allowed_and_reported(tmp_path):
    saved = saved_run(tmp_path / "saved", 3)
    report = dry_run(
        f"run_dir={tmp_path / 'run'}",
        f"init.from_checkpoint={saved / 'iter_0000003'}",
        "model.rope_base=500000.0",
        'checkpoint.allow_model_changes=["rope_base"]',
        ok=True,
    )
    assert "changed by checkpoint.allow_model_changes: model.rope_base 10000.0 -> 500000.0" in report


LONGER = (
    "model.seq_length=256",
    'model.rope_scaling="yarn"',
    "model.rope_scaling_factor=4.0",
    "model.rope_original_max_position_embeddings=64",
)


def test_a_longer_context_is_a_new_phase_from_the_weights_shown_on_paper(tmp_path):
    """4× the context with YaRN: from the weights (init.from_checkpoint) with the scaling allowed,
    reported with the memory and context-parallel degree the length needs; or as a resume."""
    saved = saved_run(tmp_path / "saved", 3) / "iter_0000003"
    scaling = 'checkpoint.allow_model_changes=["rope_scaling"]'  # its parameters come with it
    report = dry_run(f"run_dir={tmp_path / 'run'}", f"init.from_checkpoint={saved}", *LONGER, scaling, ok=True)
    assert "changed by checkpoint.allow_model_changes: model.rope_scaling 'none' -> 'yarn'" in report
    assert "model.rope_scaling_factor None -> 4.0" in report  # unused before: recorded as such
    assert re.search(
        r"context          256 tokens, rope_scaling 'yarn' × 4 over 64; the busiest GPU holds \d+\.\d GiB "
        r"\(\d+\.\d GiB activations\) at CP 1; CP 4 keeps",
        report,
    )
    # a resume at the longer length is honoured too: its counters are kept in tokens
    # (tests/test_train_loop.py's resume with another batch and sequence length)
    report = dry_run(f"run_dir={tmp_path / 'resumed'}", f"checkpoint.load={saved}", *LONGER, scaling, ok=True)
    assert "changed by checkpoint.allow_model_changes: model.rope_scaling 'none' -> 'yarn'" in report


@pytest.mark.parametrize("key, why", [("hidden_size", "changes the shapes"), ("init_std", "is not a [model] key")])
def test_allow_model_changes_names_only_keys_that_can_change(key, why):
    with pytest.raises(BigptError, match=re.escape(f"checkpoint.allow_model_changes names '{key}', which {why}")):
        load_recipe(MOCK, [f'checkpoint.allow_model_changes=["{key}"]'])


# ---------------------------------------------------------------- FP8 means FP8 or a refusal
@pytest.mark.parametrize(
    "overrides", [["precision.fp8=delayed"], ["precision.fp8=tensorwise"], ["precision.transformer_engine=on"]]
)
def test_fp8_without_transformer_engine_is_refused_on_paper_and_at_init(tmp_path, overrides):
    from bigpt.model import use_transformer_engine

    message = dry_run(f"run_dir={tmp_path}", *overrides)
    assert (
        overrides[0].split("=")[0] in message
        and "needs Transformer Engine on a CUDA GPU, which is not installed here" in message
    )
    with pytest.raises(BigptError, match="needs Transformer Engine on a CUDA GPU, which this machine does not have"):
        use_transformer_engine(load_recipe(MOCK, overrides))


def test_a_plain_recipe_needs_no_transformer_engine():
    from bigpt.model import check_transformer_engine_installed, use_transformer_engine

    recipe = load_recipe(MOCK)
    check_transformer_engine_installed(recipe)
    assert use_transformer_engine(recipe) is False


def test_a_missing_or_damaged_tokenizer_is_refused_on_paper(tmp_path):
    message = dry_run(f"run_dir={tmp_path}", f"data.tokenizer={tmp_path / 'gone.json'}")
    assert f"tokenizer file {tmp_path / 'gone.json'} does not exist" in message
    message = dry_run(f"run_dir={tmp_path}", f"data.tokenizer={tmp_path}")
    assert f"tokenizer file {tmp_path} is a directory, not a file" in message
