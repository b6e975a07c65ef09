"""Adaptive studies on synthetic per-seed differences with a known truth, vectorised over replicates (the statistics
of gridlab.adaptive's loop, not training): tests/test_adaptive_validity.py and bench/adaptive.py.

One replicate is one setting of a family (a granularity's method) with `ratios` cells at each of `budgets` budgets.
Every replicate starts with `design.first` seeds per cell; after each look, the procedure adds the next seed to each
cell it has not decided, up to `design.last` seeds, until nothing is open. The report's own functions make every
look: stats.model_intervals (the mixed model, or each cell's own paired t with pool="none"), stats.one_sided_tests,
sequential.repeated_p and stats.judge (Benjamini–Hochberg over the replicate's cells) — the same chain
sequential.sequential_gap_table runs on a real study's frames.

`procedure="naive"` is what the report's fixed-sample verdicts would give in the same loop: at each look a cell's
verdict is stats.decide's (the fixed-sample t intervals, BH), and a cell keeps the first decided verdict it gets —
adding seeds until an interval excludes 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gridlab.report import sequential as Q
from gridlab.report import stats as S

PROCEDURES = ("sequential", "naive")


@dataclass
class Outcome:
    verdicts: np.ndarray  # (reps, cells) final verdict words
    seeds: np.ndarray  # (reps, cells) seeds each cell ended with
    looks: int  # looks the loop made
    rounds: np.ndarray  # (reps, cells, seeds) the round that added each seed (0: the grid's; −1: never added)


def _fit(d: np.ndarray, have: np.ndarray, ratios: int, budgets: int, pool: str) -> dict[str, np.ndarray]:
    """Estimates at one look: d (reps, seeds, cells) with the first `have` (reps, cells) seeds of each cell seen;
    cells ordered ratio-major (cell = ratio · budgets + budget). Returns benefit (lower-is-better: −gap), se, dof,
    each (reps, cells)."""
    reps, seeds, cells = d.shape
    seen = np.arange(seeds)[None, :, None] < have[:, None, :]
    y = np.where(seen, d, np.nan)
    if pool == "none":
        n = seen.sum(axis=1)
        mean = np.nanmean(y, axis=1)
        sd = np.nanstd(y, axis=1, ddof=1)
        return dict(benefit=-mean, se=sd / np.sqrt(n), dof=n - 1.0)
    rows = y.reshape(reps, seeds, ratios, budgets).transpose(0, 3, 1, 2).reshape(reps * budgets, seeds, ratios)
    fit = S.model_intervals(rows)

    def back(x):
        return x.reshape(reps, budgets, ratios).transpose(0, 2, 1).reshape(reps, cells)

    return dict(benefit=-back(fit["gap"]), se=back(fit["se"]), dof=back(fit["dof"]))


def run(d: np.ndarray, design: Q.Design, margin: float, ratios: int, budgets: int, pool: str = "model",
        procedure: str = "sequential", futility: float = 0.1) -> Outcome:
    """The adaptive loop over replicates: d (reps, design.last, cells) holds every seed a cell could get (a cell sees
    its first `have` seeds). As gridlab.adaptive does, an open cell gets no more seeds where
    sequential.power_at_last_look is below `futility` ([adaptive] futility's default)."""
    if procedure not in PROCEDURES:
        raise ValueError(procedure)
    reps, _, cells = d.shape
    group = np.repeat(np.arange(reps), cells)
    have = np.full((reps, cells), design.first)
    seen = np.zeros((reps, cells))  # the seed count of each cell's last look
    best = {name: np.full((reps, cells), np.nan) for name in Q.LOOK_COLUMNS}
    frozen = np.full((reps, cells), "", dtype=object)  # naive: the first decided verdict
    rounds = np.where(np.arange(design.last)[None, None, :] < design.first, 0, -1) * np.ones((reps, cells, 1), int)
    looks = 0
    while True:
        looks += 1
        fit = _fit(d, have, ratios, budgets, pool)
        if procedure == "sequential":
            new = have > seen
            tests = S.one_sided_tests(fit["benefit"], fit["se"], fit["dof"], margin)
            for name in Q.LOOK_COLUMNS:
                repeated = Q.repeated_p(tests[name], have.astype(float), design)
                best[name] = np.where(new, np.fmin(best[name], repeated), best[name])
            seen = np.where(new, have, seen)
            verdict = S.judge({k: v.ravel() for k, v in best.items()}, group, design.alpha)["verdict"]
            verdict = verdict.reshape(reps, cells)
        else:
            verdict = S.decide(fit["benefit"].ravel(), fit["se"].ravel(), fit["dof"].ravel(), group,
                               margin)["verdict"].reshape(reps, cells)
            verdict = np.where(frozen != "", frozen, verdict)
            frozen = np.where(verdict != "inconclusive", verdict, frozen)
        with np.errstate(invalid="ignore"):
            hopeful = ~(Q.power_at_last_look(fit["benefit"], fit["se"], have, design, margin) < futility)
        open_ = (verdict == "inconclusive") & (have < design.last) & hopeful
        if not open_.any():
            return Outcome(verdict, have, looks, rounds)
        rows, columns = np.nonzero(open_)
        rounds[rows, columns, have[rows, columns]] = looks
        have = have + open_


def wrong(verdicts: np.ndarray, benefit: np.ndarray, margin: float) -> np.ndarray:
    """Which verdicts are wrong given the true benefit of each cell (broadcast): prune/scratch where the truth is 0 or
    on the other side; equivalent where |benefit| ≥ margin. Inconclusive is never wrong."""
    benefit = np.broadcast_to(benefit, verdicts.shape)
    sided = np.where(benefit > 0, verdicts == "scratch", np.where(benefit < 0, verdicts == "prune",
                                                                   np.isin(verdicts, ["prune", "scratch"])))
    return sided | ((verdicts == "equivalent") & (np.abs(benefit) >= margin - 1e-12))
