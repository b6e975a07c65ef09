"""Verdicts that stay valid when the number of seeds depends on the data: group-sequential tests with alpha spending.

An adaptive study (gridlab.adaptive) looks at its verdicts after every round and adds a seed where a verdict is still
inconclusive. Testing each look with the fixed-sample intervals of stats.py would inflate the false verdicts (a cell
that gets a new seed until its interval excludes 0 will, sooner or later, by chance). Here every cell's tests are
group-sequential instead:

- **Looks.** A cell is looked at with n seeds, n = `first` (the grid's own seeds, at least 2) … `last` (`[adaptive]
  max_seeds`); its information fraction is t = n / last. A cell is counted once per n: the first round at which it
  had n seeds is its look at n (later rounds at the same n, whose pooled estimate moves with the other cells, are
  not new looks).
- **Alpha spending.** Each of the four one-sided tests a verdict is made of (stats.one_sided_tests: benefit above 0,
  below 0, below +δ, above −δ) spends its type-I error α over the looks by a Lan–DeMets spending function α(t):
  Pocock-type α·ln(1 + (e − 1)·t) (the default: it spends early, so a gap that is large against the seeds' spread
  is decided at the first look) or O'Brien–Fleming-type 2 − 2Φ(z_{1−α/2}/√t) (keeps most of α for the last look).
  The look at n tests at the nominal level α(t_n) − α(t_{n−1}) (the first look: α(t_first)), and the looks are
  combined by Bonferroni: P(some look rejects) ≤ Σ nominal levels = α(1) = α, whatever the joint law of the looks'
  t statistics and whenever the study stops — it only needs each look's test to be valid on its own, which the
  report's coverage simulations check. (Boundaries computed from the joint law of z statistics — Armitage, McPherson
  and Rowe's recursion — are less conservative but not valid for t statistics with a few seeds' degrees of freedom:
  with each cell's own paired t and 2 → 8 seeds they reject 1.24 × α; bench/adaptive.py measures both.)
- **Repeated p-values.** Per test and look, the smallest overall level at which the sequential test would reject at
  that look (Jennison & Turnbull 1993); a cell's sequential p-value is the smallest over its looks so far. It is a
  valid p-value whatever the stopping rule (P(p ≤ a) ≤ a for every a), so the report's verdict logic (stats.judge:
  the difference as twice the smaller side, TOST as the larger of its two sides, Benjamini–Hochberg across a
  setting's cells) and the squares' adjustment for choosing the best method (stats.square_combine) apply to them
  unchanged.
- **Repeated confidence intervals.** The interval printed for a cell is t(1 − c_n)·se around its estimate, c_n the
  nominal level of its last look at α/2 per side: it covers the true gap at every look simultaneously with
  probability ≥ 95 %, so it stays valid at whichever look the study stopped.

Everything here is a pure function of frames; `sequential_gap_table` is what both the adaptive loop and the report
call, so a study's verdicts are the same wherever they are computed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import special

from gridlab.report import stats

SPENDING = ("pocock", "obrien-fleming")
DEFAULT_SPENDING = "pocock"
# The overall levels a repeated p-value is read from (log-spaced). Above 0.2 the O'Brien–Fleming increments stop
# growing with the level, and no verdict is made at such a level: a repeated p-value beyond it is 1.
_LEVELS = np.geomspace(1e-12, 0.2, 241)


@dataclass(frozen=True)
class Design:
    """The sequential design of a study: looks at `first` … `last` seeds per cell, `spending` of the overall level
    `alpha` (per one-sided test; the difference from 0 is two of them)."""

    first: int
    last: int
    spending: str = DEFAULT_SPENDING
    alpha: float = stats.ALPHA

    def __post_init__(self):
        if self.spending not in SPENDING:
            raise ValueError(f"unknown spending function {self.spending!r}; valid: {', '.join(SPENDING)}")
        if not 2 <= self.first <= self.last:
            raise ValueError(f"looks from {self.first} to {self.last} seeds: need 2 ≤ first ≤ last")

    @property
    def seeds(self) -> np.ndarray:
        return np.arange(self.first, self.last + 1)

    def describe(self) -> str:
        kind = {"pocock": "Pocock-type", "obrien-fleming": "O'Brien–Fleming-type"}[self.spending]
        return (f"group-sequential tests: Lan–DeMets {kind} alpha spending over looks at {self.first} to "
                f"{self.last} seeds per cell (information = seeds ÷ {self.last}), the looks combined by Bonferroni, "
                f"with repeated p-values and repeated confidence intervals")


def spent(t: np.ndarray, level: np.ndarray, spending: str) -> np.ndarray:
    """The type-I error a one-sided test of overall `level` has spent by information fraction `t` (Lan & DeMets
    1983): Pocock-type level·ln(1 + (e − 1)t), O'Brien–Fleming-type 2 − 2Φ(z_{1−level/2} / √t). Broadcasts."""
    t, level = np.asarray(t, dtype=float), np.asarray(level, dtype=float)
    if spending == "pocock":
        return level * np.log1p((math.e - 1) * t)
    if spending == "obrien-fleming":
        return 2 * special.ndtr(-special.ndtri(1 - level / 2) / np.sqrt(t))
    raise ValueError(f"unknown spending function {spending!r}; valid: {', '.join(SPENDING)}")


