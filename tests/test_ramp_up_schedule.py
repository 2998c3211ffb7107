"""The learning-rate schedule and the batch ramp-up, in process: the objects bigpt builds
(megatron-core's micro-batch calculator and OptimizerParamScheduler), stepped as the loop steps
them, without training."""

import pytest
import torch
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    get_current_global_batch_size,
    get_num_microbatches,
    init_num_microbatches_calculator,
    update_num_microbatches,
)

import bigpt.train.trainer as trainer_module
from bigpt.dryrun import describe
from bigpt.layout import Layout, global_batch_at, samples_by_step
from bigpt.recipe import load_recipe
from bigpt.train.optim import build_scheduler, rampup_schedule
from bigpt.train.trainer import Trainer
from multirank import MOCK_RECIPE

RAMP = ("train.rampup_batch_size=[4, 4, 16]",)  # mock_tiny: batches of 4 until 16 samples, then 8


def mock(tmp_path, *overrides):
    return load_recipe(MOCK_RECIPE, [f"run_dir={tmp_path}", *overrides])


@pytest.fixture
def calculator():
    """megatron-core's process-wide micro-batch calculator, set up as bigpt sets it (init_batch_calculator)."""

    def init(recipe):
        t = recipe.train
        destroy_num_microbatches_calculator()
        init_num_microbatches_calculator(
            rank=0,
            global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size,
            data_parallel_size=1,
            step_batch_size_schedule=t.rampup_batch_size and rampup_schedule(t.rampup_batch_size, t.global_batch_size),
        )

    yield init
    destroy_num_microbatches_calculator()


def lr_per_step(recipe) -> list[float]:
    """The lr after each step, the scheduler stepped by each step's batch as Trainer.train_step does."""
    group = {"params": [torch.nn.Parameter(torch.zeros(1))]}
    optimizer = torch.optim.SGD([group], lr=0.0)
    scheduler = build_scheduler(recipe, optimizer)
    consumed, lrs = 0, []
    for _ in range(recipe.train.train_iters):
        update_num_microbatches(consumed, consistency_check=True)
        batch = get_current_global_batch_size()
        scheduler.step(increment=batch)
        consumed += batch
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("ramp", [[4, 4, 16], [2, 2, 30], [2, 2, 0], [2, 3, 7]])
def test_the_ramp_up_arithmetic_is_megatron_cores(tmp_path, calculator, ramp):
    recipe = mock(tmp_path, f"train.rampup_batch_size={ramp}", "train.micro_batch_size=1")
    calculator(recipe)
    consumed = 0
    for step in range(1, 12):
        for samples in range(consumed, consumed + 9):  # also the counts no step reaches
            update_num_microbatches(samples, consistency_check=False)
            assert global_batch_at(recipe.train, samples) == get_current_global_batch_size(), (ramp, samples)
        update_num_microbatches(consumed, consistency_check=False)
        consumed += get_current_global_batch_size()
        assert samples_by_step(recipe.train, step) == consumed, (ramp, step)


def test_under_ramp_up_warmup_and_decay_end_at_the_recipe_steps(tmp_path, calculator):
    """mock_tiny: lr 3e-3, min_lr 3e-4, warmup 2 steps, cosine to step 6; batches 4, 4, 4, 4, 8, 8.
    Set in samples of the full batch, warmup would peak at step 4 and decay end at 1.65e-3."""
    recipe = mock(tmp_path, *RAMP)
    calculator(recipe)
    lrs = lr_per_step(recipe)
    assert lrs[:2] == pytest.approx([1.5e-3, 3e-3])  # warmup over the first 8 samples
    assert lrs[-1] == pytest.approx(3e-4)  # min_lr at train.train_iters
    assert lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)
    # wsd: the final decay (here its last 2 steps, 16 samples at the full batch) also ends at step 6
    wsd = mock(tmp_path, *RAMP, 'schedule.decay_style="wsd"', "schedule.wsd_decay_iters=2")
    calculator(wsd)
    lrs = lr_per_step(wsd)
    assert lrs[1:4] == pytest.approx([3e-3] * 3) and lrs[4] < 3e-3 and lrs[5] == pytest.approx(3e-4)


