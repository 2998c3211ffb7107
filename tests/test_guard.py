"""The bad-step policy on its own: what counts as a bad step, and when skipping turns into stopping."""

import pytest

from bigpt.errors import BigptError
from bigpt.recipe.tables import TrainConfig
from bigpt.train.guard import SPIKE_WARMUP, BadStepGuard


def guard(**keys) -> BadStepGuard:
    return BadStepGuard(TrainConfig(global_batch_size=8, train_iters=100, **keys))


def test_non_finite_loss_and_gradients_are_bad():
    g = guard()
    assert g.verdict(float("nan"), True) == "the loss is nan"
    assert g.verdict(float("inf"), True) == "the loss is inf"
    assert g.verdict(5.0, False) == "the gradients hold NaN or Inf"
    assert g.verdict(5.0, True) is None


def test_a_spike_is_judged_against_the_recent_mean_once_there_is_history():
    g = guard(loss_spike_factor=2.0)
    for step in range(1, SPIKE_WARMUP):
        g.record(step, 5.0, g.verdict(5.0, True))
    assert g.verdict(50.0, True) is None  # too little history to judge yet
    g.record(SPIKE_WARMUP, 5.0, None)
    assert g.verdict(9.9, True) is None
    assert "above train.loss_spike_factor = 2.0 times the mean of the last 10 steps (5.0000)" in g.verdict(10.1, True)
    assert guard().verdict(1e6, True) is None  # loss_spike_factor = 0: no spike detection


def test_skipping_stops_after_too_many_bad_steps_in_a_row():
    g = guard(max_skipped_steps=2)
    g.record(1, float("nan"), "the loss is nan")
    g.record(2, 5.0, None)  # a good step resets the count
    g.record(3, float("nan"), "the loss is nan")
    g.record(4, float("nan"), "the loss is nan")
    with pytest.raises(
        BigptError,
        match=r"step 5: the loss is nan; stopping \(3 bad steps in a row exceed "
        r"train.max_skipped_steps = 2\)",
    ):
        g.record(5, float("nan"), "the loss is nan")


def test_stop_policy_stops_at_the_first_bad_step():
    with pytest.raises(BigptError, match=r'stopping \(train.on_bad_step = "stop"\) without saving'):
        guard(on_bad_step="stop").record(7, 5.0, "the gradients hold NaN or Inf")


def test_a_guard_restored_from_its_state_judges_as_the_uninterrupted_one():
    losses = [5.0 - 0.01 * step for step in range(30)]
    losses[14] = losses[22] = 20.0  # spikes, judged only with the history before them
    losses[17] = float("nan")

    def decisions(g, steps):
        verdicts = []
        for step in steps:
            verdicts.append(g.verdict(losses[step], True))
            g.record(step, losses[step], verdicts[-1])
        return verdicts

    uninterrupted = decisions(guard(loss_spike_factor=2.0), range(30))
    assert [step for step, verdict in enumerate(uninterrupted) if verdict] == [14, 17, 22]
    before = guard(loss_spike_factor=2.0)
    first = decisions(before, range(18))  # stopped after the NaN: one bad step in a row
    resumed = guard(loss_spike_factor=2.0)
    resumed.load_state_dict(before.state_dict())
    assert first + decisions(resumed, range(18, 30)) == uninterrupted
    fresh = guard(loss_spike_factor=2.0)
    fresh.load_state_dict({})  # a checkpoint saved before the guard's state was
    assert decisions(fresh, range(18, 30)) == [None] * 12  # no history: the spike at 22 is missed