def nominal_levels(first: int, last: int, spending: str, levels) -> np.ndarray:
    """(levels, looks) each look's nominal one-sided level at each overall level: what the spending function adds
    between the previous look's information and this one's (the first look: all it has spent by then)."""
    t = np.arange(first, last + 1) / last
    budget = spent(t[None, :], np.asarray(levels, dtype=float)[:, None], spending)
    return np.diff(budget, axis=1, prepend=0.0)


@functools.lru_cache(maxsize=32)
def _table(first: int, last: int, spending: str) -> np.ndarray:
    return np.log(nominal_levels(first, last, spending, _LEVELS))


def nominal_at(seeds: np.ndarray, design: Design, level: float) -> np.ndarray:
    """Each look's nominal one-sided level at the overall `level` (NaN where `seeds` is not a look of the design)."""
    seeds = np.asarray(seeds, dtype=float)
    table = nominal_levels(design.first, design.last, design.spending, [level])[0]
    inside = np.isfinite(seeds) & (seeds >= design.first) & (seeds <= design.last)
    index = np.where(inside, seeds, design.first).astype(int) - design.first
    return np.where(inside, table[index], np.nan)


def repeated_p(nominal_p: np.ndarray, seeds: np.ndarray, design: Design) -> np.ndarray:
    """The repeated p-value of one-sided nominal p-values observed at looks with `seeds` seeds: the smallest overall
    level at which the sequential test rejects at that look (its nominal level there reaches the p-value). NaN
    where there is no p or the look is outside the design (fewer than `first` or more than `last` seeds); 1 where
    no level up to 0.2 would reject."""
    nominal_p, seeds = np.asarray(nominal_p, dtype=float), np.asarray(seeds, dtype=float)
    table = _table(design.first, design.last, design.spending)  # log nominal level (levels, looks)
    out = np.full(nominal_p.shape, np.nan)
    inside = np.isfinite(nominal_p) & np.isfinite(seeds) & (seeds >= design.first) & (seeds <= design.last)
    log_levels = np.log(_LEVELS)
    for n in np.unique(seeds[inside]).astype(int):
        at = inside & (seeds == n)
        column = table[:, n - design.first]
        p = np.log(np.clip(nominal_p[at], 1e-300, 1.0))
        out[at] = np.where(p > column[-1], 1.0, np.exp(np.interp(p, column, log_levels)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# A study's looks, replayed from its rounds


LOOK_COLUMNS = ("above", "below", "under_margin", "over_minus")
CELL_LOOK_COLUMNS = tuple(f"cell_{name}" for name in LOOK_COLUMNS)


def series(values: np.ndarray) -> pl.Series:
    """A float column with NaN as null."""
    return pl.Series(np.asarray(values, dtype=float), dtype=pl.Float64).fill_nan(None)


def with_rounds(values: pl.DataFrame, additions: pl.DataFrame | None) -> pl.DataFrame:
    """Seed-level values with the round that added each cell (`round`, 0: the grid's own). `additions`: one row per
    added cell (method, ratio, setting, budget_tokens, seed, round), both arms."""
    keys = ["method", "ratio", "setting", "budget_tokens", "seed"]
    if additions is None or additions.height == 0:
        return values.with_columns(round=pl.lit(0, dtype=pl.Int64))
    rounds = (additions.select(keys + ["round"])
              .cast({"ratio": pl.Float64, "setting": pl.Int64, "budget_tokens": pl.Int64, "seed": pl.Int64,
                     "round": pl.Int64})
              .group_by(keys).agg(pl.col("round").min()))
    return (values.cast({"setting": pl.Int64, "budget_tokens": pl.Int64, "seed": pl.Int64})
            .join(rounds, on=keys, how="left").with_columns(pl.col("round").fill_null(0)))


def _repeated(benefit, se, dof, seeds, margin: float, design: Design) -> dict[str, np.ndarray]:
    tests = stats.one_sided_tests(benefit, se, dof, margin)
    return {name: repeated_p(tests[name], seeds, design) for name in LOOK_COLUMNS}


def _cell_se(gaps: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The sensitivity check's own paired t: its se (from its printed half-width) and dof."""
    half = gaps["cell_half"].fill_null(np.nan).to_numpy().astype(float)
    dof = gaps["cell_dof"].fill_null(np.nan).to_numpy().astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = half / stats.t_quantile(dof)
    return np.where(half == 0, 0.0, se), dof


def look_tests(gaps: pl.DataFrame, higher_is_better: bool, margin: float, design: Design) -> pl.DataFrame:
    """One look: each cell's seeds and the repeated p-values of its four one-sided tests at that look, for the
    interval model (LOOK_COLUMNS) and the sensitivity check's own t (CELL_LOOK_COLUMNS)."""
    sign = 1.0 if higher_is_better else -1.0
    seeds = gaps["n_seeds"].cast(pl.Float64).to_numpy()
    benefit = gaps["benefit"].fill_null(np.nan).to_numpy().astype(float)
    se, dof = (gaps[c].fill_null(np.nan).to_numpy().astype(float) for c in ("se", "dof"))
    model = _repeated(benefit, se, dof, seeds, margin, design)
    cell_se, cell_dof = _cell_se(gaps)
    own = _repeated(sign * gaps["cell_gap"].fill_null(np.nan).to_numpy().astype(float), cell_se, cell_dof, seeds,
                    margin, design)
    return gaps.select(*stats.PAIR_KEYS, "n_seeds").with_columns(
        **{name: pl.Series(model[name]) for name in LOOK_COLUMNS},
        **{f"cell_{name}": pl.Series(own[name]) for name in LOOK_COLUMNS})


def sequential_gap_table(values: pl.DataFrame, higher_is_better: bool, pool: str, margin: float, design: Design,
                         additions: pl.DataFrame | None = None,
                         documents: pl.DataFrame | None = None) -> pl.DataFrame:
    """stats.gap_table of the latest look, with the verdicts of the sequential design: the study's looks are
    replayed from its rounds (look L sees the grid's cells and those rounds 1 … L added), each cell's repeated
    p-values are the smallest over its looks (one per seed count, the first round that had it), and stats.judge
    gives the verdicts (Benjamini–Hochberg over a setting's cells). `half` and the interval columns become the
    repeated confidence interval of the cell's last look; `looks` counts a cell's looks, `last_look_seeds` its
    seeds at the last one. The columns LOOK_COLUMNS carry the sequential one-sided p-values (answer_squares uses
    them). `values`: seed-level headline values (budgets > 0); `additions`: with_rounds' rows; `documents`: the
    headline metric's per-document losses, whose held-out sample error each look adds to its intervals (as
    stats.gap_table does; stats.measurement_error of the look's own cells)."""
    staged = with_rounds(values, additions)
    rounds = sorted(staged["round"].unique().to_list()) or [0]
    looks = []
    gaps = None
    for look in rounds:
        seen = staged.filter(pl.col("round") <= look).drop("round")
        measurement = None if documents is None else stats.measurement_error(seen, documents)
        gaps = stats.gap_table(seen, higher_is_better, pool, margin, measurement)
        looks.append(look_tests(gaps, higher_is_better, margin, design).with_columns(look=pl.lit(look)))
    assert gaps is not None
    if gaps.height == 0:
        return gaps
    every = (pl.concat(looks).filter(pl.col("above").is_not_null() | pl.col("cell_above").is_not_null())
             .sort("look").unique([*stats.PAIR_KEYS, "n_seeds"], keep="first"))
    best = every.group_by(stats.PAIR_KEYS).agg(
        *[pl.col(name).min() for name in (*LOOK_COLUMNS, *CELL_LOOK_COLUMNS)], looks=pl.len())
    frame = gaps.drop(*(c for c in LOOK_COLUMNS if c in gaps.columns)).join(best, on=stats.PAIR_KEYS, how="left")

    def column(name):
        return frame[name].fill_null(np.nan).to_numpy().astype(float)

    setting = frame["setting"].to_numpy()
    judged = stats.judge({name: column(name) for name in LOOK_COLUMNS}, setting, design.alpha)
    own = stats.judge({name: column(f"cell_{name}") for name in LOOK_COLUMNS}, setting, design.alpha)
    seeds = frame["n_seeds"].cast(pl.Float64).to_numpy()
    nominal = nominal_at(seeds, design, design.alpha / 2)  # two-sided 1 − α: α/2 per side
    with np.errstate(invalid="ignore"):
        quantile = np.where(np.isfinite(nominal), special.stdtrit(
            np.where(np.isfinite(column("dof")), column("dof"), 1.0), 1 - np.where(np.isfinite(nominal), nominal,
                                                                                     0.5)), np.nan)
        half = np.where(column("se") == 0, 0.0, quantile * column("se"))
        cell_se, cell_dof = _cell_se(frame)
        cell_quantile = np.where(np.isfinite(nominal), special.stdtrit(
            np.where(np.isfinite(cell_dof), cell_dof, 1.0), 1 - np.where(np.isfinite(nominal), nominal, 0.5)),
            np.nan)
        cell_half = np.where(cell_se == 0, 0.0, cell_quantile * cell_se)
    half = np.where(np.isfinite(column("dof")) | (column("se") == 0), half, np.nan)
    benefit = column("benefit")
    return frame.with_columns(
        half=series(half), benefit_low=series(benefit - half), benefit_high=series(benefit + half),
        p_value=series(judged["p"]), q_value=series(judged["q"]),
        p_equivalent=series(judged["p_equivalent"]), q_equivalent=series(judged["q_equivalent"]),
        verdict=pl.Series(judged["verdict"], dtype=pl.Utf8),
        cell_half=series(np.where(np.isfinite(cell_dof) | (cell_se == 0), cell_half, np.nan)),
        cell_verdict=pl.Series(own["verdict"], dtype=pl.Utf8),
        looks=frame["looks"].fill_null(0).cast(pl.UInt32),
        last_look_seeds=frame["n_seeds"],
    ).drop(*CELL_LOOK_COLUMNS)


def conditional_power(gaps: pl.DataFrame, design: Design, margin: float) -> np.ndarray:
    """power_at_last_look for every cell of a sequential gap table (its n_seeds, benefit, se and the held-out
    sample's part of se)."""
    measurement = (gaps["se_measurement"].fill_null(np.nan).to_numpy().astype(float)
                   if "se_measurement" in gaps.columns else None)
    return power_at_last_look(gaps["benefit"].fill_null(np.nan).to_numpy().astype(float),
                              gaps["se"].fill_null(np.nan).to_numpy().astype(float),
                              gaps["n_seeds"].cast(pl.Float64).to_numpy(), design, margin, measurement)


def power_at_last_look(benefit: np.ndarray, se: np.ndarray, seeds: np.ndarray, design: Design,
                       margin: float, measurement: np.ndarray | None = None) -> np.ndarray:
    """The chance that a cell's last look (design.last seeds) decides it if its gap is what is estimated now: the
    standard error shrunk to se·√(n / last), the estimate taken as the truth, the last look's nominal levels (α/2
    per side for the difference, α for each side of the equivalence) and t quantiles with last − 1 degrees of
    freedom; the larger of the two decisions' chances. ``measurement``: the part of se that is the held-out sample's
    error (stats.measurement_error), which more seeds do not shrink. Benjamini–Hochberg is left out (optimistic),
    and so are the looks before the last (pessimistic): a heuristic for where seeds are worth spending — stopping a
    cell for futility never raises the error rates (its tests only lose chances to reject). NaN where a cell has no
    interval."""
    benefit = np.abs(np.asarray(benefit, dtype=float))
    se = np.asarray(se, dtype=float)
    fixed = np.zeros(se.shape) if measurement is None else np.nan_to_num(np.asarray(measurement, dtype=float))
    # the seeds' part shrinks with more seeds, the held-out sample's part does not
    seeds_part = np.sqrt(np.clip(se ** 2 - fixed ** 2, 0, None))
    se = np.sqrt(seeds_part ** 2 * np.asarray(seeds, dtype=float) / design.last + fixed ** 2)
    last = np.array([float(design.last)])
    dof = design.last - 1.0
    difference = special.stdtrit(dof, 1 - nominal_at(last, design, design.alpha / 2)[0])
    equivalence = special.stdtrit(dof, 1 - nominal_at(last, design, design.alpha)[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        decide_difference = special.ndtr(benefit / se - difference)
        decide_equivalence = special.ndtr((margin - benefit) / se - equivalence)
    power = np.maximum(decide_difference, decide_equivalence)
    return np.where(se == 0, 1.0, power)
