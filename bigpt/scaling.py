"""Scaling laws fitted to one's own runs: Chinchilla's L(N, D) = E + A / N^α + B / D^β.

Approach 3 of Hoffmann et al. 2022 (appendix D.2), as the paper fits it: the Huber loss (δ = 1e-3)
of log L against log(exp(a - α log N) + exp(b - β log D) + exp(e)), with A = exp(a), B = exp(b),
E = exp(e), minimised by L-BFGS from a grid of starting points. Approach 2: per compute budget, a
parabola of the loss in log N, whose minimum is that budget's compute-optimal size; N_opt ∝ C^a.
Intervals: the percentile bootstrap over the points (Besiroglu et al. 2024 refit the paper's own
data this way). The law is written to JSON, which ``tools/plan.py --law`` reads.

N is ``scaling_parameters``: the parameters a token's forward pass multiplies by (see there), so
that C = 6ND is the training compute the FLOPs log counts, less attention's score term.
"""

import dataclasses
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bigpt.errors import BigptError
from bigpt.flops import num_parameters
from bigpt.recipe import ModelConfig

LAW_FORMAT = "bigpt scaling law 1"
HUBER_DELTA = 1e-3
LAW_PARAMETERS = ("E", "A", "B", "alpha", "beta")
PARAMETERS_COUNTED = (
    "N = parameters a token's forward pass multiplies by: all of them but the input embedding table "
    "(a lookup costs no FLOPs; a tied table counts once, as the output layer), so C = 6ND"
)
# Hoffmann et al.'s grid of starting points (appendix D.2): α, β, e, a, b.
START_GRID = (
    np.arange(0.0, 2.01, 0.5),
    np.arange(0.0, 2.01, 0.5),
    np.arange(-1.0, 1.01, 0.5),
    np.arange(0.0, 25.1, 5.0),
    np.arange(0.0, 25.1, 5.0),
)
REFINED_STARTS = 12
"""Grid points (the lowest objective first) that L-BFGS refines; the rest of the grid's 4,500 only
rank them, which costs one vectorised evaluation instead of 4,500 optimisations."""
BUDGET_TOLERANCE = 0.1
"""Points whose compute 6ND differs by less than this fraction share a budget (approach 2)."""


def scaling_parameters(model: ModelConfig) -> int:
    """N of a scaling law: the parameters minus the input embedding table (and learned positions),
    the output layer kept (tied or not). Each counted parameter is one multiply-add per token in the
    forward pass, so 6ND is the training compute (attention's scores aside); an embedding lookup
    costs none. Kaplan et al. left out the output layer too, which bends small models' laws (Pearce
    & Song 2024); Chinchilla counted the input table, which dominates a small model's count."""
    positions = model.max_position_embeddings or model.seq_length
    learned = positions * model.hidden_size if model.position_embedding == "learned" else 0
    input_table = 0 if model.tie_embeddings else model.vocab_size * model.hidden_size
    return num_parameters(model) - input_table - learned


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^α + B / D^β, N as ``scaling_parameters`` counts it, D in tokens."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    largest_fitted_flops: float | None = None
    """The largest compute 6ND among the runs fitted: predictions far beyond it are extrapolations."""

    def loss(self, parameters: float, tokens: float) -> float:
        return self.E + self.A / parameters**self.alpha + self.B / tokens**self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising the loss at compute C = 6ND (Hoffmann et al. eq. 4):
        N = G (C/6)^(β/(α+β)), D = (C/6)^(α/(α+β)) / G, G = (αA / βB)^(1/(α+β))."""
        total = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / total)
        return g * (flops / 6) ** (self.beta / total), (flops / 6) ** (self.alpha / total) / g


@dataclass(frozen=True)
class Point:
    """One finished run: its parameters (``scaling_parameters``), tokens and final loss."""

    parameters: float
    tokens: float
    loss: float
    name: str = ""

    @property
    def flops(self) -> float:
        return 6 * self.parameters * self.tokens


@dataclass(frozen=True)
class IsoFlop:
    """Approach 2: each budget's compute-optimal size (a parabola's minimum), and N_opt ∝ C^a."""

    budgets: list[dict]
    """Per budget: flops, optimal_parameters, and whether that minimum lies inside the sizes run."""
    a: float
    """N_opt ∝ C^a; D_opt ∝ C^(1-a)."""
    coefficient: float
    """N_opt = coefficient × C^a."""

    def optimal(self, flops: float) -> tuple[float, float]:
        parameters = self.coefficient * flops**self.a
        return parameters, flops / (6 * parameters)


@dataclass
class Fit:
    """A fitted law, its bootstrap intervals, and approach 2's answer where the points allow it."""

    law: ScalingLaw
    points: list[Point]
    objective: float
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """95% percentile-bootstrap intervals of the law's parameters, and of the budget's answers."""
    resamples: int = 0
    """Bootstrap resamples whose fit converged (the intervals' sample)."""
    isoflop: IsoFlop | None = None
    isoflop_problem: str | None = None
    """Why approach 2 gave no answer (too few sizes per budget, ...)."""
    budget: dict | None = None
    """With a budget: flops, optimal_parameters, optimal_tokens, loss (approach 3), and approach 2's N and D."""

    def to_json(self) -> dict:
        return {
            "format": LAW_FORMAT,
            "law": asdict(self.law),
            "parameters_counted": PARAMETERS_COUNTED,
            "loss_formula": "L(N, D) = E + A / N^alpha + B / D^beta",
            "points": [asdict(point) for point in self.points],
            "huber_objective": self.objective,
            "intervals_95": {name: list(bounds) for name, bounds in self.intervals.items()},
            "bootstrap_resamples": self.resamples,
            "isoflop": asdict(self.isoflop) if self.isoflop else None,
            "isoflop_problem": self.isoflop_problem,
            "budget": self.budget,
        }


