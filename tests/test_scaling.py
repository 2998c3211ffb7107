"""The scaling-law fit (bigpt/scaling.py): it recovers Chinchilla's published law from synthetic
losses, refuses what cannot be fitted in one paragraph each, and the planner uses a fitted law."""

import json

import numpy as np
import pytest

from bigpt.errors import BigptError
from bigpt.layout import samples_by_step
from bigpt.recipe import load_recipe
from bigpt.scaling import LAW_FORMAT, Point, ScalingLaw, fit_law, read_points_csv, scaling_parameters

CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
"""Hoffmann et al. 2022's fitted constants (approach 3)."""


def chinchilla_points(seed: int = 1, noise: float = 0.01) -> list[Point]:
    """A Chinchilla-like IsoFLOP grid: nine budgets from 6e18 to 3e21 FLOPs (the paper's), forty
    sizes from 40M to 16B parameters each, kept where they train for 1 to 1000 tokens per
    parameter; losses from the published law with ``noise`` relative Gaussian noise."""
    generator = np.random.default_rng(seed)
    points = []
    for flops in np.geomspace(6e18, 3e21, 9):
        for parameters in np.geomspace(4e7, 1.6e10, 40):
            tokens = flops / (6 * parameters)
            if 1 <= tokens / parameters <= 1000:
                loss = CHINCHILLA.loss(parameters, tokens) * (1 + noise * generator.standard_normal())
                points.append(Point(parameters, tokens, loss))
    return points


@pytest.fixture(scope="module")
def chinchilla_fit():
    return fit_law(chinchilla_points(), "synthetic", budget=5.76e23, resamples=40)


def test_the_fit_recovers_chinchillas_law_from_noisy_losses(chinchilla_fit):
    """Part 4 of issue 30: α and β within 0.02, E within 2%, and the bootstrap's 95% intervals
    cover the truth; approach 2's exponent agrees with the law's β / (α + β)."""
    law = chinchilla_fit.law
    assert law.alpha == pytest.approx(CHINCHILLA.alpha, abs=0.02)
    assert law.beta == pytest.approx(CHINCHILLA.beta, abs=0.02)
    assert law.E == pytest.approx(CHINCHILLA.E, rel=0.02)
    assert chinchilla_fit.resamples >= 30
    for name in ("E", "A", "B", "alpha", "beta"):
        low, high = chinchilla_fit.intervals[name]
        assert low <= getattr(CHINCHILLA, name) <= high, name
    exponent = CHINCHILLA.beta / (CHINCHILLA.alpha + CHINCHILLA.beta)
    assert chinchilla_fit.isoflop.a == pytest.approx(exponent, abs=0.03)
    # Chinchilla's own budget: the paper's law puts about 40B parameters there (its table A3)
    best_n, best_d = CHINCHILLA.optimal(5.76e23)
    assert 6 * best_n * best_d == pytest.approx(5.76e23)
    assert chinchilla_fit.budget["optimal_parameters"] == pytest.approx(best_n, rel=0.5)
    low, high = chinchilla_fit.intervals["loss"]
    assert low <= CHINCHILLA.loss(best_n, best_d) <= high


def test_the_optimum_minimises_the_law_along_its_budget():
    best_n, best_d = CHINCHILLA.optimal(1e21)
    for factor in (0.8, 1.25):
        assert CHINCHILLA.loss(best_n * factor, best_d / factor) > CHINCHILLA.loss(best_n, best_d)


def test_too_few_points_are_refused():
    points = chinchilla_points()[:5]
    with pytest.raises(BigptError, match="has 5 point.*more than 5"):
        fit_law(points, "results.csv")


def test_non_finite_losses_are_named():
    points = chinchilla_points()
    points[3] = Point(points[3].parameters, points[3].tokens, float("nan"), "w64-c1e18")
    with pytest.raises(BigptError, match="non-finite or non-positive.*w64-c1e18"):
        fit_law(points, "ladder/")


def test_losses_that_do_not_follow_the_law_do_not_converge():
    """Losses that rise with size and tokens: no positive α and β describe them, and the fit says
    so instead of printing numbers."""
    points = [Point(n, d, 2 + 1e-6 * n**0.5 + 1e-6 * d**0.5) for n in (1e6, 3e6, 1e7, 3e7) for d in (1e8, 1e9, 1e10)]
    with pytest.raises(BigptError, match="did not converge"):
        fit_law(points, "ladder/", resamples=0)


def test_a_csv_of_results_is_read_and_checked(tmp_path):
    good = tmp_path / "results.csv"
    good.write_text("name,params,tokens,loss\na,1e6,2e7,3.5\n")
    assert read_points_csv(good) == [Point(1e6, 2e7, 3.5, "a")]
    bad = tmp_path / "bad.csv"
    bad.write_text("params,tokens\n1,2\n")
    with pytest.raises(BigptError, match="lacks the column.*loss"):
        read_points_csv(bad)
    bad.write_text("params,tokens,loss\n1e6,lots,3\n")
    with pytest.raises(BigptError, match="line 2: params, tokens and loss must be numbers"):
        read_points_csv(bad)


def test_the_planner_replaces_chinchillas_rule_with_a_fitted_law(tmp_path, capsys):
    """tools/plan.py --law: the compute-optimal allocation of the recipe's budget and the predicted
    loss of the recipe as written, by the law in the JSON."""
    from tools import plan as plan_tool

    law = ScalingLaw(E=1.8, A=500.0, B=400.0, alpha=0.35, beta=0.3, largest_fitted_flops=1e19)
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"format": LAW_FORMAT, "law": vars(law)}))
    recipe = "recipes/llama3_8b.toml"
    assert plan_tool.main([recipe, "--gpus", "64", "--law", str(path)]) == 0
    text = capsys.readouterr().out
    loaded = load_recipe(recipe)
    tokens = samples_by_step(loaded.train, loaded.train.train_iters) * loaded.model.seq_length
    parameters = scaling_parameters(loaded.model)
    best_n, best_d = law.optimal(6 * parameters * tokens)
    assert f"N = {best_n:.3g}, D = {best_d:.3g} tokens" in text
    assert f"this recipe as written: predicted loss {law.loss(parameters, tokens):.4f}" in text
    assert "Chinchilla" not in text
    assert "an extrapolation " in text and "× beyond the largest run fitted" in text
    path.write_text("{}")
    assert plan_tool.main([recipe, "--gpus", "64", "--law", str(path)]) == 2
    assert "is not a scaling-law fit" in capsys.readouterr().err


def test_scaling_parameters_leave_out_the_input_embedding_only():
    model = load_recipe("recipes/llama3_8b.toml").model
    from bigpt.flops import num_parameters

    assert num_parameters(model) - scaling_parameters(model) == model.vocab_size * model.hidden_size