def test_the_dry_run_counts_the_tokens_a_ramp_up_trains(tmp_path):
    recipe = mock(tmp_path, *RAMP)
    assert samples_by_step(recipe.train, 6) == 32  # 4 + 4 + 4 + 4 + 8 + 8
    report = describe(recipe, Layout.from_recipe(recipe, 1))
    assert "training tokens  6 steps, ramping up to 512 = 2,048 (2.05K)" in report
    assert "data: mock (random tokens), 2.05K tokens" in report


def test_evaluation_during_ramp_up_runs_full_global_batches(tmp_path, calculator, monkeypatch):
    """As Megatron-LM's: eval.iters × train.global_batch_size samples, whatever the batch of the moment."""
    recipe = mock(tmp_path, *RAMP)
    calculator(recipe)
    update_num_microbatches(0, consistency_check=False)
    assert get_num_microbatches() == 2  # training runs batches of 4 = 2 micro-batches of 2 now

    class Chunk:
        def eval(self):
            pass

        def train(self):
            pass

    trainer = Trainer.__new__(Trainer)  # no process group needed: the schedule is recorded, not run
    trainer.model, trainer.layout = [Chunk()], Layout.from_recipe(recipe, 1)
    asked = []

    def run_schedule(data_iterator, num_microbatches, forward_only):
        asked.append((num_microbatches, forward_only))
        return [{"lm loss": torch.tensor([2.0 * num_microbatches, num_microbatches])}]

    trainer.run_schedule = run_schedule
    monkeypatch.setattr(trainer_module, "reduce_losses", lambda losses: losses[0]["lm loss"].double())
    assert trainer.evaluate(lambda: iter(()), iters=3) == pytest.approx(2.0)
    assert asked == [(4, True)] * 3


@pytest.mark.parametrize(
    "resume_with",
    [
        RAMP,  # the same batches: the lr continues exactly
        ("train.global_batch_size=16",),
        ("train.global_batch_size=4",),
        ("train.rampup_batch_size=[2, 2, 40]",),
        ("train.rampup_batch_size=[2, 2, 40]", "model.seq_length=32"),
    ],
)
def test_a_resume_with_other_batches_keeps_the_schedule_at_its_steps(tmp_path, calculator, resume_with):
    """Saved at step 3 of a ramp-up run (batches 4, 4, 4: 12 samples); resumed with other batches,
    the scheduler set as bigpt sets it (the checkpoint's samples restored) decays to min_lr at
    train.train_iters (step 6), not before or after; with the same batches, the lr continues
    where it was (with others it follows their share of the remaining schedule)."""
    from bigpt.layout import Resumed

    before = mock(tmp_path, *RAMP)
    calculator(before)
    saved_lr = lr_per_step(before)[2]
    resumed = Resumed(iteration=3, consumed_samples=12, consumed_tokens=12 * 64, seq_length=64, train=before.train)
    after = mock(tmp_path, *resume_with)
    calculator(after)
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.0)
    scheduler = build_scheduler(after, optimizer, resumed)
    scheduler.step(increment=resumed.consumed_samples)  # the checkpoint's position (load_state_dict)
    if resume_with == RAMP:
        assert optimizer.param_groups[0]["lr"] == pytest.approx(saved_lr)
    consumed, lrs = resumed.consumed_samples, []
    for _ in range(after.train.train_iters - resumed.iteration):
        update_num_microbatches(consumed, consistency_check=True)
        scheduler.step(increment=get_current_global_batch_size())
        consumed += get_current_global_batch_size()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == sorted(lrs, reverse=True) and lrs[-2] > 3e-4
    assert lrs[-1] == pytest.approx(3e-4)
