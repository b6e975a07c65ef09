"""Report analysis on synthetic tables with known answers."""

import math

import numpy as np
import polars as pl
import pytest
from report_synthetic import build_cells, finish, power_law, write_db
from scipy import optimize, stats

from gridlab.report import analyse as A

BUDGETS = [1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000]
PARENT = 50_000_000


def _values(rows: list[tuple]) -> pl.DataFrame:
    """Rows of (method, init, setting, budget, seed, value) as a headline-values frame."""
    return pl.DataFrame(
        [dict(granularity="depth", method=m, ratio=0.5, init=i, setting=s, budget_tokens=b,
              trained_tokens=b, seed=seed, value=v) for m, i, s, b, seed, v in rows]
    )


def _analysis(tmp_path, loss, seeds=(0, 1, 2), budgets=BUDGETS, methods=("shortgpt",), metric="val_loss", **kw):
    cells = build_cells(list(methods), [0.5], list(budgets), list(seeds), PARENT)
    metrics = finish(cells, loss, metric=metric, **kw)
    db = write_db(tmp_path / "results.duckdb", cells, metrics, parent_tokens=PARENT)
    return A.analyse(A.read_results(db), metric)


def _crossover(analysis, setting):
    (found,) = [c for c in analysis.crossovers if c.setting == setting]
    return found


def test_metric_direction_from_name():
    assert not A.higher_is_better("val_loss")
    assert not A.higher_is_better("val_ppl")
    assert not A.higher_is_better("eval/wikitext/loss")
    assert not A.higher_is_better("lm_eval/wikitext/word_perplexity")
    assert A.higher_is_better("lm_eval/arc_easy/acc")
    assert A.higher_is_better("lm_eval/hellaswag/acc_norm,none")


def test_seed_summary_mean_and_t_interval():
    values = _values([("m", "pruned", 1, 10, s, v) for s, v in enumerate([1.0, 2.0, 3.0])]
                     + [("m", "random", 1, 10, 0, 5.0)])
    summary = A.seed_summary(values).sort("init")
    pruned, random = summary.row(0, named=True), summary.row(1, named=True)
    assert pruned["n"] == 3 and pruned["mean"] == pytest.approx(2.0)
    assert pruned["half"] == pytest.approx(stats.t.ppf(0.975, 2) / math.sqrt(3))
    assert random["n"] == 1 and random["half"] is None and random["ci_low"] is None


def test_gap_uses_welch_interval_and_calls_verdicts():
    rng = np.random.default_rng(1)
    pruned_clear = 2.0 + rng.normal(0, 0.01, 5)
    random_clear = 2.5 + rng.normal(0, 0.05, 4)
    rows = [("win", "pruned", 1, 10, s, v) for s, v in enumerate(pruned_clear)]
    rows += [("win", "random", 1, 10, s, v) for s, v in enumerate(random_clear)]
    rows += [("lose", "pruned", 1, 10, s, v) for s, v in enumerate(random_clear)]
    rows += [("lose", "random", 1, 10, s, v) for s, v in enumerate(pruned_clear)]
    rows += [("even", "pruned", 1, 10, s, v) for s, v in enumerate([2.0, 2.2, 1.9])]
    rows += [("even", "random", 1, 10, s, v) for s, v in enumerate([2.1, 1.95, 2.05])]
    rows += [("single", "pruned", 1, 10, 0, 2.0), ("single", "random", 1, 10, 0, 2.3)]
    gaps = A.gap_table(A.seed_summary(_values(rows)), lower_is_better=True)
    by_method = {row["method"]: row for row in gaps.iter_rows(named=True)}
    assert by_method["win"]["verdict"] == "prune"
    assert by_method["lose"]["verdict"] == "scratch"
    assert by_method["even"]["verdict"] == "tie"
    assert by_method["single"]["verdict"] == "prune (n=1)" and by_method["single"]["half"] is None

    reference = stats.ttest_ind(pruned_clear, random_clear, equal_var=False).confidence_interval(0.95)
    win = by_method["win"]
    assert win["gap"] == pytest.approx(pruned_clear.mean() - random_clear.mean())
    assert win["gap"] - win["half"] == pytest.approx(reference.low)
    assert win["gap"] + win["half"] == pytest.approx(reference.high)


def test_higher_is_better_metric_flips_the_verdict():
    rows = [("m", "pruned", 1, 10, s, v) for s, v in enumerate([0.61, 0.62, 0.60])]
    rows += [("m", "random", 1, 10, s, v) for s, v in enumerate([0.40, 0.41, 0.42])]
    summary = A.seed_summary(_values(rows))
    assert A.gap_table(summary, lower_is_better=False)["verdict"][0] == "prune"
    assert A.gap_table(summary, lower_is_better=True)["verdict"][0] == "scratch"


def test_sign_change_inside_grid_is_interpolated_in_log_tokens():
    budgets = np.array([1e6, 1e7, 1e8, 1e9])
    planted = 10 ** 7.25
    benefit = np.log10(planted) - np.log10(budgets)  # linear in log tokens, zero at the planted budget
    at, low, high = A.interpolate_sign_change(budgets, benefit)
    assert at == pytest.approx(planted, rel=1e-9) and (low, high) == (1e7, 1e8)
    assert A.interpolate_sign_change(budgets, np.ones(4)) is None


