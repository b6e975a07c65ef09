"""Verdicts by simulation with a known truth: false prune/scratch verdicts under a zero gap, false equivalence at the
margin, both with Benjamini–Hochberg over a setting's cells, and the answer's squares adjusted for choosing the best
method (two depth methods sharing one random twin). Plus the verdicts' plumbing on small frames."""

import numpy as np
import polars as pl
import pytest

from gridlab.report import stats as S

from report_synthetic import design_noise, design_values

RATIOS, BUDGETS, REPS = 4, 4, 2000
CELLS = RATIOS * BUDGETS
ALPHA = S.ALPHA
# Monte-Carlo slack of a rate estimated from REPS replicates: two standard errors at α.
SLACK = 2 * np.sqrt(ALPHA * (1 - ALPHA) / REPS)


def _fit(noise: np.ndarray, gaps: np.ndarray) -> dict[str, np.ndarray]:
    """Model estimates of every cell: noise (reps, methods, seeds, cells) + the true gaps (methods, cells) →
    (reps, methods, cells) arrays of benefit (lower-is-better loss: benefit = −gap), se and dof."""
    reps, methods, seeds, _ = noise.shape
    d = noise + gaps[None, :, None, :]
    rows = d.reshape(reps, methods, seeds, RATIOS, BUDGETS).transpose(0, 1, 4, 2, 3).reshape(-1, seeds, RATIOS)
    result = S.model_intervals(rows)

    def back(x):
        return x.reshape(reps, methods, BUDGETS, RATIOS).transpose(0, 1, 3, 2).reshape(reps, methods, CELLS)

    return dict(benefit=-back(result["gap"]), se=back(result["se"]), dof=back(result["dof"]))


def _cell_verdicts(fit: dict, margin: float) -> np.ndarray:
    reps, methods, cells = fit["se"].shape
    group = np.repeat(np.arange(reps), methods * cells)  # one setting per replicate: its cells are the family
    decided = S.decide(fit["benefit"].ravel(), fit["se"].ravel(), fit["dof"].ravel(), group, margin)
    return decided["verdict"].reshape(reps, methods * cells)


def _square_calls(fit: dict, margin: float) -> np.ndarray:
    reps, methods, cells = fit["se"].shape
    square = np.broadcast_to((np.arange(reps)[:, None, None] * cells + np.arange(cells)[None, None, :]),
                             (reps, methods, cells))
    tests = S.square_tests(fit["benefit"].ravel(), fit["se"].ravel(), fit["dof"].ravel(), square.ravel(), margin)
    group = tests["ids"] // cells
    q = S.benjamini_hochberg(tests["p"], group)
    q_equivalent = S.benjamini_hochberg(tests["p_equivalent"], group)
    call = np.where(q_equivalent <= ALPHA, "equivalent",
                    np.where(q <= ALPHA, np.where(tests["prune"], "prune", "scratch"), "inconclusive"))
    return call.reshape(reps, cells)


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_no_false_prune_or_scratch_under_a_zero_gap(seeds):
    """Every gap 0: the share of replicates with any prune/scratch verdict among the setting's 16 cells (the
    family-wise rate, which BH's FDR equals under the complete null) is at most α."""
    noise = design_noise(np.random.default_rng(seeds), REPS, seeds, RATIOS, BUDGETS)
    verdicts = _cell_verdicts(_fit(noise, np.zeros((1, CELLS))), margin=0.02)
    any_false = np.isin(verdicts, ["prune", "scratch"]).any(axis=1).mean()
    assert any_false <= ALPHA + SLACK, any_false


def _equivalence_noise(seeds: int, reps: int = REPS, methods: int = 1, sd_twin: float = 0.0):
    """Noise small against the margin (0.1): equivalence can be shown, so its error rate is not vacuously 0."""
    return design_noise(np.random.default_rng(100 + seeds), reps, seeds, RATIOS, BUDGETS, sd_seed=0.01,
                        sd_seed_ratio=0.005, sd_seed_budget=0.01, sd_residual=0.01, growth=1.2, methods=methods,
                        sd_twin=sd_twin)


