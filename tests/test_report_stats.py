"""Report statistics on seed-level tables with known answers: paired vs Welch, the cell's own t against scipy, the
model across a budget's ratios, cells without an interval. (Coverage: test_report_mixed.py; error rates:
test_report_verdicts.py.)"""

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats

from gridlab.report import stats as S


def _values(rows: list[tuple]) -> pl.DataFrame:
    """Rows of (method, ratio, init, setting, budget, seed, value) as a headline-values frame."""
    return pl.DataFrame(
        [dict(granularity="depth", method=m, ratio=r, init=i, setting=s, budget_tokens=b, trained_tokens=b,
              seed=seed, value=v) for m, r, i, s, b, seed, v in rows],
        schema_overrides={"ratio": pl.Float64},
    )


def _pair(method, pruned, random, budget=10, ratio=0.5, seeds_random=None):
    rows = [(method, ratio, "pruned", 1, budget, s, v) for s, v in enumerate(pruned)]
    seeds = seeds_random if seeds_random is not None else range(len(random))
    rows += [(method, ratio, "random", 1, budget, s, v) for s, v in zip(seeds, random, strict=True)]
    return rows


def _row(gaps: pl.DataFrame, **key) -> dict:
    frame = gaps
    for column, value in key.items():
        frame = frame.filter(pl.col(column) == value)
    (row,) = frame.iter_rows(named=True)
    return row


def test_seed_summary_mean_and_t_interval():
    values = _values([("m", 0.5, "pruned", 1, 10, s, v) for s, v in enumerate([1.0, 2.0, 3.0])]
                     + [("m", 0.5, "random", 1, 10, 0, 5.0)])
    summary = S.seed_summary(values).sort("init")
    pruned, random = summary.row(0, named=True), summary.row(1, named=True)
    assert pruned["n"] == 3 and pruned["mean"] == pytest.approx(2.0)
    assert pruned["half"] == pytest.approx(stats.t.ppf(0.975, 2) / math.sqrt(3))
    assert random["n"] == 1 and random["half"] is None and random["ci_low"] is None


def test_matching_seeds_give_the_paired_interval_of_scipy():
    # The seeds move both arms together (shared data order): paired differences are tight, the arms are not.
    shared = np.array([0.0, 0.3, -0.2, 0.5, -0.4])
    pruned, random = 2.0 + shared + [0.01, -0.01, 0.0, 0.02, -0.015], 2.1 + shared
    gaps = S.gap_table(_values(_pair("m", pruned, random)), higher_is_better=False, pool="none")
    row = _row(gaps, method="m")
    reference = stats.ttest_rel(pruned, random).confidence_interval(0.95)
    assert row["test"] == "paired" and row["model"] == S.CELL_T and row["n_pairs"] == 5 and row["dof"] == 4
    assert row["gap"] - row["half"] == pytest.approx(reference.low)
    assert row["gap"] + row["half"] == pytest.approx(reference.high)
    assert row["verdict"] == "prune"
    # The same numbers unpaired would be a tie: pairing is what resolves it.
    welch = stats.ttest_ind(pruned, random, equal_var=False).confidence_interval(0.95)
    assert welch.low < 0 < welch.high


def test_seeds_that_do_not_match_fall_back_to_welch():
    rng = np.random.default_rng(1)
    pruned, random = 2.0 + rng.normal(0, 0.01, 5), 2.5 + rng.normal(0, 0.05, 4)
    rows = _pair("win", pruned, random, seeds_random=[10, 11, 12, 13])
    rows += _pair("lose", random, pruned, seeds_random=[10, 11, 12, 13, 14])
    rows += _pair("even", [2.0, 2.2, 1.9], [2.1, 1.95, 2.05], seeds_random=[5, 6, 7])
    rows += _pair("single", [2.0], [2.3])
    gaps = S.gap_table(_values(rows), higher_is_better=False, pool="none")
    win = _row(gaps, method="win")
    assert win["test"] == "Welch" and win["model"] == S.WELCH and win["n_pairs"] == 0
    reference = stats.ttest_ind(pruned, random, equal_var=False).confidence_interval(0.95)
    assert win["gap"] == pytest.approx(pruned.mean() - random.mean())
    assert win["gap"] - win["half"] == pytest.approx(reference.low)
    assert win["gap"] + win["half"] == pytest.approx(reference.high)
    assert win["verdict"] == "prune"
    assert _row(gaps, method="lose")["verdict"] == "scratch"
    assert _row(gaps, method="even")["verdict"] == "inconclusive"
    single = _row(gaps, method="single")  # one seed: no interval, so no verdict
    assert single["verdict"] == "inconclusive" and single["half"] is None and single["seeds_needed"] is None


