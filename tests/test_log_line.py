"""The log line of bigpt/train/callbacks.py's MetricsLogger, fed as the loop feeds it (in process;
TensorBoard's scalars are read back from a real run in tests/test_train_loop.py)."""

import math
from types import SimpleNamespace

from bigpt.recipe import load_recipe
from bigpt.train.callbacks import MetricsLogger
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


def test_the_line_logs_the_mean_loss_of_its_interval_without_skipped_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = load_recipe(
        MOCK_RECIPE, [f"run_dir={tmp_path}", "logging.interval=3", "logging.tensorboard=false", "train.train_iters=7"]
    )
    trainer = SimpleNamespace(recipe=recipe, state=SimpleNamespace(iteration=0, consumed_samples=0, consumed_tokens=0))
    logger = MetricsLogger(str(tmp_path))
    logger.on_start(trainer)
    steps = [(6.0, False), (5.0, False), (4.5, False), (5.5, False), (float("nan"), True), (3.5, False), (2.0, False)]
    for loss, skipped in steps:
        trainer.state.iteration += 1
        trainer.state.consumed_samples += 8
        trainer.state.consumed_tokens += 8 * 64
        logger.on_step(trainer, step_metrics(loss, skipped))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 3/7", "step 6/7", "step 7/7"]
    # steps 1-3; 4-6 without the skipped step 5; step 7 alone (the last line, at train.train_iters)
    assert [line.split(" | ")[2] for line in lines] == ["loss 5.1667", "loss 4.5000", "loss 2.0000"]
