"""The mixed model of the per-seed differences (report/mixed.py) and the intervals built on it (stats.model_intervals):
REML against a dense reference, and coverage by simulation of the design's correlation and heteroscedasticity."""

import numpy as np
import pytest
from scipy import optimize, stats

from gridlab.report import mixed
from gridlab.report import stats as S

from report_synthetic import design_noise

RATIOS, BUDGETS = 4, 4
# The design's correlation, from mild to the worst we found for Satterthwaite alone: every seed effect (seed, seed ×
# budget) large against the cell-specific noise, as in the default study ("a grid-wide per-budget effect about 3
# pooled standard errors wide"), or no seed effect at all.
SCENARIOS = {
    "design": {},
    "seed dominates": dict(sd_seed=0.1, sd_seed_ratio=0.005, sd_seed_budget=0.01, sd_residual=0.01),
    "seed × budget dominates": dict(sd_seed=0.0, sd_seed_ratio=0.0, sd_seed_budget=0.08, sd_residual=0.01,
                                    growth=2.0),
    "no seed effect": dict(sd_seed=0.0, sd_seed_ratio=0.0, sd_seed_budget=0.0, sd_residual=0.05),
}


def by_budget(noise: np.ndarray) -> np.ndarray:
    """design_noise (reps, methods, seeds, ratios × budgets) → the model's rows (reps · methods · budgets, seeds,
    ratios): one row per family and budget, as stats.gap_table builds them."""
    reps, methods, seeds, _ = noise.shape
    shaped = noise.reshape(reps, methods, seeds, RATIOS, BUDGETS)
    return shaped.transpose(0, 1, 4, 2, 3).reshape(reps * methods * BUDGETS, seeds, RATIOS)


def _dense_reml(y: np.ndarray, layout: mixed.Layout):
    """The textbook REML quantities with the full N × N covariance of one row (the reference)."""
    gamma = layout.gamma()
    observed = [(s, i) for s in range(y.shape[0]) for i in range(y.shape[1]) if not np.isnan(y[s, i])]
    x = np.array([[1.0 if i == j else 0.0 for j in range(y.shape[1])] for _, i in observed])
    values = np.array([y[s, i] for s, i in observed])
    same_seed = np.array([[s == t for t, _ in observed] for s, _ in observed])
    g = [np.where(same_seed, gamma[k][np.ix_([i for _, i in observed], [i for _, i in observed])], 0.0)
         for k in range(layout.k)]

    def pieces(theta):
        v = sum(t * gk for t, gk in zip(theta, g, strict=True))
        vi = np.linalg.inv(v)
        c = np.linalg.inv(x.T @ vi @ x)
        p = vi - vi @ x @ c @ x.T @ vi
        return v, vi, c, p

    def minus_reml(theta):
        v, vi, c, p = pieces(theta)
        sign, logdet = np.linalg.slogdet(v)
        if sign <= 0:
            return 1e10
        return 0.5 * (logdet + np.linalg.slogdet(x.T @ vi @ x)[1] + values @ p @ values)

    return pieces, minus_reml, g, x, values


@pytest.mark.parametrize("linked", [False, True])
def test_reml_matches_the_dense_likelihood_with_missing_seeds(linked):
    rng = np.random.default_rng(0)
    if linked:  # three ratios × two budgets in one covariance (the design's full model)
        ratio, budget = np.repeat(np.arange(3), 2), np.tile(np.arange(2), 3)
        noise = design_noise(rng, 1, 4, 3, 2)[0, 0]
    else:
        ratio, budget = np.arange(4), np.zeros(4, int)
        noise = design_noise(rng, 1, 4, 4, 1)[0, 0]
    y = noise + np.linspace(-0.3, 0.3, len(ratio))
    y[1, 0] = y[3, 2] = np.nan  # two seeds miss a cell each: GLS, not plain means
    layout = mixed.layout(ratio, budget)
    fit = mixed.fit(y[None], layout)
    assert fit.converged[0]
    pieces, minus_reml, g, x, values = _dense_reml(y, layout)
    _, vi, c, p = pieces(fit.theta[0])
    assert fit.mean[0] == pytest.approx(c @ x.T @ vi @ values, abs=1e-10)
    assert fit.variance[0] == pytest.approx(np.diag(c), rel=1e-8)
    # REML stationary in every free component (a component at its bound may have a negative score).
    score = np.array([-0.5 * np.trace(p @ gk) + 0.5 * values @ p @ gk @ p @ values for gk in g])
    free = (fit.theta[0] > 1e-9) | layout.signed
    scale = np.abs(score).max() + 1
    assert np.abs(score[free]).max() < 1e-4 * scale
    # …and its optimum: no better point nearby (bounded as the model bounds it).
    bounds = [(None, None) if signed else (1e-12, None) for signed in layout.signed]
    best = optimize.minimize(minus_reml, np.maximum(fit.theta[0], 1e-6), method="L-BFGS-B", bounds=bounds)
    assert minus_reml(fit.theta[0]) <= best.fun + 1e-6
    # Satterthwaite from the dense information.
    information = np.array([[0.5 * np.trace(p @ gk @ p @ gl) for gl in g] for gk in g])
    gradient = np.array([[(c @ x.T @ vi @ gk @ vi @ x @ c)[i, i] for gk in g] for i in range(len(ratio))])
    dof = 2 * np.diag(c) ** 2 / np.einsum("ik,kl,il->i", gradient, np.linalg.pinv(information), gradient)
    assert fit.dof[0] == pytest.approx(np.minimum(dof, fit.reml_dof[0]), rel=1e-6)


