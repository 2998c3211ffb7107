"""tools/ladder.py end to end on CPU: a ladder of tiny models on real text (the demo corpus's
standard-library documents) is planned, run in this process one run after another, fitted and
plotted, once for the module; each test checks one part of what it left."""

import itertools
import json
import os
from pathlib import Path

import pytest

from bigpt.data import load_tokenizer
from bigpt.data.demo_corpus import stdlib_documents
from bigpt.layout import Layout
from bigpt.recipe import load_recipe
from bigpt.scaling import LAW_FORMAT
from bigpt.train.main import train
from multirank import MOCK_RECIPE, REPO, scalars
from test_data_support import write_indexed
from tools import ladder

WIDTHS, BUDGETS = "8,16,24", "1e9,3e9,1e10"


def base_recipe(directory, tokenizer_path) -> str:
    """recipes/base/ladder_tiny.toml on 400 documents (about 250K tokens)."""
    tokenizer = load_tokenizer(tokenizer_path)
    documents = [tokenizer.encode(text) + [tokenizer.eod] for _, text in itertools.islice(stdlib_documents(), 400)]
    prefix = write_indexed(directory / "corpus", documents)
    path = directory / "base.toml"
    path.write_text(f"""name = "ladder-base"
base = "{REPO / "recipes/base/ladder_tiny.toml"}"
[train]
train_iters = 10                # each run of the ladder sets its own
[schedule]
warmup_iters = 2
[data]
source = "indexed"
tokenizer = "{tokenizer_path}"
blend = [{{ path = "{prefix}" }}]
split = "95,5,0"
[eval]
iters = 4
[logging]
tensorboard = false
""")
    return str(path)


@pytest.fixture(scope="module")
def ladder_dir(tmp_path_factory, tokenizer_path):
    directory = tmp_path_factory.mktemp("ladder")
    base = base_recipe(directory, tokenizer_path)
    out = directory / "ladder"
    plan = ["plan", base, "--out", str(out), "--widths", WIDTHS, "--budgets", BUDGETS]
    assert ladder.main([*plan, "--tokens-per-parameter", "3,100", "--gpus", "1"]) == 0
    # the first run stopped half-way (as a preempted one does, with a checkpoint): the ladder resumes it
    first = json.loads((out / "ladder.json").read_text())["runs"][0]
    half = load_recipe(first["recipe"], [f"train.train_iters={first['train_iters'] // 2}"])
    train(half, Layout.from_recipe(half, 1))
    assert ladder.main(["run", str(out)]) == 0
    assert ladder.main(["fit", str(out), "--budget", "1e11", "--bootstrap", "20"]) == 0
    return out


@pytest.mark.slow  # the module's ladder: tens of seconds of training
def test_the_plan_sizes_each_model_by_one_rule_and_fits_each_schedule_to_its_run(ladder_dir):
    manifest = json.loads((ladder_dir / "ladder.json").read_text())
    runs = manifest["runs"]
    assert {run["width"] for run in runs} == {8, 16, 24}
    assert all(3 <= run["tokens"] / run["parameters"] <= 100 for run in runs)
    for run in runs:
        recipe = load_recipe(run["recipe"])
        model = recipe.model
        assert model.hidden_size == run["width"] and model.num_attention_heads == run["width"] // 8
        assert recipe.train.train_iters == run["train_iters"]
        assert recipe.schedule.decay_style == "cosine" and recipe.schedule.decay_iters == run["train_iters"]
        assert run["tokens"] == run["train_iters"] * 64 * 32
        assert 6 * run["parameters"] * run["tokens"] == pytest.approx(run["budget"], rel=0.05)
        assert recipe.logging.tensorboard and recipe.eval.interval  # the final validation loss is recorded
    with open(runs[0]["recipe"]) as recipe_file:
        assert recipe_file.readline().startswith("# written by bigpt")


@pytest.mark.slow  # the module's ladder: tens of seconds of training
def test_a_run_stopped_part_way_resumes_where_it_stopped(ladder_dir):
    """The first run trained to half its steps before the ladder ran: the ladder resumed it from
    that checkpoint (each step's loss logged once), not from the start."""
    first = json.loads((ladder_dir / "ladder.json").read_text())["runs"][0]
    assert len(scalars(first["run_dir"], "train/loss")) == first["train_iters"]
    assert len(scalars(first["run_dir"], "valid/loss")) == 2  # at the half-way stop and at the end


