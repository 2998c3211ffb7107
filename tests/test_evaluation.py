"""Evaluation during training: named validation sets (eval.sets), each reported as its own loss
and perplexity, through the objects bigpt builds, in one process (a world of one)."""

import contextlib
import io
import math
from pathlib import Path

import pytest

from bigpt.data import plan_tokens
from bigpt.errors import BigptError
from bigpt.layout import Layout
from bigpt.recipe import load_recipe
from multirank import MOCK_RECIPE, scalars
from test_data_support import data_recipe, write_indexed
from test_training_path import world_of_one
from wandb_files import history, offline_runs

EOD = 2
TASKS = Path(__file__).resolve().parent.parent / "recipes" / "tasks"


@pytest.fixture(scope="module")
def general_and_domain(tmp_path_factory):
    """Two datasets told apart by their token ids: "general" uses 10-89, "domain" 200-299."""
    directory = tmp_path_factory.mktemp("datasets")
    general = write_indexed(directory / "general", [list(range(10, 10 + n % 80 + 5)) + [EOD] for n in range(100)])
    domain = write_indexed(directory / "domain", [list(range(200, 200 + n % 90 + 5)) + [EOD] for n in range(60)])
    return general, domain


def continual_recipe(directory, tokenizer, general, domain, sets: str):
    """Trains on the domain dataset, evaluated every 2 steps on ``sets`` ([[eval.sets]] tables)."""
    return data_recipe(
        directory,
        f'source = "indexed"\ntokenizer = "{tokenizer}"\nblend = [{{path = "{domain}"}}]\nsplit = "80,20,0"\n'
        f'[eval]\ninterval = 2\niters = 1\n{sets}\n[checkpoint]\nload = "none"\nsave_interval = 0\n'
        "[logging]\ninterval = 2\n",
        seq_length=16,
    )


SETS = """
[[eval.tasks]]
name = "function"
path = "{tasks}/stdlib_function.jsonl"
limit = 4
[[eval.sets]]
name = "general"
blend = [{{path = "{general}"}}]
[[eval.sets]]
name = "domain"
iters = 2
[[eval.sets]]
name = "same"
iters = 1
"""


WANDB = """
[logging.wandb]
project = "bigpt-test"
mode = "offline"
tags = ["continual"]
"""


def trained(recipe, train_iters: int = 2) -> str:
    """Train in this process; what the console said."""
    from bigpt.checkpoint import load_checkpoint
    from bigpt.train.checkpointing import checkpointed
    from bigpt.train.main import build_trainer
    from bigpt.train.preflight import resume_point

    recipe.train.train_iters = train_iters
    said = io.StringIO()
    with world_of_one(), contextlib.redirect_stdout(said):
        trainer = build_trainer(recipe, Layout.from_recipe(recipe, 1))
        resume, _ = resume_point(recipe)
        if resume is not None:
            load_checkpoint(checkpointed(trainer), resume)
        trainer.train()
    return said.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path, general_and_domain):
    """The same training without eval.sets, and with a "general" and a "domain" set (the latter
    data.blend's validation split, read for 2 batches), a "same" set (data.blend's, 1 batch, as the
    default reads), a task and W&B; what the second said."""
    general, domain = general_and_domain
    root = tmp_path_factory.mktemp("runs")
    plain = continual_recipe(root / "plain", tokenizer_path, general, domain, "")
    named = continual_recipe(
        root / "named", tokenizer_path, general, domain, SETS.format(general=general, tasks=TASKS) + WANDB
    )
    trained(plain)
    return plain, named, trained(named)


def test_named_validation_sets_are_each_reported_under_their_name(runs):
    plain, named, out = runs
    assert "step 2 | validation general loss" in out and "step 2 | validation domain loss" in out
    assert "step 2 | task function | acc " in out
    assert 0 <= scalars(named.run_dir, "task/function/acc_norm")[0] <= 1
    general, domain = scalars(named.run_dir, "valid/general/loss"), scalars(named.run_dir, "valid/domain/loss")
    assert scalars(named.run_dir, "valid/domain/perplexity") == pytest.approx([math.exp(v) for v in domain])
    # Without eval.sets: data.blend's validation split as "valid". The domain set is that split, read
    # for one batch more: its loss differs from valid/loss, and general (other tokens) from both.
    valid = scalars(plain.run_dir, "valid/loss")
    assert len(valid) == len(general) == len(domain) == 1
    assert len({valid[0], general[0], domain[0]}) == 3
    with pytest.raises(KeyError):
        scalars(named.run_dir, "valid/loss")  # only the named sets


def test_a_named_set_of_data_blend_reads_what_the_default_validation_reads(runs):
    plain, named, _ = runs
    assert scalars(named.run_dir, "valid/same/loss") == scalars(plain.run_dir, "valid/loss")


