"""Effective data transferred (Hernandez, Kaplan, Henighan, McCandlish 2021, "Scaling Laws for Transfer") and what
setting 2 needs.

**D_eff(B)**: how many tokens of scratch training the pruned start is worth at budget B — the D for which the
random arm's learning curve reaches the pruned model's value, L_scratch(B + D_eff) = L_pruned(B).

Per (granularity, method, ratio) and seed, the random arm's learning curve is its value at every trained-token count
it has: setting-1 budgets B and setting-2 budgets P + B are branches of the same random trajectory (and the
setting-2 reference at B = 0 is its point at P). The curve is made monotone in log tokens (isotonic regression, the
metric's better direction as tokens grow; tied points pooled to one at their mean log tokens) and inverted by
monotone cubic interpolation (PCHIP) of ln D against the value. A pruned value better than the curve's last point
gives only a bound, D_eff > D_max − B; worse than its first point, D_eff < D_min − B: the curve is never
extrapolated.

Per group and budget the seeds are the units: the mean of ln(B + D_eff) over seeds with a 95 % Student-t interval
(n − 1 degrees of freedom), back-transformed (a geometric mean; its interval is clipped to the measured curve and
marked open there). When some seeds give a bound and the others a value, the group gives a bound on the same side
(the mean with the bounds in it); seeds bounded on opposite sides leave it unknown.

**Setting 2, judged by what it needs.** Setting 2 gives scratch P + B tokens, so it favours pruning exactly when
D_eff(B) > P: the pruned start is worth more scratch tokens than the parent cost. Per group and budget: *prune*
when the whole interval of B + D_eff is above P + B, *scratch* when below, *undecided* otherwise. Beside it, the
parent's tokens per parameter against the compute-optimal ≈ 20 (Hoffmann et al. 2022) and the random arm's learning
curve slope around P (the value's change per doubling of tokens between P and the largest setting-2 point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from scipy import special
from scipy.interpolate import PchipInterpolator
from scipy.optimize import isotonic_regression

CONFIDENCE = 0.95
COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER = 20.0  # Hoffmann et al. 2022
ARM_KEYS = ["granularity", "method", "ratio"]
TRANSFER_SCHEMA = {
    "setting": pl.Int64, "granularity": pl.Utf8, "method": pl.Utf8, "ratio": pl.Float64, "budget_tokens": pl.Int64,
    "n_seeds": pl.Int64, "d_eff_tokens": pl.Float64, "d_eff_low": pl.Float64, "d_eff_high": pl.Float64,
    "d_eff_bound": pl.Utf8, "open_low": pl.Boolean, "open_high": pl.Boolean, "setting2": pl.Utf8, "reason": pl.Utf8,
}


def _t(dof) -> np.ndarray:
    dof = np.asarray(dof, dtype=float)
    ok = dof >= 1
    return np.where(ok, special.stdtrit(np.where(ok, dof, 1.0), 0.5 + CONFIDENCE / 2), np.nan)


# ---------------------------------------------------------------------------------------------------------------
# One learning curve


@dataclass(frozen=True)
class Curve:
    """A monotone learning curve in log tokens: strictly decreasing values `y` (lower is better) at `log_tokens`."""

    log_tokens: np.ndarray
    y: np.ndarray

    @property
    def range(self) -> tuple[float, float]:
        return float(np.exp(self.log_tokens[0])), float(np.exp(self.log_tokens[-1]))


def monotone_curve(tokens, y) -> Curve | None:
    """Isotonic (non-increasing) regression of y on ln tokens, tied blocks pooled to one point at their mean log
    tokens; None when fewer than two distinct levels remain (a flat curve cannot be inverted)."""
    order = np.argsort(tokens)
    x = np.log(np.asarray(tokens, dtype=float)[order])
    fitted = isotonic_regression(np.asarray(y, dtype=float)[order], increasing=False)
    starts, ends = fitted.blocks[:-1], fitted.blocks[1:]
    if starts.size < 2:
        return None
    log_tokens = np.array([x[a:b].mean() for a, b in zip(starts, ends, strict=True)])
    levels = fitted.x[starts]
    return Curve(log_tokens, levels)


def invert(curve: Curve, targets) -> tuple[np.ndarray, np.ndarray]:
    """ln D where the curve reaches each target value, and a flag: 0 inside the curve, +1 better than its last
    point (ln D is then a lower bound: the curve's last log tokens), −1 worse than its first (an upper bound)."""
    targets = np.asarray(targets, dtype=float)
    flag = np.where(targets < curve.y[-1], 1, np.where(targets > curve.y[0], -1, 0))
    # PCHIP of ln D against −y (increasing): monotone, passes through every point, never overshoots.
    inverse = PchipInterpolator(-curve.y, curve.log_tokens, extrapolate=False)
    inside = inverse(-np.clip(targets, curve.y[-1], curve.y[0]))
    log_d = np.where(flag == 1, curve.log_tokens[-1], np.where(flag == -1, curve.log_tokens[0], inside))
    return log_d, flag


# ---------------------------------------------------------------------------------------------------------------
# Per group


def transfer_at(curves: list[Curve], budgets: np.ndarray, pruned: np.ndarray) -> list[dict]:
    """D_eff of one group at each budget: `curves` the random arm's curve per seed, `pruned` (seeds × budgets) the
    pruned values of the same seeds (y: lower is better; NaN where missing). One row per budget (_aggregate)."""
    log_d = np.full(pruned.shape, np.nan)
    flags = np.zeros(pruned.shape, dtype=int)
    for s, curve in enumerate(curves):
        there = np.isfinite(pruned[s])
        log_d[s, there], flags[s, there] = invert(curve, pruned[s, there])
    low_end = max((c.range[0] for c in curves), default=1.0)
    high_end = min((c.range[1] for c in curves), default=1.0)
    return [_aggregate(log_d[np.isfinite(log_d[:, k]), k], flags[np.isfinite(log_d[:, k]), k], float(budget),
                       low_end, high_end) for k, budget in enumerate(budgets)]


def _aggregate(log_d: np.ndarray, flags: np.ndarray, budget: float, low_end: float, high_end: float) -> dict:
    """One budget of one group over its seeds: D_eff, its interval (back-transformed), bound and open ends."""
    n = int(log_d.size)
    row = dict(n_seeds=n, d_eff_tokens=None, d_eff_low=None, d_eff_high=None, d_eff_bound="", open_low=False,
               open_high=False, reason="")
    if n == 0:
        return row | dict(reason="no seed has both the pruned value and a random learning curve")
    if (flags == 1).any() and (flags == -1).any():
        return row | dict(reason="seeds fall beyond the random curve on both sides: unknown")
    centre = float(log_d.mean())
    if (flags != 0).any():
        bound = ">" if (flags == 1).any() else "<"
        return row | dict(d_eff_tokens=math.exp(centre) - budget, d_eff_bound=bound,
                          reason="the pruned value lies beyond the random arm's measured curve in "
                                 f"{int((flags != 0).sum())} of {n} seed(s): a bound, not extrapolated")
    row["d_eff_tokens"] = math.exp(centre) - budget
    if n < 2:
        return row | dict(reason="one seed: no interval")
    half = float(_t(n - 1) * log_d.std(ddof=1) / math.sqrt(n))
    low, high = centre - half, centre + half
    row.update(open_low=low < math.log(low_end), open_high=high > math.log(high_end))
    row["d_eff_low"] = math.exp(max(low, math.log(low_end))) - budget
    row["d_eff_high"] = math.exp(min(high, math.log(high_end))) - budget
    return row


def _setting2(row: dict, budget: float, parent_tokens: float | None) -> str:
    """prune / scratch / undecided: is the pruned start worth more than P (D_eff > P), the whole interval?"""
    if parent_tokens is None or row["d_eff_tokens"] is None:
        return "unknown"
    p = float(parent_tokens)
    if row["d_eff_bound"] == ">":
        return "prune" if row["d_eff_tokens"] >= p else "undecided"
    if row["d_eff_bound"] == "<":
        return "scratch" if row["d_eff_tokens"] <= p else "undecided"
    if row["d_eff_low"] is None:
        return "undecided"
    # An open end is clipped to the measured curve: it only says "at least as far as this".
    if row["d_eff_low"] > p and not row["open_low"]:
        return "prune"
    if row["d_eff_high"] < p and not row["open_high"]:
        return "scratch"
    return "undecided"


@dataclass(frozen=True)
class Transfer:
    """D_eff per group and budget (`frame`, one row per setting as well, for verdicts.csv), the random arm's slope
    around P per group, and the parent's tokens per parameter."""

    available: bool
    reason: str
    frame: pl.DataFrame  # TRANSFER_SCHEMA
    slopes: pl.DataFrame  # granularity, method, ratio, n, slope, half (value per doubling of tokens around P)
    parent_tokens: float | None
    parent_params: float | None
    curves: dict = field(default_factory=dict, repr=False)  # (granularity, method, ratio) → seed-mean curve

    @property
    def tokens_per_parameter(self) -> float | None:
        if not self.parent_tokens or not self.parent_params:
            return None
        return self.parent_tokens / self.parent_params


def _empty(reason: str, parent_tokens, parent_params) -> Transfer:
    return Transfer(False, reason, pl.DataFrame(schema=TRANSFER_SCHEMA), _slope_frame([]), parent_tokens,
                    parent_params)


def _slope_frame(rows: list[dict]) -> pl.DataFrame:
    schema = {"granularity": pl.Utf8, "method": pl.Utf8, "ratio": pl.Float64, "n": pl.Int64, "slope": pl.Float64,
              "half": pl.Float64, "low_tokens": pl.Float64, "high_tokens": pl.Float64}
    return pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)


