"""Metrics as a channel (bigpt/train/trainer.py): callbacks in priority order, every metric
reaching every consumer by name, the console line of bigpt/train/callbacks.py fed as the loop
feeds it (in process; TensorBoard's scalars are read back from a real run in
tests/test_train_loop.py)."""

import math

import pytest

from bigpt.layout import Layout
from bigpt.recipe import load_recipe
from bigpt.train.callbacks import ConsoleLine, IntervalMeans
from bigpt.train.trainer import Callback, Trainer
from multirank import MOCK_RECIPE


def step_metrics(loss: float, skipped: bool = False) -> dict:
    return {
        "loss": loss,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "loss_scale": 1.0,
        "skipped": skipped,
        "global_batch_size": 8,
        "step_time": 0.5,
        "tokens_per_s": 1000.0,
        "tflops": 1.0,
        "mfu": math.nan,
        "memory_gib": 1.0,
    }


def trainer_with(tmp_path, callbacks, *overrides) -> Trainer:
    """A Trainer without model or process groups: enough to run its callbacks as the loop does."""
    recipe = load_recipe(MOCK_RECIPE, [f"run_dir={tmp_path}", *overrides])
    return Trainer(recipe, Layout.from_recipe(recipe, 1), [], None, None, None, callbacks)


def steps(trainer: Trainer, losses) -> None:
    for loss, skipped in losses:
        trainer.state.iteration += 1
        trainer.state.consumed_samples += 8
        trainer.state.consumed_tokens += 8 * trainer.recipe.model.seq_length
        trainer.after_step(step_metrics(loss, skipped))


@pytest.fixture
def one_speaking_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_the_line_logs_the_mean_loss_of_its_interval_without_skipped_steps(tmp_path, one_speaking_process, capsys):
    trainer = trainer_with(
        tmp_path, [ConsoleLine(), IntervalMeans(["loss"])], "logging.interval=3", "train.train_iters=7"
    )
    steps(
        trainer, [(6.0, False), (5.0, False), (4.5, False), (5.5, False), (math.nan, True), (3.5, False), (2.0, False)]
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 3/7", "step 6/7", "step 7/7"]
    # steps 1-3; 4-6 without the skipped step 5; step 7 alone (the last line, at train.train_iters)
    assert [line.split(" | ")[2] for line in lines] == ["loss 5.1667", "loss 4.5000", "loss 2.0000"]
    assert lines[1].endswith("| mem 1.00 GiB") and not lines[0].endswith("skipped")


class Recorder(Callback):
    """Records what it sees: the callbacks that ran before it, every metric it is handed."""

    def __init__(self, name: str, priority: int, seen: list, state_name: str | None = None):
        self.name, self.priority, self.seen, self.state_name = name, priority, seen, state_name
        self.metrics: list[dict] = []
        self.state = {"seen": 0}

    def on_step(self, trainer, metrics):
        self.seen.append(self.name)
        metrics[f"{self.name}_value"] = float(len(self.seen))
        trainer.record(f"valid/{self.name}/loss", 1.0)

    def log_metrics(self, trainer, step, metrics):
        self.metrics.append(dict(metrics, step=step))

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def test_callbacks_run_by_priority_and_every_consumer_gets_every_metric_by_name(tmp_path, one_speaking_process):
    seen: list[str] = []
    low, high, middle = Recorder("low", -5, seen), Recorder("high", 50, seen), Recorder("middle", 0, seen)
    trainer = trainer_with(tmp_path, [low, high, middle])
    steps(trainer, [(3.0, False)])
    assert seen == ["high", "middle", "low"]  # not the order given
    expected = {"train/loss": 3.0, "train/skipped": 0.0, "train/high_value": 1.0, "train/low_value": 3.0}
    for recorder in (low, high, middle):
        (metrics,) = recorder.metrics
        assert metrics["step"] == 1 and expected.items() <= metrics.items()
        assert {"valid/low/loss", "valid/middle/loss", "valid/high/loss"} <= metrics.keys()
    steps(trainer, [(2.0, False)])
    assert "valid/low/loss" in low.metrics[1] and len(low.metrics) == 2  # recorded anew, published once


def test_stateful_callbacks_are_named_parts_of_the_checkpoint(tmp_path):
    """A callback with a state_name is saved and loaded by the checkpoint code as it is (its part
    of train_state); a checkpoint without it loads it empty; a tool that builds no callbacks
    (a reshard) saves it again as it was."""
    from dataclasses import replace

    from bigpt.checkpoint import CheckpointWriter, load_checkpoint
    from bigpt.train.checkpointing import checkpointed
    from bigpt.train.main import build_model_and_optimizer
    from test_training_path import world_of_one

    recipe = load_recipe(MOCK_RECIPE, [f"run_dir={tmp_path}"])
    layout = Layout.from_recipe(recipe, 1)
    with world_of_one():
        model, optimizer, scheduler = build_model_and_optimizer(recipe, layout)

        def training(*callbacks):
            """The same model and optimizer, with these callbacks' parts."""
            return checkpointed(Trainer(recipe, layout, model, optimizer, scheduler, None, list(callbacks)))

        saver = Recorder("runs", 0, [], state_name="run_identity")
        saver.state = {"seen": 7, "id": "abc123"}
        saved = training(saver)
        assert set(saved.parts) == {"guard", "run_identity"}
        CheckpointWriter(tmp_path / "a", asynchronous=False).save(saved)
        loader = Recorder("runs", 0, [], state_name="run_identity")
        load_checkpoint(training(loader), tmp_path / "a" / "iter_0000000")
        assert loader.state == {"seen": 7, "id": "abc123"}
        carrier = training()  # no callbacks, as tools/reshard.py builds it
        load_checkpoint(carrier, tmp_path / "a" / "iter_0000000")
        CheckpointWriter(tmp_path / "b", asynchronous=False).save(carrier)
        again = Recorder("runs", 0, [], state_name="run_identity")
        load_checkpoint(training(again), tmp_path / "b" / "iter_0000000")
        assert again.state == {"seen": 7, "id": "abc123"}
        fresh = Recorder("new", 0, [], state_name="added_later")
        load_checkpoint(replace(saved, parts={"added_later": fresh}), tmp_path / "a" / "iter_0000000")
        assert fresh.state == {}
