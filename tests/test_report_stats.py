"""Report statistics on seed-level tables with known answers: paired vs Welch, pooling, verdicts, seeds to resolve."""

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
    assert row["test"] == "paired" and row["n_pairs"] == 5 and row["dof"] == 4
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
    assert win["test"] == "Welch" and win["n_pairs"] == 0
    reference = stats.ttest_ind(pruned, random, equal_var=False).confidence_interval(0.95)
    assert win["gap"] == pytest.approx(pruned.mean() - random.mean())
    assert win["gap"] - win["half"] == pytest.approx(reference.low)
    assert win["gap"] + win["half"] == pytest.approx(reference.high)
    assert win["verdict"] == "prune"
    assert _row(gaps, method="lose")["verdict"] == "scratch"
    assert _row(gaps, method="even")["verdict"] == "tie"
    single = _row(gaps, method="single")
    assert single["verdict"] == "prune (n=1)" and single["half"] is None and single["seeds_needed"] is None


def test_a_partly_matching_seed_set_is_welch():
    rows = _pair("m", [2.0, 2.1, 2.2], [2.5, 2.6], seeds_random=[0, 1])
    gaps = S.gap_table(_values(rows), higher_is_better=False, pool="none")
    assert _row(gaps, method="m")["test"] == "Welch"


def test_higher_is_better_metric_flips_the_verdict():
    rows = _pair("m", [0.61, 0.62, 0.60], [0.40, 0.41, 0.42])
    assert S.gap_table(_values(rows), higher_is_better=True)["verdict"][0] == "prune"
    assert S.gap_table(_values(rows), higher_is_better=False)["verdict"][0] == "scratch"


def test_pooling_over_seeds_uses_the_family_spread_and_its_degrees_of_freedom():
    # Four budgets of one method, two seeds each: per pair one degree of freedom; pooled, four.
    rng = np.random.default_rng(3)
    rows, diffs = [], {}
    for budget, gap in zip((10, 20, 40, 80), (-0.5, -0.4, -0.3, -0.2), strict=True):
        shared = rng.normal(0, 0.3, 2)
        noise = rng.normal(0, 0.05, 2)
        pruned, random = 3.0 + gap + shared + noise, 3.0 + shared
        rows += _pair("m", pruned, random, budget=budget)
        diffs[budget] = pruned - random
    values = _values(rows)
    alone = S.gap_table(values, higher_is_better=False, pool="none")
    pooled = S.gap_table(values, higher_is_better=False, pool="seeds")
    s2 = np.mean([d.var(ddof=1) for d in diffs.values()])
    for budget, d in diffs.items():
        row = _row(pooled, budget_tokens=budget)
        assert row["model"] == "pooled σ" and row["dof"] == 4
        assert row["gap"] == pytest.approx(d.mean())
        assert row["half"] == pytest.approx(stats.t.ppf(0.975, 4) * math.sqrt(s2 / 2))
        assert _row(alone, budget_tokens=budget)["dof"] == 1
    # Other methods and settings are other families: adding one leaves these intervals as they are.
    other = _values(_pair("other", [9.0, 1.0], [1.0, 9.0]))
    again = S.gap_table(pl.concat([values, other]), higher_is_better=False, pool="seeds")
    assert _row(again, method="m", budget_tokens=10)["half"] == pytest.approx(_row(pooled, budget_tokens=10)["half"])


def test_pooling_gives_a_single_seed_pair_an_interval_from_its_family():
    rows = _pair("m", [2.0, 2.1], [2.5, 2.55], budget=10) + _pair("m", [2.0], [2.4], budget=20)
    gaps = S.gap_table(_values(rows), higher_is_better=False, pool="seeds")
    single = _row(gaps, budget_tokens=20)
    assert single["test"] == "paired" and single["dof"] == 1 and single["half"] is not None
    assert single["verdict"] in ("prune", "tie")


def test_ratio_model_fits_the_gap_linearly_in_the_ratio():
    # A gap exactly linear in the ratio, plus seed noise: the model recovers the line at every ratio.
    rng = np.random.default_rng(4)
    rows = []
    for ratio in (0.5, 0.6, 0.7, 0.8):
        gap = -1.0 + 1.0 * ratio
        for seed in range(3):
            shared = rng.normal(0, 0.2)
            rows.append(("m", ratio, "pruned", 1, 10, seed, 3.0 + gap + shared + rng.normal(0, 0.01)))
            rows.append(("m", ratio, "random", 1, 10, seed, 3.0 + shared))
    gaps = S.gap_table(_values(rows), higher_is_better=False, pool="ratios")
    assert set(gaps["model"]) == {"linear in ratio"}
    assert set(gaps["dof"]) == {10.0}  # 12 differences − 2 parameters
    for row in gaps.iter_rows(named=True):
        assert row["gap"] == pytest.approx(-1.0 + row["ratio"], abs=0.02)
    x = np.repeat([0.5, 0.6, 0.7, 0.8], 3)
    d = np.array([p[6] - r[6] for p, r in zip(rows[::2], rows[1::2], strict=True)])
    fit = stats.linregress(x, d)
    at_06 = _row(gaps, ratio=0.6)
    assert at_06["gap"] == pytest.approx(fit.intercept + fit.slope * 0.6)
    residual = d - (fit.intercept + fit.slope * x)
    s2 = (residual**2).sum() / 10
    se = math.sqrt(s2 * (1 / 12 + (0.6 - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum()))
    assert at_06["se"] == pytest.approx(se)


def test_ratio_model_needs_three_ratios_and_falls_back():
    rows = _pair("m", [2.0, 2.1], [2.5, 2.6], ratio=0.5) + _pair("m", [2.0, 2.2], [2.4, 2.5], ratio=0.7)
    gaps = S.gap_table(_values(rows), higher_is_better=False, pool="ratios")
    assert set(gaps["model"]) == {"pooled σ"}


def test_seeds_to_resolve_a_tie_are_the_smallest_that_would():
    d = np.array([0.10, -0.15, 0.25, -0.02])  # mean 0.045, sd 0.17: a tie at four seeds
    rows = _pair("m", 2.0 + d, np.full(4, 2.0))
    (row,) = S.gap_table(_values(rows), higher_is_better=False, pool="none").iter_rows(named=True)
    assert row["verdict"] == "tie"
    needed = int(row["seeds_needed"])
    gap, sd = abs(d.mean()), d.std(ddof=1)

    def half(n):
        return stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)

    assert half(needed) < gap <= half(needed - 1)
    far = S.gap_table(_values(_pair("m", [2.0, 2.31, 1.7], [2.0, 2.0, 2.0])), False, "none")
    # a gap of 0.003 at a spread of 0.3: no affordable number of seeds resolves it
    assert far["verdict"][0] == "tie" and far["seeds_needed"][0] > S.MAX_SEEDS


def test_family_spread_reports_pooled_sd_and_bartlett():
    rng = np.random.default_rng(5)
    rows = []
    for budget, spread in ((10, 0.01), (20, 0.01), (40, 1.0)):
        d = rng.normal(0, spread, 6)
        rows += _pair("m", 2.0 + d, np.full(6, 2.0), budget=budget)
    values = _values(rows)
    gaps = S.gap_table(values, False)
    (family,) = S.family_spread(values, gaps).iter_rows(named=True)
    assert family["paired"] == 3 and family["welch"] == 0 and family["dof"] == 15
    assert family["bartlett_p"] < 1e-3  # the spreads differ a hundredfold: pooling is flagged


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="unknown pooling 'methods'; valid: none, seeds, ratios"):
        S.gap_table(_values(_pair("m", [1.0], [2.0])), False, "methods")