@pytest.mark.parametrize("seeds", [3, 5])
def test_equivalence_at_the_margin_is_declared_at_most_at_the_nominal_rate(seeds):
    """|gap| = δ in every cell (signs alternating): the share of replicates declaring any cell equivalent is at most
    α; with the same noise and a zero gap, equivalence is declared in most cells (the test has power)."""
    margin = 0.1
    noise = _equivalence_noise(seeds)
    at_margin = np.where(np.arange(CELLS) % 2 == 0, margin, -margin)[None, :]
    verdicts = _cell_verdicts(_fit(noise, at_margin), margin)
    rate = (verdicts == "equivalent").any(axis=1).mean()
    assert rate <= ALPHA + SLACK, rate
    power = (_cell_verdicts(_fit(noise, np.zeros((1, CELLS))), margin) == "equivalent").mean()
    assert power > 0.5, power


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_the_squares_choice_of_the_best_method_is_adjusted(seeds):
    """Two methods of one granularity whose differences share the random twin's noise, both with a zero gap: picking
    the better of the two per square and testing it would tilt toward prune; adjusted, the share of replicates with
    any prune/scratch square is at most α."""
    noise = design_noise(np.random.default_rng(200 + seeds), REPS, seeds, RATIOS, BUDGETS, methods=2, sd_twin=0.03)
    calls = _square_calls(_fit(noise, np.zeros((2, CELLS))), margin=0.02)
    rate = np.isin(calls, ["prune", "scratch"]).any(axis=1).mean()
    assert rate <= ALPHA + SLACK, rate


@pytest.mark.parametrize("seeds", [3, 5])
def test_a_square_is_not_called_equivalent_when_its_best_method_is_at_the_margin(seeds):
    """The better method at +δ, the other at −δ: the best method is not equivalent to scratch, and the squares say
    so at most at the nominal rate; both at 0, the squares say equivalent (the test has power)."""
    margin = 0.1
    noise = _equivalence_noise(seeds, methods=2, sd_twin=0.01)
    # benefit = −gap: a gap of −δ is a benefit of +δ.
    gaps = np.stack([np.full(CELLS, -margin), np.full(CELLS, margin)])
    rate = (_square_calls(_fit(noise, gaps), margin) == "equivalent").any(axis=1).mean()
    assert rate <= ALPHA + SLACK, rate
    power = (_square_calls(_fit(noise, np.zeros((2, CELLS))), margin) == "equivalent").mean()
    assert power > 0.5, power


def test_a_large_gap_is_found():
    """Power, so that the error rates above are not those of a test that never decides: a gap of −0.3 nats with 3
    seeds at the design's noise is called prune in most cells."""
    noise = design_noise(np.random.default_rng(7), 200, 3, RATIOS, BUDGETS)
    verdicts = _cell_verdicts(_fit(noise, np.full((1, CELLS), -0.3)), margin=0.02)
    assert (verdicts == "prune").mean() > 0.6
    assert (verdicts == "scratch").mean() == 0


# ---------------------------------------------------------------------------------------------------------------
# Plumbing on small frames


def test_benjamini_hochberg_matches_the_textbook_within_groups():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan, 0.5, 0.02])
    group = np.array([0, 0, 0, 0, 0, 1, 1])
    q = S.benjamini_hochberg(p, group)
    first = np.array([0.01, 0.04, 0.03, 0.005])
    order = np.argsort(first)
    expected = np.minimum.accumulate((first[order] * 4 / np.arange(1, 5))[::-1])[::-1]
    assert q[:4][order] == pytest.approx(expected)
    assert np.isnan(q[4]) and q[5] == pytest.approx(0.5) and q[6] == pytest.approx(0.04)


def test_verdict_words_follow_tost_and_the_difference():
    benefit = np.array([0.5, -0.5, 0.001, 0.05, 0.05])
    se = np.array([0.05, 0.05, 0.002, 0.2, np.nan])
    dof = np.array([10.0, 10.0, 10.0, 10.0, np.nan])
    decided = S.decide(benefit, se, dof, np.zeros(5), margin=0.02)
    assert decided["verdict"].tolist() == ["prune", "scratch", "equivalent", "inconclusive", "inconclusive"]
    assert np.isnan(decided["half"][4]) and np.isnan(decided["q"][4])
    assert decided["half"][0] == pytest.approx(S.t_quantile(10.0) * 0.05)


def test_design_seeds_reach_80_percent_power_at_the_margin():
    """The design power figure: with the seeds it names, a simulated rerun tells a gap of δ from 0 in ≥ 80 % of
    draws; with one seed fewer it would not need to."""
    from scipy import stats

    sd, margin = 0.05, 0.02
    (n,) = S.design_seeds(np.array([sd**2]), margin).astype(int)
    rng = np.random.default_rng(0)
    draws = rng.normal(margin, sd, (20000, n))
    t = draws.mean(axis=1) / (draws.std(axis=1, ddof=1) / np.sqrt(n))
    assert (np.abs(t) > stats.t.ppf(0.975, n - 1)).mean() >= 0.8
    assert S.design_seeds(np.array([1e6]), margin)[0] == S.MAX_SEEDS + 1