def check_points(points: list[Point], source: str) -> None:
    """Points a law can be fitted to: finite and positive, more of them than the law's five
    parameters, at least three sizes and three token counts (else α or β is not determined)."""
    bad = [p for p in points if not all(math.isfinite(v) and v > 0 for v in (p.parameters, p.tokens, p.loss))]
    if bad:
        named = ", ".join(
            f"{p.name or 'row'} (params {p.parameters:g}, tokens {p.tokens:g}, loss {p.loss:g})" for p in bad[:5]
        )
        raise BigptError(
            f"{source}: {len(bad)} point(s) have a non-finite or non-positive value: {named}; a diverged run "
            "has no loss to fit. Remove them (or rerun those runs), then fit again."
        )
    if len(points) <= len(LAW_PARAMETERS):
        raise BigptError(
            f"{source} has {len(points)} point(s): fitting L(N, D) = E + A/N^α + B/D^β's "
            f"{len(LAW_PARAMETERS)} parameters needs more than {len(LAW_PARAMETERS)} (a ladder of several sizes "
            "at several budgets has dozens); run more of the ladder, or add rows."
        )
    sizes, tokens = {p.parameters for p in points}, {p.tokens for p in points}
    if len(sizes) < 3 or len(tokens) < 3:
        raise BigptError(
            f"{source} has {len(sizes)} model size(s) and {len(tokens)} token count(s): α needs at least three "
            "sizes and β three token counts; plan the ladder with more sizes or budgets."
        )


def _objective(theta: np.ndarray, log_n, log_d, log_loss, gradient: bool = False):
    """Sum over points of Huber(log predicted − log L); theta's last axis is (a, b, e, α, β). With
    ``gradient`` (one theta): (objective, its gradient)."""
    a, b, e, alpha, beta = (theta[..., i : i + 1] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e + 0 * log_n))
    top = terms.max(0)
    weights = np.exp(terms - top)
    total = weights.sum(0)
    residual = top + np.log(total) - log_loss
    small = np.abs(residual) <= HUBER_DELTA
    huber = np.where(small, 0.5 * residual**2, HUBER_DELTA * (np.abs(residual) - 0.5 * HUBER_DELTA)).sum(-1)
    if not gradient:
        return huber
    slope = np.where(small, residual, HUBER_DELTA * np.sign(residual))  # dHuber/dresidual
    size, tokens, constant = slope * weights / total  # dresidual/d(a, b, e) are the softmax weights
    return huber, np.array([size.sum(), tokens.sum(), constant.sum(), -(size * log_n).sum(), -(tokens * log_d).sum()])


def _minimise(start: np.ndarray, data) -> tuple[np.ndarray, float, bool]:
    """L-BFGS from ``start``: (theta, objective, converged)."""
    from scipy.optimize import minimize

    with np.errstate(over="ignore", invalid="ignore"):
        result = minimize(
            _objective,
            start,
            args=(*data, True),
            jac=True,
            method="L-BFGS-B",
            # The objective is tiny (each point adds about δ × its residual): tolerances on its scale.
            options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12 * len(data[0])},
        )
    converged = bool(result.success and np.isfinite(result.x).all() and math.isfinite(result.fun))
    return result.x, float(result.fun), converged