def test_planted_crossover_inside_grid_found_through_the_database(tmp_path):
    pruned, random = power_law(2.0, 0.5, 0.3), power_law(1.9, 2.0, 0.5)
    planted = math.exp(optimize.brentq(lambda x: pruned(math.exp(x)) - random(math.exp(x)), math.log(1e6), 40))
    budgets = [int(planted / 8 * 2**i) for i in range(6)]  # planted lies between the 4th and 5th budget
    analysis = _analysis(tmp_path, lambda m, r, i, s, tok, seed: (pruned if i == "pruned" else random)(tok)
                         + 0.001 * (seed - 1), budgets=budgets)
    found = _crossover(analysis, 1)
    assert found.kind == "interpolated"
    assert found.budget == pytest.approx(planted, rel=0.05)
    assert "scratch catches up with pruning" in found.text


def test_planted_crossover_beyond_grid_is_extrapolated_from_fits(tmp_path):
    pruned, random = power_law(2.0, 0.5, 0.3), power_law(1.9, 2.0, 0.5)
    planted = math.exp(optimize.brentq(lambda x: pruned(math.exp(x)) - random(math.exp(x)), math.log(1e6), 40))
    assert 16e6 < planted < 160e6  # beyond the grid, within 10× its largest budget
    rng = np.random.default_rng(0)
    analysis = _analysis(tmp_path, lambda m, r, i, s, tok, seed: (pruned if i == "pruned" else random)(tok)
                         + rng.normal(0, 0.001))
    found = _crossover(analysis, 1)
    assert found.kind == "extrapolated"
    assert found.budget == pytest.approx(planted, rel=0.10)
    assert found.low < planted < found.high
    assert all(fit.converged for fit in found.fits.values())
    # Setting 2 gives scratch the parent's 50M tokens too: it wins everywhere and the curves do not meet by 160M.
    setting_2 = _crossover(analysis, 2)
    assert setting_2.kind == "none" and "no crossover within 10× the largest budget" in setting_2.text
    verdicts = set(analysis.gaps.filter(pl.col("setting") == 2)["verdict"])
    assert verdicts == {"scratch"}


def test_too_few_budgets_are_not_extrapolated(tmp_path):
    analysis = _analysis(tmp_path, lambda m, r, i, s, tok, seed: (2.0 if i == "pruned" else 2.5) + 0.01 * seed,
                         budgets=BUDGETS[:3])
    found = _crossover(analysis, 1)
    assert found.kind == "not-fitted" and found.budget is None
    assert "under-determined: 3 budget(s)" in found.text


def test_fit_non_convergence_is_reported():
    tokens = np.repeat(np.array(BUDGETS, dtype=float), 2)
    curve = power_law(2.0, 0.5, 0.3)(tokens) + np.tile([0.002, -0.002], len(BUDGETS))
    assert A.fit_power_law(tokens, curve).converged
    stopped = A.fit_power_law(tokens, curve, max_evaluations=1)
    assert not stopped.converged and stopped.message.startswith("fit did not converge")
    flat = A.fit_power_law(tokens, np.full(tokens.size, 2.0))  # α is not identifiable on a flat curve
    assert not flat.converged and "did not converge" in flat.message


def test_flat_arms_report_non_converged_fits_instead_of_a_crossover(tmp_path):
    analysis = _analysis(tmp_path, lambda m, r, i, s, tok, seed: 2.0 if i == "pruned" else 2.5)
    found = _crossover(analysis, 1)
    assert found.kind == "not-fitted" and "did not converge" in found.text
    assert found.budget is None


def test_summary_sentence_states_the_recommendation_by_budget(tmp_path):
    pruned, random = power_law(2.0, 0.5, 0.3), power_law(1.9, 2.0, 0.5)
    budgets = [1_000_000 * 4**i for i in range(6)]
    analysis = _analysis(tmp_path, lambda m, r, i, s, tok, seed: (pruned if i == "pruned" else random)(tok)
                         + 0.001 * (seed - 1), budgets=budgets)
    (item,) = analysis.sentences
    setting_1 = next(line["sentence"] for line in item["lines"] if line["setting"] == 1)
    assert setting_1.startswith("With a limited budget (1M–")
    assert "prune (shortgpt)" in setting_1 and "train from scratch" in setting_1
    assert "Crossover: shortgpt at" in setting_1


def test_partial_grid_lists_missing_cells_and_counts(tmp_path):
    cells = build_cells(["shortgpt"], [0.5], BUDGETS, [0, 1], PARENT)
    metrics = finish(cells, lambda m, r, i, s, tok, seed: 2.0, done=lambda c: c["budget_tokens"] <= 4_000_000)
    cells[-1]["status"], cells[-1]["error"] = "failed", "TrainingDiverged: loss is nan"
    db = write_db(tmp_path / "results.duckdb", cells, metrics)
    analysis = A.analyse(A.read_results(db))
    assert analysis.counts["done"] == 24 and analysis.counts["pending"] == 15 and analysis.counts["failed"] == 1
    failed = [m for m in analysis.missing if m["reason"] == "failed"]
    assert failed and failed[0]["errors"] == ["TrainingDiverged: loss is nan"]
    assert sum(m["cells"] for m in analysis.missing) == 16
    assert sorted(analysis.gaps["budget_tokens"].unique()) == BUDGETS[:3]


def test_unknown_metric_is_one_clear_error(tmp_path):
    cells = build_cells(["shortgpt"], [0.5], BUDGETS[:1], [0], PARENT)
    db = write_db(tmp_path / "results.duckdb", cells, finish(cells, lambda *a: 2.0))
    with pytest.raises(ValueError, match="metric 'lm_eval/arc/acc' is not in the results; available: .*val_loss"):
        A.analyse(A.read_results(db), "lm_eval/arc/acc")
    with pytest.raises(ValueError, match="no results database"):
        A.read_results(tmp_path / "absent.duckdb")
