"""Effective data transferred and setting 2 judged by what it needs, proven on learning curves whose D_eff is known:
the random arm's curve inverted at the pruned model's value recovers a planted shift, its interval covers it, values
beyond the measured curve give bounds, and setting 2 favours pruning exactly when D_eff > P. The exhaustive version
of the simulation is bench/report_simulation.py."""

import math

import numpy as np
import polars as pl
import pytest

from gridlab.report import analyse as A
from gridlab.report import transfer as T
from gridlab.report.read import read_results

from report_synthetic import build_cells, finish, learning_study, power_law, transfer_loss, write_db

BUDGETS = [10_000, 20_000, 40_000, 80_000]
P = 150_000
CURVE = power_law(4.6, 2.0, 0.45, reference=1e4)  # the random arm: value at trained tokens D


def test_the_curve_is_made_monotone_and_inverted_without_extrapolating():
    tokens = np.array([1e4, 2e4, 4e4, 8e4, 1.6e5])
    curve = T.monotone_curve(tokens, np.array([5.0, 4.0, 4.2, 3.5, 3.0]))  # 4.0 → 4.2: one noisy step back
    assert curve.y.tolist() == [5.0, 4.1, 3.5, 3.0]
    assert curve.log_tokens[1] == pytest.approx(np.log([2e4, 4e4]).mean())
    log_d, flags = T.invert(curve, np.array([5.0, 3.5, 2.0, 6.0]))
    assert np.exp(log_d[:2]) == pytest.approx([1e4, 8e4]) and flags.tolist() == [0, 0, 1, -1]
    assert np.exp(log_d[2:]) == pytest.approx([1.6e5, 1e4])  # the curve's ends: bounds, not extrapolations
    assert T.monotone_curve(tokens, np.full(5, 3.0)) is None  # flat: nothing to invert


def test_a_smooth_curve_is_inverted_accurately_between_its_points():
    b = np.array(BUDGETS, dtype=float)
    tokens = np.concatenate([b, [P], P + b])
    curve = T.monotone_curve(tokens, CURVE(tokens))
    truth = np.geomspace(1.2e4, 2.2e5, 9)
    log_d, flags = T.invert(curve, CURVE(truth))
    assert (flags == 0).all() and np.exp(log_d) == pytest.approx(truth, rel=0.03)


@pytest.mark.parametrize("seeds", [2, 4])
@pytest.mark.parametrize("name, transfer", [("constant shift", lambda b: 30_000 + 0 * b),
                                            ("shrinking", lambda b: 0.8 * b * (1 - b / 1.6e5))])
def test_d_eff_recovers_a_planted_shift_and_its_interval_covers_it(seeds, name, transfer):
    replicates = 300
    tokens, random, pruned = learning_study(CURVE, transfer, BUDGETS, P, seeds, replicates,
                                            np.random.default_rng(seeds))
    b = np.array(BUDGETS, dtype=float)
    truth = transfer(b)
    estimate, covered = [], []
    for r in range(replicates):
        curves = [T.monotone_curve(tokens, random[r, s]) for s in range(seeds)]
        for k, row in enumerate(T.transfer_at(curves, b, pruned[r])):
            assert row["d_eff_bound"] == ""  # every planted value lies inside the measured curve
            estimate.append(math.log((b[k] + row["d_eff_tokens"]) / (b[k] + truth[k])))
            covered.append(row["d_eff_low"] <= truth[k] <= row["d_eff_high"])
    assert abs(np.median(estimate)) < 0.03, name  # the geometric mean of B + D_eff is unbiased in log tokens
    assert np.mean(covered) >= 0.90, (name, np.mean(covered))  # 95 % intervals


def test_beyond_the_measured_curve_the_answer_is_a_bound():
    b = np.array(BUDGETS, dtype=float)
    tokens = np.concatenate([b, [P], P + b])
    curves = [T.monotone_curve(tokens, CURVE(tokens) + 0.001 * s) for s in range(3)]
    better = CURVE(np.full(4, 1e6))  # as good as scratch after 1M tokens: beyond the curve's last point, 230k
    worse = CURVE(np.full(4, 5e3))  # worse than scratch at its first point, 10k
    high = T.transfer_at(curves, b, np.tile(better, (3, 1)))
    assert [row["d_eff_bound"] for row in high] == [">"] * 4
    assert high[0]["d_eff_tokens"] == pytest.approx(230_000 - 10_000, rel=0.01) and high[0]["d_eff_low"] is None
    low = T.transfer_at(curves, b, np.tile(worse, (3, 1)))
    assert [row["d_eff_bound"] for row in low] == ["<"] * 4 and low[-1]["d_eff_tokens"] < 0
    mixed = T.transfer_at(curves, b, np.stack([better, worse, better]))
    assert mixed[0]["d_eff_tokens"] is None and "both sides" in mixed[0]["reason"]


