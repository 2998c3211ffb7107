"""Paths as people write them (issue 25 part 6): ``~`` in recipe values and on command lines, run
names that would empty or escape the runs folder, folders with spaces in a rendered sbatch
script, and relative command-line paths named as relative to the working directory."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from bigpt.errors import BigptError
from bigpt.paths import check_output_file, check_writable
from bigpt.recipe import load_recipe
from launchers.slurm import main as slurm_main

ROOT = Path(__file__).resolve().parent.parent
MOCK = ROOT / "tests/recipes/mock_tiny.toml"
CURATION = ROOT / "recipes/data/web_quality.toml"


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_a_tilde_in_any_recipe_path_is_the_home_directory(home, tmp_path):
    (home / "base.toml").write_text(f'base = "{MOCK}"\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text('base = "~/base.toml"\nrun_dir = "~/runs/a"\n[checkpoint]\ndir = "~/ckpt"\n')
    loaded = load_recipe(recipe)
    assert (loaded.run_dir, loaded.checkpoint.dir) == (f"{home}/runs/a", f"{home}/ckpt")
    overridden = load_recipe(MOCK, ["run_dir=~/b", "checkpoint.dir=~"])
    assert (overridden.run_dir, overridden.checkpoint.dir) == (f"{home}/b", str(home))


def test_a_tilde_in_a_curation_output_is_the_home_directory(home):
    pytest.importorskip("datatrove")
    from bigpt.curate import load_curation_recipe

    recipe = load_curation_recipe(CURATION, ["output.dir=~/curated", "input.path=~/raw"])
    assert (recipe.output.dir, recipe.input.path) == (f"{home}/curated", f"{home}/raw")


def test_a_tilde_the_shell_left_in_an_argument_is_the_home_directory(home):
    from tools.convert_hf import parser as convert
    from tools.preprocess_data import parse_args as preprocess
    from tools.train_tokenizer import parser as tokenizer

    args = preprocess(["--input=~/c.jsonl", "--output-prefix", "~/data/c", "--tokenizer", "~/t.model"])
    assert (args.input, args.output_prefix, args.tokenizer) == (f"{home}/c.jsonl", f"{home}/data/c", f"{home}/t.model")
    assert tokenizer.parse_args("--input ~/a ~/b --vocab-size 9 --output-prefix ~/t".split()).input == [
        f"{home}/a",
        f"{home}/b",
    ]
    args = convert.parse_args(["import", "~/hf", "~/out"])
    assert (args.hf_dir, args.out) == (f"{home}/hf", f"{home}/out")
    assert preprocess(["--input", "a~b", "--output-prefix", "x", "--tokenizer", "t", "--field", "~"]).input == "a~b"


@pytest.mark.parametrize(
    "name, where",
    [
        ("..", "outside runs/"),
        ("../elsewhere", "outside runs/"),
        ("a/../../b", "outside runs/"),
        ("/abs/run", "outside runs/"),
        ("~/run", "outside runs/"),
        ("", "runs/ itself"),
        ("   ", "runs/ itself"),
        (".", "runs/ itself"),
        ("a/./b", "runs/ itself"),
        ("/", "runs/ itself"),
        (" padded ", "starts or ends with a space"),
    ],
)
def test_a_run_name_that_empties_or_escapes_the_runs_folder_is_refused(name, where):
    with pytest.raises(BigptError, match=f"name = {re.escape(repr(name))} cannot name a run: .* {re.escape(where)}"):
        load_recipe(MOCK, [f"name={name}"])


def test_a_run_name_may_make_a_subfolder_of_runs():
    assert load_recipe(MOCK, ["name=team/exp-1"]).run_dir == "runs/team/exp-1"


def test_a_rendered_sbatch_script_keeps_folders_with_spaces_whole(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "my project"
    folder.mkdir()
    recipe = folder / "my recipe.toml"
    recipe.write_text(f'base = "{MOCK}"\n')
    monkeypatch.chdir(folder)
    assert slurm_main([str(recipe), "run_dir=runs/a b", "--nodes", "1", "--workers-per-node", "2"]) == 0
    script = capsys.readouterr().out
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    # sbatch reads an #SBATCH value up to a space unless it is double-quoted
    assert f'#SBATCH --output="{folder}/runs/a b/slurm-%j.out"\n' in script
    assert f'#SBATCH --chdir="{folder}"\n' in script
    settings = "\n".join(line for line in script.splitlines() if re.match(r"(RECIPE|OVERRIDES)=", line))
    shown = subprocess.run(
        ["bash", "-c", f'{settings}\nprintf "%s\\n" "$RECIPE" "${{OVERRIDES[@]}}"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.splitlines() == [str(recipe), "run_dir=runs/a b"]
    directive = re.search(r"^#SBATCH --output=(.*)$", script, re.M).group(1)
    assert shlex.split(directive) == [f"{folder}/runs/a b/slurm-%j.out"]


def test_a_relative_path_is_named_as_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(BigptError, match=f"--out: taken \\(in the working directory {tmp_path}\\) exists"):
        check_output_file("taken", "--out")
    with pytest.raises(BigptError, match=f"--out = taken/x \\(in the working directory {tmp_path}\\) cannot be"):
        check_writable("taken/x", "--out")