def _data(points: list[Point]):
    return (
        np.log([p.parameters for p in points]),
        np.log([p.tokens for p in points]),
        np.log([p.loss for p in points]),
    )


def _fit_theta(points: list[Point], starts: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """The best converged L-BFGS result from ``starts`` (ranked by their objective, the best
    REFINED_STARTS refined); else the best unconverged one, flagged."""
    data = _data(points)
    ranked = np.argsort(_objective(starts, *data), kind="stable")
    results = [_minimise(starts[i], data) for i in ranked[:REFINED_STARTS]]
    converged = [r for r in results if r[2]]
    return min(converged or results, key=lambda r: r[1])


def _law(theta: np.ndarray) -> ScalingLaw:
    with np.errstate(over="ignore"):
        a, b, e = (float(v) for v in np.exp(theta[:3]))  # inf for a fit that ran away
    return ScalingLaw(E=e, A=a, B=b, alpha=float(theta[3]), beta=float(theta[4]))


def _theta(law: ScalingLaw) -> np.ndarray:
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


def _settled(law: ScalingLaw) -> bool:
    """Exponents a law can use: a fit that ran α or β to 0 (the term is a constant, E's double) or
    past 3 has not found the curvature it needs."""
    return (
        0.01 < law.alpha < 3
        and 0.01 < law.beta < 3
        and all(math.isfinite(getattr(law, name)) for name in LAW_PARAMETERS)
    )


def fit_law(
    points: list[Point], source: str, *, budget: float | None = None, resamples: int = 200, seed: int = 0
) -> Fit:
    """Approach 3 (with bootstrap intervals), approach 2 where the points allow it, and with
    ``budget`` (FLOPs) the compute-optimal N and D and the loss predicted there. ``source`` names
    the points in messages."""
    check_points(points, source)
    starts = np.array(list(itertools.product(*START_GRID)))[:, [3, 4, 2, 0, 1]]  # (a, b, e, α, β)
    theta, objective, converged = _fit_theta(points, starts)
    law = _law(theta)
    if not converged or not _settled(law):
        raise BigptError(
            f"the fit of L(N, D) to {source} did not converge (best: E {law.E:.3g}, A {law.A:.3g}, B {law.B:.3g}, "
            f"α {law.alpha:.3g}, β {law.beta:.3g}): the losses do not fall with size and tokens as the law "
            "needs. Check that the runs finished and trained (a loss near log(vocab) learned nothing), and "
            "that the sizes and budgets span at least 4× each; then fit again."
        )
    fit = Fit(dataclasses.replace(law, largest_fitted_flops=max(p.flops for p in points)), points, objective)
    try:
        fit.isoflop = fit_isoflop(points)
    except BigptError as err:
        fit.isoflop_problem = str(err)
    samples = _bootstrap(points, theta, resamples, seed) if resamples else []
    if budget is not None:
        n, d = law.optimal(budget)
        fit.budget = {"flops": budget, "optimal_parameters": n, "optimal_tokens": d, "loss": law.loss(n, d)}
        if fit.isoflop:
            fit.budget["isoflop_parameters"], fit.budget["isoflop_tokens"] = fit.isoflop.optimal(budget)
    if len(samples) >= 10:
        fit.resamples = len(samples)
        columns = {name: [getattr(s, name) for s in samples] for name in LAW_PARAMETERS}
        if budget is not None:
            optima = [s.optimal(budget) for s in samples]
            columns["optimal_parameters"] = [n for n, _ in optima]
            columns["optimal_tokens"] = [d for _, d in optima]
            columns["loss"] = [s.loss(n, d) for s, (n, d) in zip(samples, optima)]
        fit.intervals = {
            name: (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))
            for name, values in columns.items()
        }
    return fit


def _bootstrap(points: list[Point], theta: np.ndarray, resamples: int, seed: int) -> list[ScalingLaw]:
    """Laws refitted to ``resamples`` resamplings of the points (with replacement), each from the
    full fit's optimum; resamples too narrow to fit (under three sizes) or not converging are left out."""
    generator = np.random.default_rng(seed)
    laws = []
    for _ in range(resamples):
        sample = [points[i] for i in generator.integers(0, len(points), len(points))]
        if len({p.parameters for p in sample}) < 3 or len({p.tokens for p in sample}) < 3:
            continue
        result, _, converged = _fit_theta(sample, theta[None, :])
        if converged and _settled(law := _law(result)):
            laws.append(law)
    return laws


