"""Scaling fits and crossovers on synthetic curves whose crossover is known: interpolation, the power law, and the
linear gap in log tokens with its extrapolation bounds."""

import math

import numpy as np
import polars as pl
import pytest

from gridlab.report import scaling as F
from gridlab.report.stats import gap_table

from report_synthetic import power_law

BUDGETS = [1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000]


def _values(gap, budgets=BUDGETS, seeds=(0, 1, 2), noise=0.01, paired=True, setting=1, seed=0) -> pl.DataFrame:
    """Seed-level values whose gap pruned − random at budget B is gap(B): a shared per-seed offset in both arms,
    plus independent noise. With paired=False the random arm has other seeds."""
    rng = np.random.default_rng(seed)
    offsets = {s: rng.normal(0, 0.2) for s in (*seeds, *(s + 100 for s in seeds))}  # a seed's own level
    rows = []
    for budget in budgets:
        base = 3.0 - 0.1 * math.log(budget / 1e6)  # straight in log tokens: the power law does not apply
        for s in seeds:
            twin = s if paired else s + 100
            rows.append(dict(init="pruned", seed=s, budget_tokens=budget,
                             value=base + gap(budget) + offsets[s] + rng.normal(0, noise)))
            rows.append(dict(init="random", seed=twin, budget_tokens=budget,
                             value=base + offsets[twin] + rng.normal(0, noise)))
    return pl.DataFrame(rows).with_columns(granularity=pl.lit("depth"), method=pl.lit("m"), ratio=pl.lit(0.5),
                                           setting=pl.lit(setting), trained_tokens=pl.col("budget_tokens"))


def _crossover(values: pl.DataFrame) -> F.Crossover:
    gaps = gap_table(values, higher_is_better=False)
    (found,) = F.crossovers(values, gaps, parent_tokens=0, higher_is_better=False)
    return found


def _linear_gap(zero_at: float, slope: float = 0.2):
    """A gap linear in ln B that is 0 at `zero_at` (negative below it for a positive slope: pruning better)."""
    return lambda budget: slope * math.log(budget / zero_at)


def test_sign_change_inside_grid_is_interpolated_in_log_tokens():
    budgets = np.array([1e6, 1e7, 1e8, 1e9])
    planted = 10**7.25
    benefit = np.log10(planted) - np.log10(budgets)  # linear in log tokens, zero at the planted budget
    at, low, high = F.interpolate_sign_change(budgets, benefit)
    assert at == pytest.approx(planted, rel=1e-9) and (low, high) == (1e7, 1e8)
    assert F.interpolate_sign_change(budgets, np.ones(4)) is None


def test_power_law_fit_converges_and_reports_non_convergence():
    tokens = np.repeat(np.array(BUDGETS, dtype=float), 2)
    curve = power_law(2.0, 0.5, 0.3)(tokens) + np.tile([0.002, -0.002], len(BUDGETS))
    fit = F.fit_power_law(tokens, curve)
    assert fit.converged and fit.params[2] == pytest.approx(0.3, rel=0.1)
    stopped = F.fit_power_law(tokens, curve, max_evaluations=1)
    assert not stopped.converged and stopped.message.startswith("fit did not converge")
    flat = F.fit_power_law(tokens, np.full(tokens.size, 2.0))  # α is not identifiable on a flat curve
    assert not flat.converged and "did not converge" in flat.message
    straight = F.fit_power_law(tokens, 5.0 - 0.3 * np.log(tokens / 1e6))  # a line in ln D: α → 0
    assert not straight.converged and "straight in log tokens" in straight.message
    assert "under-determined: 3 budget(s)" in F.fit_power_law(tokens[:6], curve[:6]).message


