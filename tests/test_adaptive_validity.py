"""The adaptive study's verdicts stay valid under optional stopping — proven by simulation with a known truth.

The whole adaptive loop runs on synthetic per-seed differences (tests/adaptive_synthetic.py: the report's own
statistics at every look, a seed added to every inconclusive cell until max_seeds, Benjamini–Hochberg over a
setting's cells), and the share of replicate studies with any wrong verdict stays at or under α for every truth: a
zero gap (a prune/scratch verdict is wrong), a gap at the margin (equivalent is wrong) and a large gap (equivalent or
the wrong direction is wrong), for the mixed model and for each cell's own paired t. Beside it, the naive procedure —
the fixed-sample verdicts at every look, seeds added until one is decided — inflates them: the test would fail with
the fixed-sample intervals. bench/adaptive.py runs more designs and replicates."""

import adaptive_synthetic as A
import numpy as np
import polars as pl
import pytest

from gridlab.report import sequential as Q
from gridlab.report import stats as S

from report_synthetic import design_noise, design_values

RATIOS, BUDGETS = 4, 4
CELLS = RATIOS * BUDGETS
ALPHA = S.ALPHA
DESIGN = Q.Design(first=2, last=8)
QUIET = dict(sd_seed=0.01, sd_seed_ratio=0.005, sd_seed_budget=0.01, sd_residual=0.01, growth=1.2)  # vs δ = 0.1


def _slack(reps: int) -> float:
    """Three standard errors of a rate at α estimated from `reps` replicates."""
    return 3 * np.sqrt(ALPHA * (1 - ALPHA) / reps)