def test_the_dry_run_shows_each_set_and_what_one_evaluation_reads(runs):
    _, named, _ = runs
    table = plan_tokens(named).splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("validation set"))
    assert table[start].split() == [
        "validation",
        "set",
        "dataset",
        "share",
        "read",
        "per",
        "evaluation",
        "split",
        "size",
    ]
    general, domain = table[start + 1].split(), table[start + 2].split()
    # 1 and 2 batches of 8 samples of 16 tokens
    assert general[0] == "general" and general[2:4] == ["100.0%", "128"]
    assert domain[0] == "domain" and domain[2:4] == ["100.0%", "256"]


@pytest.mark.parametrize(
    "sets,words",
    [
        ("[{name = 'valid'}]", "eval.sets[0].name = 'valid' is not a usable name"),
        ("[{name = 'a b'}]", "eval.sets[0].name = 'a b' is not a usable name"),
        ("[{name = 'x'}, {name = 'x'}]", "eval.sets[1].name = 'x' is given twice"),
        ("[{name = 'x', blend = [{path = '/nowhere/data'}]}]", "eval.sets[0].blend[0].path"),
    ],
)
def test_bad_sets_are_refused_on_paper(runs, sets, words):
    _, named, _ = runs
    with pytest.raises(BigptError, match=words.replace("[", "\\[").replace("]", "\\]")):
        plan_tokens(load_recipe(named.source, [f"eval.sets={sets}"]))


def test_sets_need_datasets(runs):
    _, named, _ = runs
    with pytest.raises(BigptError, match="eval.sets names validation sets, but data.source is 'mock'"):
        load_recipe(named.source, ["data.source='mock'", "data.blend=[]"])


def test_weights_and_biases_holds_every_scalar_tensorboard_holds_and_a_resume_continues_its_run(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, named, _ = runs
    (first,) = offline_runs(named.run_dir)
    run_id, logged = history(first)
    events = EventAccumulator(str(Path(named.run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "valid/general/loss", "valid/domain/perplexity", "task/function/acc"} <= set(tags)
    assert set(logged) == set(tags)
    for tag in tags:
        assert logged[tag] == pytest.approx(
            {event.step: event.value for event in events.Scalars(tag)}, rel=1e-6, nan_ok=True
        ), tag
    # One more step from the checkpoint of step 2: the same W&B run, from step 3 on.
    trained(load_recipe(named.source, ["checkpoint.load=auto"]), train_iters=3)
    earlier, resumed = offline_runs(named.run_dir)
    assert earlier == first
    resumed_id, resumed_logged = history(resumed)
    assert resumed_id == run_id and set(resumed_logged["train/loss"]) == {3}


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["logging.wandb.project='team/p'"], "logging.wandb.project = 'team/p' is not a W&B project name"),
        (["logging.wandb.project='p'", f"logging.wandb.tags=['{'x' * 65}']"], "longer than W&B's 64 characters"),
        (["logging.wandb.entity='team'"], "logging.wandb.entity set without logging.wandb.project"),
    ],
)
def test_bad_wandb_settings_are_refused_on_paper(overrides, words):
    with pytest.raises(BigptError, match=words):
        load_recipe(MOCK_RECIPE, overrides)