def test_planted_power_law_crossover_beyond_the_grid_is_extrapolated():
    pruned, random = power_law(2.0, 0.5, 0.3), power_law(1.9, 2.0, 0.5)
    grid = np.geomspace(1e6, 1e9, 4000)
    planted = grid[np.argmax(pruned(grid) > random(grid))]
    assert 16e6 < planted < 160e6  # beyond the grid, within 10× its largest budget
    rng = np.random.default_rng(0)
    rows = [dict(init=init, seed=s, budget_tokens=b, value=curve(b) + rng.normal(0, 0.001))
            for b in BUDGETS for s in range(3) for init, curve in (("pruned", pruned), ("random", random))]
    values = pl.DataFrame(rows).with_columns(granularity=pl.lit("depth"), method=pl.lit("m"), ratio=pl.lit(0.5),
                                             setting=pl.lit(1), trained_tokens=pl.col("budget_tokens"))
    found = _crossover(values)
    assert found.kind == "extrapolated" and found.model == "power law"
    assert found.budget == pytest.approx(planted, rel=0.10)
    assert found.low < planted < found.high and found.fraction >= F.MIN_CROSSING_FRACTION


def test_linear_gap_extrapolates_a_planted_zero_within_the_horizon():
    planted = 2.5 * BUDGETS[-1]  # 40M: beyond the grid, inside 4× its largest budget
    found = _crossover(_values(_linear_gap(planted)))
    assert found.kind == "extrapolated" and found.model == "linear gap in log tokens"
    assert found.direction == "scratch catches up with pruning"
    assert found.budget == pytest.approx(planted, rel=0.15)
    assert found.low < planted < found.high
    assert BUDGETS[-1] <= found.low and found.high <= F.LINEAR_HORIZON * BUDGETS[-1]
    assert found.linear.paired and found.horizon == F.LINEAR_HORIZON
    gap, half = found.linear.predict([planted])
    assert abs(gap[0]) < half[0]  # the band contains 0 at the planted budget


def test_linear_gap_is_not_extrapolated_beyond_the_horizon():
    planted = 10 * BUDGETS[-1]  # 160M: the trend reaches 0 only at 10×
    found = _crossover(_values(_linear_gap(planted), noise=0.002))
    assert found.kind == "none" and found.budget is None
    assert f"only beyond {F.LINEAR_HORIZON:g}× the largest budget" in found.reason
    widening = _crossover(_values(lambda b: -0.1 - 0.1 * math.log(b / 1e6), noise=0.002))
    assert widening.kind == "none" and "moves away from 0" in widening.reason


def test_linear_interval_is_open_when_the_trend_is_noisy():
    planted = 1.5 * BUDGETS[-1]
    # Three budgets: too few for a power law, so the linear trend is the model, whatever the noise.
    found = _crossover(_values(_linear_gap(planted, slope=0.1), budgets=BUDGETS[2:], noise=0.03, seeds=(0, 1)))
    assert found.kind == "extrapolated" and found.model == "linear gap in log tokens"
    assert found.open_high  # with this noise the band still contains 0 at 4× the largest budget
    assert found.high == pytest.approx(F.LINEAR_HORIZON * BUDGETS[-1], rel=1e-6)


def test_linear_gap_without_paired_seeds_uses_one_line_per_arm():
    planted = 2 * BUDGETS[-1]
    found = _crossover(_values(_linear_gap(planted), paired=False, noise=0.005))
    assert not found.linear.paired
    assert found.kind == "extrapolated" and found.budget == pytest.approx(planted, rel=0.5)


def test_too_few_budgets_are_not_fitted():
    found = _crossover(_values(_linear_gap(1e9), budgets=BUDGETS[:2]))
    assert found.kind == "not-fitted" and found.budget is None
    assert "under-determined: 2 budget(s), a line needs 3" in found.reason


def test_single_seed_leaves_the_line_without_residual_only_with_two_budgets():
    found = _crossover(_values(_linear_gap(2 * BUDGETS[-1]), seeds=(0,)))
    assert found.linear is not None and found.linear.lines[0].dof == len(BUDGETS) - 2