def budgets_of(points: list[Point]) -> list[list[Point]]:
    """The points grouped by compute 6ND: sorted, a new group where the compute grows by more than
    BUDGET_TOLERANCE over the group's first."""
    groups: list[list[Point]] = []
    for point in sorted(points, key=lambda p: p.flops):
        if groups and point.flops <= groups[-1][0].flops * (1 + BUDGET_TOLERANCE):
            groups[-1].append(point)
        else:
            groups.append([point])
    return groups


def fit_isoflop(points: list[Point]) -> IsoFlop:
    """Approach 2: a parabola of the loss in log N per budget of three sizes or more (its minimum
    is the budget's optimal size), then log N_opt = a log C + k by least squares."""
    budgets = []
    for group in budgets_of(points):
        log_n = np.log([p.parameters for p in group])
        if len(set(log_n)) < 3:
            continue
        curvature, slope, _ = np.polyfit(log_n, [p.loss for p in group], 2)
        if curvature <= 0:
            continue  # no minimum: the budget's sizes all sit on one side of it, or the losses are noise
        best = -slope / (2 * curvature)
        flops = float(np.exp(np.mean(np.log([p.flops for p in group]))))
        budgets.append(
            {
                "flops": flops,
                "optimal_parameters": float(math.exp(best)),
                "inside": bool(log_n.min() <= best <= log_n.max()),
            }
        )
    if len(budgets) < 2:
        raise BigptError(
            f"approach 2 needs two budgets each with three or more sizes and a loss minimum among them; "
            f"{len(budgets)} qualify"
        )
    a, k = np.polyfit(np.log([b["flops"] for b in budgets]), np.log([b["optimal_parameters"] for b in budgets]), 1)
    return IsoFlop(budgets, float(a), float(math.exp(k)))


def read_points_csv(path) -> list[Point]:
    """Points from a CSV with columns params, tokens, loss (others, such as name, are kept or ignored)."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"params", "tokens", "loss"} - set(reader.fieldnames or ())
        if missing:
            raise BigptError(
                f"{path} lacks the column(s) {', '.join(sorted(missing))}: a results CSV has a header line with "
                "params, tokens and loss (parameters as bigpt counts them, training tokens, final validation loss)."
            )
        points = []
        for line, row in enumerate(reader, start=2):
            try:
                parameters, tokens, loss = (float(row[key]) for key in ("params", "tokens", "loss"))
            except (TypeError, ValueError):
                raise BigptError(
                    f"{path} line {line}: params, tokens and loss must be numbers, not "
                    f"{row.get('params')!r}, {row.get('tokens')!r}, {row.get('loss')!r}."
                ) from None
            points.append(Point(parameters, tokens, loss, name=row.get("name") or f"line {line}"))
    return points


def load_law(path) -> ScalingLaw:
    """The law of a fit's JSON (``tools/ladder.py fit`` writes it)."""
    key = f"--law {path}"
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BigptError(f"{key} does not exist; fit one with `tools/ladder.py fit DIR`.") from None
    except IsADirectoryError:
        raise BigptError(f"{key} is a directory; name the fit's .json file.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BigptError(f"{key} is not JSON ({err}); name the .json file `tools/ladder.py fit` wrote.") from None
    law = document.get("law") if isinstance(document, dict) else None
    if not (isinstance(document, dict) and document.get("format") == LAW_FORMAT and isinstance(law, dict)):
        raise BigptError(
            f"{key} is not a scaling-law fit ({LAW_FORMAT!r}); name the .json `tools/ladder.py fit` wrote."
        )
    try:
        result = ScalingLaw(
            **{name: float(law[name]) for name in LAW_PARAMETERS},
            largest_fitted_flops=float(law["largest_fitted_flops"]) if law.get("largest_fitted_flops") else None,
        )
    except (KeyError, TypeError, ValueError):
        raise BigptError(
            f"{key}: its law lacks one of {', '.join(LAW_PARAMETERS)} as a number; fit it again."
        ) from None
    if not _settled(result) or min(result.E, result.A, result.B) <= 0:
        raise BigptError(f"{key}: its law ({result}) has no positive, finite constants and exponents; fit it again.")
    return result