def test_gap_table_marks_the_model_and_the_sensitivity_check():
    rng = np.random.default_rng(3)
    noise = 0.3 * design_noise(rng, 1, 3, RATIOS, BUDGETS, methods=2, sd_twin=0.02)[0]
    gaps = np.stack([np.full(CELLS, -0.3), np.zeros(CELLS)])
    values = design_values(noise, gaps, [0.5, 0.6, 0.7, 0.8], [10, 20, 40, 80], ["shortgpt", "minitron-depth"])
    table = S.gap_table(values, higher_is_better=False)
    assert set(table["model"]) == {S.MODEL} and set(table["test"]) == {"paired"}
    assert set(table["verdict"]) <= set(S.VERDICTS)
    assert table.filter(pl.col("method") == "shortgpt")["verdict"].to_list().count("prune") >= 12
    assert table["cell_half"].null_count() == 0 and table["seeds_needed"].null_count() == 0
    # Each budget's cells of one family share one variance model: same se across its ratios when seeds are complete.
    spread = table.group_by(["method", "budget_tokens"]).agg(pl.col("se").max() - pl.col("se").min())["se"]
    assert spread.max() < 1e-12
    own = S.gap_table(values, higher_is_better=False, pool="none")
    assert set(own["model"]) == {S.CELL_T}
    assert own["half"].to_list() == pytest.approx(table["cell_half"].to_list())
    squares = S.answer_squares(table)
    assert squares.height == CELLS and set(squares["methods"]) == {2}
    assert set(squares["call"]) <= {"prune", "inconclusive"}
    assert (squares["call"] == "prune").sum() >= 12 and set(squares.filter(pl.col("call") == "prune")["method"]) == \
        {"shortgpt"}


def test_a_cell_without_two_seeds_has_no_verdict():
    rows = []
    for seed in (0, 1):
        for init, value in (("pruned", 2.0 + 0.01 * seed), ("random", 2.5)):
            rows.append(dict(granularity="depth", method="m", ratio=0.5, init=init, setting=1, budget_tokens=10,
                             trained_tokens=10, seed=seed, value=value))
    rows += [dict(granularity="depth", method="m", ratio=0.5, init=init, setting=1, budget_tokens=20,
                  trained_tokens=20, seed=0, value=value) for init, value in (("pruned", 2.0), ("random", 2.6))]
    table = S.gap_table(pl.DataFrame(rows), higher_is_better=False).sort("budget_tokens")
    single = table.row(1, named=True)
    assert single["n_seeds"] == 1 and single["half"] is None and single["verdict"] == "inconclusive"
    squares = S.answer_squares(table).sort("budget_tokens")
    assert squares["call"].to_list()[1] == S.NO_INTERVAL


def test_verdict_table_takes_d_eff_from_the_gaps_or_a_transfer_frame():
    from gridlab.report.tables import VERDICT_COLUMNS, verdict_table

    rng = np.random.default_rng(5)
    noise = 0.3 * design_noise(rng, 1, 3, RATIOS, BUDGETS)[0]
    values = design_values(noise, np.full((1, CELLS), -0.3), [0.5, 0.6, 0.7, 0.8], [10, 20, 40, 80], ["shortgpt"])
    gaps = S.gap_table(values, higher_is_better=False)
    plain = verdict_table(gaps)
    assert plain.columns == VERDICT_COLUMNS and plain.height == CELLS and plain["d_eff_tokens"].null_count() == CELLS
    assert (plain["lo95"] == gaps.sort(["ratio", "budget_tokens"])["gap"] - gaps.sort(["ratio", "budget_tokens"])[
        "half"]).all()
    transfer = gaps.select("granularity", "method", "ratio", "setting", "budget_tokens").with_columns(
        d_eff_tokens=pl.col("budget_tokens") * 3.0).head(5)
    joined = verdict_table(gaps, transfer)
    assert joined["d_eff_tokens"].drop_nulls().len() == 5
    own = verdict_table(gaps.with_columns(d_eff_tokens=pl.lit(7.0)))
    assert set(own["d_eff_tokens"]) == {7.0}