def _study(truth: str, reps: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(d, benefit, margin): per-seed differences (reps, max seeds, cells) and the true benefit of every cell."""
    rng = np.random.default_rng(seed)
    if truth == "zero":
        margin, gap = 0.02, np.zeros(CELLS)
        noise = design_noise(rng, reps, DESIGN.last, RATIOS, BUDGETS)[:, 0]
    else:
        margin = 0.1
        size = {"margin": margin, "large": 4 * margin}[truth]
        gap = np.where(np.arange(CELLS) % 2 == 0, size, -size)
        noise = design_noise(rng, reps, DESIGN.last, RATIOS, BUDGETS, **QUIET)[:, 0]
    return noise + gap[None, None, :], -gap, margin  # a loss: benefit = −gap


def _any_wrong(outcome: A.Outcome, benefit: np.ndarray, margin: float) -> float:
    return float(A.wrong(outcome.verdicts, benefit, margin).any(axis=1).mean())


@pytest.mark.parametrize("truth", ["zero", "margin", "large"])
@pytest.mark.parametrize("pool, reps", [("model", 1000), ("none", 4000)])
def test_sequential_verdicts_are_wrong_at_most_at_the_nominal_rate(truth, pool, reps):
    d, benefit, margin = _study(truth, reps, seed={"zero": 1, "margin": 2, "large": 3}[truth])
    sequential = A.run(d, DESIGN, margin, RATIOS, BUDGETS, pool, "sequential")
    rate = _any_wrong(sequential, benefit, margin)
    assert rate <= ALPHA + _slack(reps), (truth, pool, rate)
    if truth == "large":  # power: a gap of 4δ against a spread of δ/4 is decided with 2 or 3 seeds
        assert (sequential.verdicts == np.where(benefit > 0, "prune", "scratch")).mean() > 0.99
        assert sequential.seeds.mean() < 3 and (sequential.seeds <= 4).all()
    if truth == "margin":  # the loop goes on where the data cannot decide yet, and then decides
        assert sequential.looks > 1 and (sequential.verdicts != "inconclusive").mean() > 0.9


@pytest.mark.parametrize("truth", ["zero", "margin"])
def test_the_naive_fixed_sample_verdicts_inflate_the_same_loops_errors(truth):
    """The fixed-sample verdicts in the same loop (a seed added until the cell is decided): with each cell's own t
    the wrong verdicts exceed α by far, where the sequential ones (above) stay under it."""
    reps = 4000
    d, benefit, margin = _study(truth, reps, seed={"zero": 1, "margin": 2}[truth])
    naive = _any_wrong(A.run(d, DESIGN, margin, RATIOS, BUDGETS, "none", "naive"), benefit, margin)
    sequential = _any_wrong(A.run(d, DESIGN, margin, RATIOS, BUDGETS, "none", "sequential"), benefit, margin)
    assert naive > ALPHA + _slack(reps), naive
    assert sequential < naive
    if truth == "zero":
        assert naive > 3 * ALPHA, naive   # 0.22 with 2 → 8 seeds


def test_mixed_truths_keep_the_false_discovery_rate():
    """Cells with zero, small, marginal and large gaps in one setting: the mean share of wrong verdicts among the
    decided ones (the false discovery proportion, counting a wrong direction or a wrong equivalence) is at most α,
    while most cells with a large gap are decided."""
    reps, margin = 500, 0.02
    gap = np.array([0, 0, 0.01, -0.01, 0.02, -0.02, 0.03, -0.03, 0.05, -0.05, 0.1, -0.1, 0.3, -0.3, 1.0, -1.0])
    noise = design_noise(np.random.default_rng(4), reps, DESIGN.last, RATIOS, BUDGETS)[:, 0]
    outcome = A.run(noise + gap, DESIGN, margin, RATIOS, BUDGETS, "model", "sequential")
    wrong = A.wrong(outcome.verdicts, -gap, margin)
    decided = outcome.verdicts != "inconclusive"
    fdp = np.where(decided.sum(axis=1) > 0, wrong.sum(axis=1) / np.maximum(decided.sum(axis=1), 1), 0.0)
    assert fdp.mean() <= ALPHA + _slack(reps), fdp.mean()
    assert decided[:, np.abs(gap) >= 0.3].mean() > 0.9


def test_a_studys_frames_give_the_verdicts_of_the_simulated_loop():
    """sequential.sequential_gap_table — what the adaptive loop and the report run on a real study's frames,
    replaying its looks from the rounds that added each seed — gives the same verdicts as the vectorised loop."""
    margin = 0.02
    gap = np.array([0, 0.01, -0.02, 0.05, 0.1, -0.1, 0.3, 1.0, 0, 0.02, -0.05, 0.2, -0.3, 0.01, 0, -1.0])
    noise = design_noise(np.random.default_rng(5), 3, DESIGN.last, RATIOS, BUDGETS)
    outcome = A.run(noise[:, 0] + gap, DESIGN, margin, RATIOS, BUDGETS, "model", "sequential")
    assert outcome.looks > 2
    ratios, budgets = [0.25, 0.5, 0.625, 0.75], [1000, 2000, 4000, 8000]
    for rep in range(3):
        every = design_values(noise[rep], gap[None, :], ratios, budgets, ["m"])
        rounds = outcome.rounds[rep]
        added = [dict(method="m", ratio=ratios[c // BUDGETS], setting=1, budget_tokens=budgets[c % BUDGETS],
                      seed=s, round=int(rounds[c, s]))
                 for c in range(CELLS) for s in range(DESIGN.last) if rounds[c, s] >= 0]
        additions = pl.DataFrame(added)
        values = every.join(additions.select("ratio", "budget_tokens", "seed"), on=["ratio", "budget_tokens", "seed"])
        gaps = Q.sequential_gap_table(values, False, "model", margin, DESIGN, additions.filter(pl.col("round") > 0))
        order = gaps.sort(["ratio", "budget_tokens"])
        assert order["verdict"].to_list() == outcome.verdicts[rep].tolist()
        assert order["n_seeds"].to_list() == outcome.seeds[rep].tolist()


def test_spending_and_repeated_p_values():
    """The nominal levels add up to the spending function (α at the last look); Pocock-type spends more at the first
    look than O'Brien–Fleming-type; a repeated p-value read at a look's own nominal level gives back that level."""
    for spending in Q.SPENDING:
        design = Q.Design(2, 8, spending)
        levels = Q.nominal_at(design.seeds, design, 0.025)
        assert levels.sum() == pytest.approx(0.025)
        for n, level in zip(design.seeds, levels, strict=True):
            assert Q.repeated_p(np.array([level]), np.array([n]), design)[0] == pytest.approx(0.025, rel=1e-3)
        assert np.isnan(Q.repeated_p(np.array([0.01, 0.01]), np.array([1, 9]), design)).all()
    pocock, obf = (Q.nominal_at(np.array([2]), Q.Design(2, 8, s), 0.025)[0] for s in Q.SPENDING)
    assert pocock > 10 * obf
    assert Q.repeated_p(np.array([0.5]), np.array([8]), Q.Design(2, 8))[0] == 1.0