def test_complete_seeds_give_the_plain_means_and_the_mean_per_cell_variance():
    """With every seed complete, the compound-symmetric model's cell means are the seed means and its variance of
    one seed's difference is the mean of the per-cell variances over the budget's ratios (the unbiased ANOVA
    estimate, also when the seed effect comes out negative)."""
    rng = np.random.default_rng(1)
    y = by_budget(design_noise(rng, 50, 3, RATIOS, BUDGETS))
    result = S.model_intervals(y)
    assert result["fitted"].all()
    assert result["gap"] == pytest.approx(y.mean(axis=1), abs=1e-9)
    per_cell = y.var(axis=1, ddof=1).mean(axis=1, keepdims=True)
    assert result["marginal"] == pytest.approx(np.broadcast_to(per_cell, result["marginal"].shape), rel=1e-6)
    assert (result["seed"] < 0).any()  # negative seed components happen, and are kept
    assert result["se"] == pytest.approx(np.sqrt(result["marginal"] / 3), rel=1e-6)


def test_a_single_ratio_is_the_cells_own_paired_t():
    rng = np.random.default_rng(2)
    y = rng.normal(0, 1, (5, 4, 1))
    result = S.model_intervals(y)
    assert result["se"][:, 0] == pytest.approx(y[:, :, 0].std(axis=1, ddof=1) / 2, rel=1e-6)
    assert result["dof"][:, 0] == pytest.approx(np.full(5, 3.0))  # harmonic mean of 3 and 3


def test_cells_with_one_seed_have_no_interval_but_inform_the_others():
    y = np.array([[[0.3, 0.2, 0.6], [0.1, np.nan, 0.3], [0.0, np.nan, 0.2], [0.05, np.nan, 0.25]]])
    result = S.model_intervals(y)
    assert np.isnan(result["se"][0, 1]) and np.isfinite(result["gap"][0, 1])
    assert np.isfinite(result["se"][0, [0, 2]]).all()
    # The lone seed's value is adjusted by its seed effect seen in the other cells (GLS), not taken as is.
    assert result["gap"][0, 1] != pytest.approx(0.2)


def _coverage(seeds: int, reps: int, rng, missing: float = 0.0, **scenario) -> tuple[np.ndarray, np.ndarray]:
    """Whether each cell's 95 % interval holds the true gap 0, for `reps` replicates: (reps, budgets, ratios)
    booleans and the cells that had an interval."""
    y = by_budget(design_noise(rng, reps, seeds, RATIOS, BUDGETS, **scenario))
    if missing:
        drop = rng.random(y.shape) < missing
        drop[:, 0] = False  # every cell keeps one seed at least
        y = np.where(drop, np.nan, y)
    result = S.model_intervals(y)
    half = S.half_width(result["se"], result["dof"])
    has = np.isfinite(half)
    covered = np.abs(result["gap"]) <= half
    return covered.reshape(reps, BUDGETS, RATIOS), has.reshape(reps, BUDGETS, RATIOS)


@pytest.mark.parametrize("seeds", [2, 3, 5])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_intervals_cover_under_the_designs_correlation(seeds, scenario):
    """95 % intervals hold the true gap in ≥ 93 % of 2,000 replicates × 16 cells, at every budget (the spread grows
    1.5× per budget), for 2, 3 and 5 seeds, whatever share the seed effects take."""
    covered, has = _coverage(seeds, 2000, np.random.default_rng(seeds), **SCENARIOS[scenario])
    assert has.all()
    per_budget = covered.mean(axis=(0, 2))
    assert per_budget.min() >= 0.93, (scenario, seeds, per_budget)


def test_intervals_cover_with_missing_seeds():
    """A tenth of the (seed, cell) differences missing (1,000 replicates): the GLS means' intervals still cover."""
    for seeds in (3, 5):
        covered, has = _coverage(seeds, 1000, np.random.default_rng(10 + seeds), missing=0.1)
        assert has.mean() > 0.9
        per_budget = np.array([covered[:, b][has[:, b]].mean() for b in range(BUDGETS)])
        assert per_budget.min() >= 0.93, (seeds, per_budget)


def test_the_model_is_narrower_than_the_cells_own_t():
    """What the model buys over each cell's own paired t (3 seeds): some width where the seed effects are large (they
    are common to the budget's ratios, so pooling over ratios cannot shrink them), much where they are not."""
    for scenario, most in (("design", 0.92), ("no seed effect", 0.85)):
        rng = np.random.default_rng(4)
        y = by_budget(design_noise(rng, 500, 3, RATIOS, BUDGETS, **SCENARIOS[scenario]))
        result = S.model_intervals(y)
        model = S.half_width(result["se"], result["dof"])
        own = stats.t.ppf(0.975, 2) * y.std(axis=1, ddof=1) / np.sqrt(3)
        assert np.nanmean(model) < most * own.mean(), scenario