def test_wandb_without_its_package_is_refused_on_paper(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(
        BigptError, match=r"the wandb package is not installed in .*; install it \(pip install 'bigpt\[wandb\]'\)"
    ):
        load_recipe(MOCK_RECIPE, ["logging.wandb.project='p'"])


# ------------------------------------------------------------------ downstream tasks


def reference_loglikelihoods(model_dir, tokenizer, examples, max_length: int) -> list[float]:
    """lm-evaluation-harness's log-likelihood of each (context, " " + choice), written here from its
    definition (HFLM._encode_pair and _loglikelihood_tokens) on transformers' model: an
    independent scorer."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    scores = []
    for example in examples:
        for choice in example.choices:
            context, continuation = example.context, " " + choice
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces > 0:
                continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
            whole, context_enc = tokenizer.encode(context + continuation), tokenizer.encode(context)
            continuation_enc = whole[len(context_enc) :]
            if not context_enc:
                context_enc = [tokenizer.eod]
            inp = torch.tensor((context_enc + continuation_enc)[-(max_length + 1) :][:-1]).unsqueeze(0)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(inp).logits[0].double(), dim=-1)
            rows = logprobs[-len(continuation_enc) :]
            scores.append(float(rows.gather(1, torch.tensor(continuation_enc).unsqueeze(1)).sum()))
    return scores


def reference_accuracies(examples, scores) -> tuple[float, float]:
    import numpy as np

    acc = acc_norm = 0
    for example in examples:
        lls, scores = np.array(scores[: len(example.choices)]), scores[len(example.choices) :]
        acc += int(np.argmax(lls)) == example.gold
        acc_norm += int(np.argmax(lls / np.array([float(len(c)) for c in example.choices]))) == example.gold
    return acc / len(examples), acc_norm / len(examples)


@pytest.fixture(scope="module")
def task_model(tmp_path_factory, tokenizer_path):
    """A random Hugging Face Llama (vocabulary 512, as the test tokenizer's), a recipe that starts
    from it with the two shipped tasks (8 examples each), and the reference scorer's
    log-likelihoods of every choice, by task."""
    from bigpt.data import load_tokenizer
    from bigpt.data.tasks import read_task
    from test_hf import SHAPES, recipe_for, save_model

    root = tmp_path_factory.mktemp("task_model")
    model_dir = save_model(root / "hf", 3, SHAPES["mha_untied"])
    tasks = ", ".join(
        f"{{name = '{name}', path = '{TASKS / f'stdlib_{name}.jsonl'}', limit = 8}}"
        for name in ("continuation", "function")
    )
    path = recipe_for(model_dir, root / "recipe.toml", "tasks")
    path.write_text(path.read_text() + f'\n[data]\ntokenizer = "{tokenizer_path}"\n[eval]\ntasks = [{tasks}]\n')
    recipe = load_recipe(path, [f"run_dir={root / 'run'}"])
    tokenizer = load_tokenizer(tokenizer_path)
    expected = {}
    for entry in recipe.eval.tasks:
        examples = read_task(entry.path, "test")[: entry.limit]
        expected[entry.name] = (
            examples,
            reference_loglikelihoods(model_dir, tokenizer, examples, recipe.model.seq_length),
        )
    return recipe, expected


def test_task_scores_equal_an_lm_eval_definition_scorer_on_transformers(task_model):
    """The Hugging Face model imported by bigpt (init.from_hf) scores the shipped tasks as the
    reference scorer does on transformers' own model: every choice's log-likelihood, acc, acc_norm."""
    from bigpt.data import load_tokenizer
    from bigpt.train.main import build_model_and_optimizer
    from bigpt.train.tasks import load_tasks, loglikelihoods, score
    from bigpt.train.trainer import Trainer

    recipe, expected = task_model
    layout = Layout.from_recipe(recipe, 1)
    with world_of_one():
        model, optimizer, scheduler = build_model_and_optimizer(recipe, layout)
        trainer = Trainer(recipe, layout, model, optimizer, scheduler, None, [])
        tasks = load_tasks(recipe, load_tokenizer(recipe.data.tokenizer))
        ours = {task.name: (loglikelihoods(trainer, task.samples), score(trainer, task)) for task in tasks}
    for name, (examples, reference) in expected.items():
        scores, accuracy = ours[name]
        assert scores == pytest.approx(reference, abs=2e-4), name
        assert (accuracy["acc"], accuracy["acc_norm"]) == reference_accuracies(examples, reference)


@pytest.mark.slow
def test_the_evaluation_tool_scores_alike_at_pipeline_and_data_parallel_2(task_model, tmp_path):
    """tools/evaluate.py on 4 ranks, PP 2 × DP 2: each data-parallel rank scores its share of the
    choices, the last pipeline stage holds the losses, every rank learns them all."""
    import json

    from multirank import REPO, run_bigpt

    recipe, expected = task_model
    out = tmp_path / "scores.json"
    run_bigpt(
        recipe.source, "--out", str(out), f"run_dir={tmp_path}", "parallel.pipeline=2",
        nproc=4, script=REPO / "tools" / "evaluate.py",
    )  # fmt: skip
    scores = json.loads(out.read_text())
    for name, (examples, reference) in expected.items():
        assert scores[name]["loglikelihoods"] == pytest.approx(reference, abs=2e-4), name
        assert (scores[name]["acc"], scores[name]["acc_norm"]) == reference_accuracies(examples, reference)


def test_the_dry_run_reads_every_task_and_names_a_bad_line(tmp_path, tokenizer_path):
    from bigpt.dryrun import describe

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"context": "a", "choices": ["b", "c"], "gold": 1}\n{"context": "a", "choices": ["b"], "gold": 0}\n'
    )
    good = TASKS / "stdlib_function.jsonl"
    tasks = f"[{{name = 'function', path = '{good}', limit = 10}}, {{name = 'bad', path = '{bad}'}}]"
    recipe = load_recipe(
        MOCK_RECIPE, [f"run_dir={tmp_path}", f"data.tokenizer='{tokenizer_path}'", f"eval.tasks={tasks}"]
    )
    with pytest.raises(
        BigptError, match=rf"eval.tasks\[1\].path = {bad}, line 2: the context must be text, the choices at least two"
    ):
        describe(recipe, Layout.from_recipe(recipe, 1))
    recipe.eval.tasks.pop()
    report = describe(recipe, Layout.from_recipe(recipe, 1))
    assert "task function: 10 examples, 40 choices scored per evaluation" in report


def test_tasks_need_the_tokenizer(tmp_path):
    with pytest.raises(BigptError, match="eval.tasks needs the model's tokenizer"):
        load_recipe(MOCK_RECIPE, [f"eval.tasks=[{{name = 'x', path = '{TASKS / 'stdlib_function.jsonl'}'}}]"])


def test_tensorboard_groups_train_each_validation_set_and_the_tasks(runs):
    """The Custom Scalars layout: a chart's patterns match the tags each group is for."""
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, named, _ = runs
    events = EventAccumulator(str(Path(named.run_dir) / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    config = events.Tensors("custom_scalars__config__")[0]  # one per start: the run and its resume
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {
        (category.title, chart.title): chart.multiline.tag for category in layout.category for chart in category.chart
    }
    tags = events.Tags()["scalars"]

    def shown(group: str, chart: str) -> set[str]:
        return {tag for tag in tags if any(re.search(pattern, tag) for pattern in charts[group, chart])}

    assert shown("validation", "loss") == {"valid/general/loss", "valid/domain/loss", "valid/same/loss"}
    assert shown("tasks", "acc") == {"task/function/acc"}
    assert shown("train", "loss") == {"train/loss", "train/loss_interval_mean"}
    assert "MoE routers" not in {group for group, _ in charts}


def test_a_wandb_run_that_cannot_start_is_one_paragraph(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import wandb

    from bigpt.train.wandb_logger import WandbLogger

    def refuse(**settings):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    recipe = load_recipe(MOCK_RECIPE, [f"run_dir={tmp_path}", "logging.wandb.project='p'"])
    logger = WandbLogger()
    with world_of_one(), pytest.raises(BigptError, match=r"\(api_key not configured \(no-tty\)\); log in"):
        logger.on_start(SimpleNamespace(recipe=recipe))
    assert logger.run_id is not None and len(logger.run_id) == 8  # chosen for the checkpoint before the start


@pytest.mark.slow
def test_task_scores_equal_lm_evaluation_harness_where_it_is_installed(tmp_path):
    """lm-evaluation-harness's own HFLM (not a test dependency: its requirements do not install
    here; run where it is installed) on the same Hugging Face model and tokenizer.json: every
    choice's log-likelihood, acc and acc_norm. Seen passing with lm-eval 0.4.13 (+ accelerate):
    all 120 shipped examples, log-likelihoods within 3.1e-5, accuracies equal."""
    pytest.importorskip("lm_eval")
    import json

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from bigpt.data import load_tokenizer
    from bigpt.train.main import build_model_and_optimizer
    from bigpt.train.tasks import load_tasks, loglikelihoods
    from bigpt.train.trainer import Trainer
    from test_data_support import corpus_texts
    from test_hf import SHAPES, recipe_for, save_model

    model_dir = save_model(tmp_path / "hf", 3, SHAPES["mha_untied"])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus_texts(), trainer)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    tasks = ", ".join(f"{{name = '{n}', path = '{TASKS / f'stdlib_{n}.jsonl'}'}}" for n in ("continuation", "function"))
    path = recipe_for(model_dir, tmp_path / "recipe.toml", "lm-eval")
    path.write_text(
        path.read_text() + f'\n[data]\ntokenizer = "{model_dir / "tokenizer.json"}"\n[eval]\ntasks = [{tasks}]\n'
    )
    recipe = load_recipe(path, [f"run_dir={tmp_path / 'run'}"])
    layout = Layout.from_recipe(recipe, 1)
    with world_of_one():
        model, optimizer, scheduler = build_model_and_optimizer(recipe, layout)
        scorer = Trainer(recipe, layout, model, optimizer, scheduler, None, [])
        ours = [
            (task, loglikelihoods(scorer, task.samples))
            for task in load_tasks(recipe, load_tokenizer(recipe.data.tokenizer))
        ]
    harness = HFLM(
        pretrained=str(model_dir), max_length=recipe.model.seq_length, batch_size=1, dtype="float32", device="cpu"
    )
    for task, scores in ours:
        requests = [
            Instance(request_type="loglikelihood", doc={}, arguments=(example.context, " " + choice), idx=i)
            for example in task.examples
            for i, choice in enumerate(example.choices)
        ]
        theirs = [loglikelihood for loglikelihood, _ in harness.loglikelihood(requests)]
        assert scores == pytest.approx(theirs, abs=2e-4), task.name
        assert reference_accuracies(task.examples, scores) == reference_accuracies(task.examples, theirs)