def _analysis(tmp_path, transfer, parent_tokens=P, parent_params=400_000, seeds=(0, 1, 2), metric="val_loss",
              higher_is_better=False):
    cells = build_cells(["shortgpt", "wanda"], [0.5, 0.7], BUDGETS, list(seeds), parent_tokens, references=True)
    loss = transfer_loss(CURVE, lambda method, ratio, b: transfer(b))
    signed = loss if not higher_is_better else (lambda *a: -loss(*a))
    metrics = finish(cells, signed, metric=metric, higher_is_better=higher_is_better)
    db = write_db(tmp_path / "results.duckdb", cells, metrics, parent_tokens=parent_tokens,
                  parent_params=parent_params)
    return A.analyse(read_results(db), metric)


def test_through_the_database_d_eff_and_setting_2_follow_the_planted_transfer(tmp_path):
    analysis = _analysis(tmp_path, lambda b: 30_000 + 0 * b)
    frame = analysis.transfer
    assert frame.columns[:6] == ["setting", "granularity", "method", "ratio", "budget_tokens", "n_seeds"]
    assert frame.height == 2 * 2 * 2 * len(BUDGETS)  # one row per setting, for verdicts.csv
    assert frame["d_eff_tokens"].to_numpy() == pytest.approx(30_000, rel=0.25)
    assert set(frame["setting2"]) == {"scratch"}  # worth 30k, the parent cost 150k
    assert analysis.answer[-1].startswith("Setting 2 favours pruning exactly when the pruned start is worth more than "
                                          "the parent's P = 150k tokens, D_eff(B) > P: yes in 0 of 16 group × budget "
                                          "pairs, no in 16, undecided in 0")
    sentence = analysis.setting2_summary  # the section's sentence says more
    assert sentence.startswith("Setting 2 (scratch also trains the parent's P = 150k tokens) favours pruning "
                               "exactly when the pruned start is worth more scratch tokens than P")
    assert "of 16 group × budget pairs, 0 yes, 16 no, 0 undecided" in sentence
    assert "the parent saw 0.375 tokens per parameter" in sentence and "undertrained" in sentence
    slopes = analysis.effective.slopes
    assert slopes.height == 4 and (slopes["slope"] < 0).all() and (slopes["low_tokens"] == P).all()
    assert slopes["high_tokens"].unique().to_list() == [P + BUDGETS[-1]]


def test_setting_2_favours_pruning_when_the_start_is_worth_more_than_the_parent_cost(tmp_path):
    analysis = _analysis(tmp_path, lambda b: 60_000 + 0 * b, parent_tokens=20_000, parent_params=None)
    part = analysis.transfer.filter(pl.col("setting") == 2)
    assert set(part["setting2"]) == {"prune"}
    # The same comparison the setting-2 verdicts make: D_eff > P ⟺ pruned beats scratch at P + B.
    assert set(analysis.gaps.filter(pl.col("setting") == 2)["verdict"]) == {"prune"}
    assert "tokens per parameter are unknown" in analysis.setting2_summary


def test_a_higher_is_better_metric_is_inverted_the_right_way(tmp_path):
    analysis = _analysis(tmp_path, lambda b: 30_000 + 0 * b, metric="score", higher_is_better=True)
    assert analysis.transfer["d_eff_tokens"].to_numpy() == pytest.approx(30_000, rel=0.25)
    assert (analysis.effective.slopes["slope"] > 0).all()  # a score still rising around P


def test_without_finished_pairs_there_is_no_transfer_and_the_sentence_says_why(tmp_path):
    cells = build_cells(["shortgpt"], [0.5], BUDGETS, [0, 1], P)
    analysis = A.analyse(read_results(write_db(tmp_path / "results.duckdb", cells,
                                               finish(cells, lambda *a: 3.0, done=lambda c: c["init"] == "pruned"))))
    assert not analysis.effective.available and analysis.transfer.height == 0
    assert analysis.setting2_summary.startswith("Whether setting 2 can favour pruning here is not known")