def effective_transfer(every_value: pl.DataFrame, higher_is_better: bool, settings: list[int],
                       parent_tokens: float | None, parent_params: float | None) -> Transfer:
    """D_eff for every group and budget from the seed-level headline values (budget-0 references included, so the
    setting-2 random point at P is on the curve); see the module text."""
    sign = -1.0 if higher_is_better else 1.0  # y: lower is better
    values = every_value.with_columns(y=pl.col("value") * sign)
    random = (values.filter((pl.col("init") == "random") & (pl.col("trained_tokens") > 0))
              .group_by([*ARM_KEYS, "seed", "trained_tokens"])
              .agg(pl.col("y").mean(), setting2=(pl.col("setting") == 2).any()))
    pruned = (values.filter((pl.col("init") == "pruned") & (pl.col("budget_tokens") > 0))
              .group_by([*ARM_KEYS, "seed", "budget_tokens"]).agg(pl.col("y").mean()))
    if random.height == 0 or pruned.height == 0:
        return _empty("no finished random-init and pruned cells to compare yet", parent_tokens, parent_params)
    random_parts = random.partition_by([*ARM_KEYS, "seed"], as_dict=True)
    rows, slope_rows, curves = [], [], {}
    for key, arm in sorted(pruned.partition_by(ARM_KEYS, as_dict=True).items()):
        budgets = sorted(arm["budget_tokens"].unique().to_list())
        wide = arm.pivot(on="budget_tokens", index="seed", values="y", aggregate_function="mean").sort("seed")
        seed_curves, pruned_values, slopes = [], [], []
        for seed, *values_at in wide.select("seed", *[str(b) for b in budgets]).iter_rows():
            points = random_parts.get((*key, seed))
            curve = None if points is None else monotone_curve(points["trained_tokens"].to_numpy(),
                                                                 points["y"].to_numpy())
            if curve is None:
                continue
            seed_curves.append(curve)
            pruned_values.append([np.nan if v is None else v for v in values_at])
            beyond_p = points.filter(pl.col("setting2"))  # P + B, measured: P itself is the B = 0 reference
            slope = _slope_around(beyond_p["trained_tokens"].to_numpy(), beyond_p["y"].to_numpy())
            if slope is not None:
                slopes.append(slope)
        found = transfer_at(seed_curves, np.array(budgets, dtype=float),
                            np.array(pruned_values, dtype=float).reshape(len(seed_curves), len(budgets)))
        for budget, row in zip(budgets, found, strict=True):
            if not seed_curves:
                row["reason"] = "no random-init learning curve with two distinct levels for these seeds"
            row["setting2"] = _setting2(row, float(budget), parent_tokens)
            rows.extend(dict(setting=s, granularity=key[0], method=key[1], ratio=key[2], budget_tokens=budget,
                             **row) for s in settings)
        if slopes:
            values_ = sign * np.array([s[0] for s in slopes])  # in the metric's own units
            n = values_.size
            half = float(_t(n - 1) * values_.std(ddof=1) / math.sqrt(n)) if n > 1 else None
            slope_rows.append(dict(granularity=key[0], method=key[1], ratio=key[2], n=n, slope=float(values_.mean()),
                                   half=half, low_tokens=float(np.mean([s[1] for s in slopes])),
                                   high_tokens=float(np.mean([s[2] for s in slopes]))))
    mean_curves = random.group_by([*ARM_KEYS, "trained_tokens"]).agg(pl.col("y").mean()).sort("trained_tokens")
    for key, part in mean_curves.partition_by(ARM_KEYS, as_dict=True).items():
        curves[key] = dict(tokens=part["trained_tokens"].to_numpy(), value=sign * part["y"].to_numpy())
    frame = pl.DataFrame(rows, schema=TRANSFER_SCHEMA).sort(["setting", "granularity", "method", "ratio",
                                                             "budget_tokens"])
    return Transfer(True, "", frame, _slope_frame(slope_rows), parent_tokens, parent_params, curves)


def _slope_around(tokens: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """The random arm's change of y (lower is better: negative = still improving) per doubling of tokens across its
    setting-2 points (P + B, from the B = 0 reference at P when it exists to the largest budget): (slope, from
    tokens, to tokens); None without two distinct such points."""
    if np.unique(tokens).size < 2:
        return None
    first, last = int(np.argmin(tokens)), int(np.argmax(tokens))
    doublings = math.log2(tokens[last] / tokens[first])
    return float((y[last] - y[first]) / doublings), float(tokens[first]), float(tokens[last])