def test_a_partly_matching_seed_set_pairs_the_seeds_both_arms_have():
    rows = _pair("m", [2.0, 2.1, 2.2], [2.5, 2.65], seeds_random=[0, 1])
    row = _row(S.gap_table(_values(rows), higher_is_better=False, pool="none"), method="m")
    assert row["test"] == "paired" and row["n_pairs"] == row["n_seeds"] == 2 and row["n_pruned"] == 3
    assert row["gap"] == pytest.approx(-0.525) and row["observed_gap"] == pytest.approx(2.1 - 2.575)


def test_higher_is_better_metric_flips_the_verdict():
    rows = _pair("m", [0.61, 0.62, 0.60], [0.40, 0.41, 0.42])
    assert S.gap_table(_values(rows), higher_is_better=True)["verdict"][0] == "prune"
    assert S.gap_table(_values(rows), higher_is_better=False)["verdict"][0] == "scratch"


def test_the_model_pools_a_budgets_ratios_but_not_its_budgets():
    """Three ratios at two budgets, three seeds: each budget's ratios share one variance model (one se for the
    budget's cells with complete seeds, more dof than a cell's own 2), the budgets do not (their spreads differ)."""
    rng = np.random.default_rng(3)
    rows = []
    for budget, spread in ((10, 0.02), (20, 0.2)):
        for ratio in (0.5, 0.6, 0.7):
            d = rng.normal(-0.3, spread, 3)
            rows += _pair("m", 2.0 + d, np.full(3, 2.0), budget=budget, ratio=ratio)
    gaps = S.gap_table(_values(rows), higher_is_better=False)
    assert set(gaps["model"]) == {S.MODEL}
    for budget in (10, 20):
        part = gaps.filter(pl.col("budget_tokens") == budget)
        assert part["se"].max() - part["se"].min() < 1e-12
        assert (part["dof"] > 2).all() and (part["cell_dof"] == 2).all()
        # the model's variance of one seed's difference: the mean of the cells' own variances at this budget
        assert part["sd_between_seeds"][0] ** 2 == pytest.approx((part["cell_half"] ** 2).mean()
                                                                 / stats.t.ppf(0.975, 2) ** 2 * 3)
    small, large = (gaps.filter(pl.col("budget_tokens") == b)["se"][0] for b in (10, 20))
    assert large > 3 * small


def test_a_cell_with_one_seed_has_no_interval_even_inside_a_model():
    rows = _pair("m", [2.0, 2.1], [2.5, 2.55], budget=10) + _pair("m", [2.0], [2.4], budget=20)
    rows += _pair("m", [2.05, 2.15], [2.5, 2.6], budget=20, ratio=0.6)
    gaps = S.gap_table(_values(rows), higher_is_better=False)
    single = _row(gaps, budget_tokens=20, ratio=0.5)
    assert single["test"] == "paired" and single["n_seeds"] == 1 and single["half"] is None
    assert single["verdict"] == "inconclusive"


def test_unknown_or_removed_pooling_is_refused():
    with pytest.raises(ValueError, match="unknown pooling 'methods'; valid: model, none"):
        S.gap_table(_values(_pair("m", [1.0], [2.0])), False, "methods")
    with pytest.raises(ValueError, match="pooling 'ratios' was removed"):
        S.gap_table(_values(_pair("m", [1.0], [2.0])), False, "ratios")