@pytest.mark.slow  # the module's ladder: tens of seconds of training
def test_every_run_finished_and_a_second_run_skips_them(ladder_dir, capsys):
    capsys.readouterr()
    assert ladder.main(["run", str(ladder_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = json.loads((ladder_dir / "ladder.json").read_text())["runs"]
    assert len([line for line in lines if line.endswith("; skipped")]) == len(runs)


@pytest.mark.slow  # the module's ladder: tens of seconds of training
def test_the_fit_is_written_for_the_planner_with_its_plot(ladder_dir):
    fit = json.loads((ladder_dir / "fit.json").read_text())
    assert fit["format"] == LAW_FORMAT
    law = fit["law"]
    assert 0 < law["alpha"] < 3 and 0 < law["beta"] < 3 and law["E"] > 0
    losses = {point["name"]: point["loss"] for point in fit["points"]}
    assert len(losses) == len(json.loads((ladder_dir / "ladder.json").read_text())["runs"])
    # more tokens for the same model: a lower loss
    assert losses["w8-c1.0e10"] < losses["w8-c3.0e09"] < losses["w8-c1.0e09"]
    assert fit["budget"]["flops"] == 1e11 and fit["budget"]["loss"] > law["E"]
    assert (ladder_dir / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # the module's ladder: tens of seconds of training
def test_outputs_bigpt_did_not_write_are_refused(ladder_dir, tmp_path, capsys):
    user_file = tmp_path / "mine.png"
    user_file.write_bytes(b"not bigpt's")
    prefix = str(tmp_path / "mine")
    assert ladder.main(["fit", str(ladder_dir), "--output-prefix", prefix, "--bootstrap", "0"]) == 2
    assert "bigpt did not write it" in capsys.readouterr().err
    assert user_file.read_bytes() == b"not bigpt's"
    # its own outputs are replaced without --overwrite
    assert ladder.main(["fit", str(ladder_dir), "--bootstrap", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == LAW_FORMAT


def test_a_directory_without_a_ladder_is_refused(tmp_path, capsys):
    assert ladder.main(["run", str(tmp_path)]) == 2
    assert "holds no ladder" in capsys.readouterr().err


def test_a_warmup_stable_decay_ladder_branches_each_budget_from_one_run_per_size(tmp_path, capsys):
    """--wsd on paper: per size a constant-rate run saving at every branch point, and per budget a
    decay resumed from the stable run's checkpoint at that point, ending at the budget's length."""
    out = tmp_path / "wsd"
    plan = ["plan", str(MOCK_RECIPE), "--out", str(out), "--widths", "32,64", "--budgets", "3e9,1e10,3e10"]
    assert ladder.main([*plan, "--wsd", "0.2", "--tokens-per-parameter", "1,1000"]) == 0
    assert "warmup-stable-decay: " in capsys.readouterr().out
    runs = json.loads((out / "ladder.json").read_text())["runs"]
    for stable in (run for run in runs if run["kind"] == "stable"):
        recipe = load_recipe(stable["recipe"])
        assert recipe.schedule.decay_style == "constant"
        interval = recipe.checkpoint.save_interval
        decays = [run for run in runs if run["kind"] == "decay" and run["width"] == stable["width"]]
        assert len(decays) >= 2 and recipe.checkpoint.keep_every == interval
        assert max(run["branch_step"] for run in decays) == recipe.train.train_iters
        for run in decays:
            branch = load_recipe(run["recipe"])
            assert run["branch_step"] % interval == 0
            assert branch.checkpoint.load == f"{stable['run_dir']}/checkpoints/iter_{run['branch_step']:07d}"
            assert branch.schedule.decay_style == "wsd" and branch.schedule.decay_iters == run["train_iters"]
            decay = branch.schedule.wsd_decay_iters
            assert decay == run["train_iters"] - run["branch_step"] == pytest.approx(0.2 * run["train_iters"], abs=1)
            assert branch.schedule.warmup_iters == recipe.schedule.warmup_iters
            assert 6 * run["parameters"] * run["tokens"] == pytest.approx(run["budget"], rel=0.2)


def test_run_with_slurm_submits_each_unfinished_run_through_the_slurm_launcher(tmp_path, monkeypatch, capsys):
    """--slurm: launchers/slurm.py renders each run's batch script into its run_dir and submits it
    (here to a stand-in sbatch that only answers), one progress line per run."""
    out = tmp_path / "ladder"
    plan = ["plan", str(MOCK_RECIPE), "--out", str(out), "--widths", "32,64", "--budgets", "3e11"]
    assert ladder.main([*plan, "--tokens-per-parameter", "1,1000"]) == 0
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.parent.mkdir()
    sbatch.write_text('#!/bin/sh\necho "Submitted batch job 42 ($1)"\n')
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{sbatch.parent}:{os.environ['PATH']}")
    assert "this ladder has 2 points, 2 sizes and 2 token counts: the fit needs more" in capsys.readouterr().err
    assert ladder.main(["run", str(out), "--slurm", "--nodes", "1", "--workers-per-node", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = json.loads((out / "ladder.json").read_text())["runs"]
    assert len(runs) == 2
    for number, run in enumerate(runs, 1):
        script = Path(run["run_dir"]) / "slurm-job.sbatch"
        submitted = f"submitted (Submitted batch job 42 ({script}))"
        assert any(line.startswith(f"[{number}/2] {run['name']} ") and line.endswith(submitted) for line in lines)
        assert run["recipe"] in script.read_text()


def test_plan_refuses_to_replace_a_recipe_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "ladder"
    (out / "recipes").mkdir(parents=True)
    mine = out / "recipes" / "w32-c3.0e11.toml"
    mine.write_text("# my own recipe\n")
    plan = ["plan", str(MOCK_RECIPE), "--out", str(out), "--widths", "32", "--budgets", "3e11"]
    assert ladder.main(plan) == 2
    assert "bigpt did not write it" in capsys.readouterr().err and mine.read_text() == "# my own recipe\n"
    assert not (out / "ladder.json").exists()
    assert ladder.main([*plan, "--overwrite"]) == 0
    assert mine.read_text().startswith("# written by bigpt")


def test_fit_reads_results_from_elsewhere_as_a_csv(tmp_path, capsys):
    from test_scaling import CHINCHILLA, chinchilla_points

    csv = tmp_path / "results.csv"
    rows = [f"{p.parameters},{p.tokens},{p.loss}" for p in chinchilla_points()]
    csv.write_text("params,tokens,loss\n" + "\n".join(rows) + "\n")
    assert ladder.main(["fit", str(csv), "--bootstrap", "0", "--budget", "5.76e23"]) == 0
    text = capsys.readouterr().out
    assert "fitted to 200 runs" in text and "at C = 5.76e+23 FLOPs: N = " in text
    law = json.loads((tmp_path / "results_fit.json").read_text())["law"]
    assert law["alpha"] == pytest.approx(CHINCHILLA.alpha, abs=0.02)
    assert (tmp_path / "results_fit.png").is_file()
