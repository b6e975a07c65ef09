"""The gap's trend with the budget: models that can predict it, checked against the seed replicates, a hold-out check
in every report, and crossovers only where the data resolve them.

Per group (granularity, method, ratio, setting) the data are the seed-level paired differences d[s, k] = pruned −
random (the seeds that have both arms at every budget used; budgets B_k). Budgets are branches of one trunk per
seed, so the d of one seed are correlated across budgets: the seed, not the cell, is the unit of replication.

**Candidates** for the seed-mean gap g(B), with x = ln(B / B̄) (B̄ the geometric mean of the budgets):
- *constant*: g = a (1 parameter);
- *linear in log B*: g = a + b·x (2; it crosses 0 once unless flat);
- *power*: g = a + b·(1 − e^(−γx))/γ, i.e. g∞ + c·B^(−γ) with g∞ = a + b/γ (3; γ on a grid in [−1, 3], refined
  around its best; γ → 0 is the linear model, γ > 0 approaches g∞, so the gap can approach 0 without crossing it,
  γ < 0 accelerates).

**Pure error and lack of fit.** The pure error is the seed × budget interaction of d (a two-way layout: each seed's
own level is taken out, as the design shares it across budgets), s²_e with (S − 1)(K − 1) degrees of freedom per
group, pooled over the ratios of a method in a setting (3 degrees of freedom of 2 seeds × 4 budgets are too few). A
candidate with p < K parameters is checked with F = S·RSS/(K − p) / s²_e (RSS: the seed means' squared residuals
around the fitted curve) against F(K − p, (S − 1)(K − 1)); it *passes* at p ≥ LOF_ALPHA. Among those that pass, the
smallest S·RSS/s²_e + 2p (Mallows' Cp, with the pure error as the variance) is chosen; when none passes there is no
model, and nothing is predicted.

**Intervals** are for the seed-mean gap that a rerun of the same seeds would measure at B. Each seed's own
differences are fitted with the chosen model (the same linear weights as the fit of the means), and the spread of
the per-seed predictions at B between seeds carries every correlation within a seed; the pure error is added for
the new cell's own noise: ĝ(B) ± t(ν)·√((s²_pred(B) + s²_e)/S), ν by Welch–Satterthwaite. For the power model the
interval is the union over every γ of its profile confidence set (S·ΔRSS(γ)/s²_e ≤ F(1, dof_e) at LEVEL), so γ's
uncertainty is in it, and the interval reported is the union over every model that passes its lack-of-fit test (the
data cannot tell them apart); the point is the chosen model's. The seed spread holds each seed's own level and slope,
which a rerun of the same seeds shares: conservative for that target. Confidence bands of the curve itself (for
crossovers) leave out the new-noise term and use t(S − 1).

**Hold-out check.** Fitted without the largest budget, each group's model predicts the seed-mean gap there; the
report counts how many measured gaps fall in the 90 % prediction intervals.

**Crossovers** (where the gap changes sign), from the verdicts (a verdict is significant when it is prune or
scratch, anything else is not):
- *interpolated*: significant on both sides (prune at one budget, scratch at a later one, nothing significant in
  between): between those budgets, at the sign change of the mean gaps (linear in log tokens);
- *unresolved*: the mean gap changes sign but not between two significant verdicts: a range, "between B1 and B2,
  not resolved";
- *extrapolated*: no sign change inside the grid, at least MIN_BUDGETS_TO_EXTRAPOLATE budgets (so that a curve
  approaching 0 can be fitted and checked), the chosen model passed its lack-of-fit test and the group's hold-out
  check (made, and passed), and every candidate that passes its lack-of-fit test has its 90 % band wholly across 0
  somewhere up to HORIZON × the largest budget; the budget where the chosen model reaches 0, with the range where
  its band contains 0. Always labelled an extrapolation;
- *none* / *not fitted*: counted, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from scipy import special

LEVEL = 0.90  # prediction intervals and crossover bands (two-sided)
LOF_ALPHA = 0.05  # a candidate passes its lack-of-fit test when p ≥ this
HORIZON = 4.0  # extrapolation at most this multiple of the largest budget
PREDICTION_MULTIPLES = (2.0, 4.0)  # predictions.csv: beyond the grid, these multiples of the largest budget
MIN_BUDGETS_TO_EXTRAPOLATE = 4  # a power curve (3 parameters) needs one more budget to be checked
GAMMAS = np.round(np.linspace(-1.0, 3.0, 41), 10)  # the power model's γ grid; 0 is the linear model
LINEAR = int(np.flatnonzero(GAMMAS == 0)[0])
MODELS = ("constant", "linear in log B", "power")
PARAMETERS = np.array([1, 2, 3])
CURVE_KEYS = ["granularity", "method", "ratio", "setting"]
EXTRAPOLATION_POINTS = 64  # the grid of budgets searched beyond the largest one
SIGNIFICANT = ("prune", "scratch")


def _t(dof, level: float = LEVEL) -> np.ndarray:
    """Two-sided `level` quantile of Student's t (fractional dof allowed); NaN where dof is not positive."""
    dof = np.asarray(dof, dtype=float)
    ok = np.isfinite(dof) & (dof > 0)
    return np.where(ok, special.stdtrit(np.where(ok, dof, 1.0), 0.5 + level / 2), np.nan)


REFINE = np.linspace(-0.05, 0.05, 21)  # the power model's γ is refined on this grid around the best of GAMMAS


def _basis(x: np.ndarray, gammas: np.ndarray) -> np.ndarray:
    """(1 − e^(−γx))/γ, shape gammas.shape + x.shape: every γ at every x; x itself for γ = 0."""
    g = np.asarray(gammas, dtype=float)[..., None]
    safe = np.where(g == 0, 1.0, g)
    return np.where(g == 0, x, -np.expm1(-g * x) / safe)


def _weights(x: np.ndarray, xn: np.ndarray, gammas: np.ndarray) -> np.ndarray:
    """Linear weights of the least-squares fit of a + b·f_γ(x) at new points: prediction at xn[m] = Σ_k w[m, k]·y[k],
    shape gammas.shape + (M, K)."""
    basis, basis_new = _basis(x, gammas), _basis(xn, gammas)
    fbar = basis.mean(axis=-1, keepdims=True)
    centred = basis - fbar
    sff = (centred**2).sum(axis=-1, keepdims=True)
    return 1.0 / x.size + ((basis_new - fbar) / sff)[..., :, None] * centred[..., None, :]


# ---------------------------------------------------------------------------------------------------------------
# The models, vectorised over groups that share their budgets and seed count


@dataclass(frozen=True)
class GapFits:
    """The three candidates fitted to G groups at once (data: G × seeds × budgets) and the choice among them."""

    budgets: np.ndarray  # (K,)
    data: np.ndarray  # (G, S, K) paired differences
    centre: float  # ln B̄
    means: np.ndarray  # (G, K)
    pure_error: np.ndarray  # (G,) s²_e, pooled over each group's family
    pure_dof: np.ndarray  # (G,) its degrees of freedom
    rss: np.ndarray  # (G, 3) per candidate (power: at its best γ)
    rss_gamma: np.ndarray  # (G, len(GAMMAS)): the power model's profile over the γ grid
    lof_p: np.ndarray  # (G, 3), NaN where the candidate cannot be checked (p ≥ K)
    passed: np.ndarray  # (G, 3) bool
    gamma: np.ndarray  # (G,) best γ of the power candidate (refined between grid points)
    choice: np.ndarray  # (G,) index into MODELS, −1: none passed

    @property
    def groups(self) -> int:
        return self.data.shape[0]

    @property
    def seeds(self) -> int:
        return self.data.shape[1]

    def model(self, g: int) -> str | None:
        return MODELS[self.choice[g]] if self.choice[g] >= 0 else None


def fit_gap_models(budgets, data, families=None) -> GapFits:
    """Fit and check every candidate for each group; `data` (G, S, K): d[group, seed, budget], no missing values,
    S ≥ 2 and K ≥ 2 (nothing can be checked otherwise). `families` (G,): groups with the same label pool their pure
    error (the noise of a method in a setting is shared by its ratios; 3 degrees of freedom per group are too few
    to judge a fit by); default: each group alone."""
    budgets = np.asarray(budgets, dtype=float)
    data = np.asarray(data, dtype=float)
    groups, seeds, k = data.shape
    if seeds < 2 or k < 2:
        raise ValueError(f"a gap model needs ≥ 2 seeds and ≥ 2 budgets, got {seeds} and {k}")
    x = np.log(budgets)
    centre = float(x.mean())
    x = x - centre
    means = data.mean(axis=1)
    interaction = data - data.mean(axis=1, keepdims=True) - data.mean(axis=2, keepdims=True) \
        + data.mean(axis=(1, 2), keepdims=True)
    squares = (interaction**2).sum(axis=(1, 2))
    labels = np.arange(groups) if families is None else np.unique(np.asarray(families), return_inverse=True)[1]
    members = np.bincount(labels)[labels]
    pure_dof = (seeds - 1) * (k - 1) * members
    pure_error = np.bincount(labels, weights=squares)[labels] / pure_dof
    # Exact synthetic data have no noise: a floor keeps the ratios finite (and every exact model passes).
    pure_error = np.maximum(pure_error, 1e-12 * (1.0 + (means**2).mean(axis=1)))
    mc = means - means.mean(axis=1, keepdims=True)
    syy = (mc**2).sum(axis=1)

    def rss_of(gammas):  # (G, L) or (L,) γ → (G, L) residual sum of squares of the seed means
        centred = _basis(x, gammas)
        centred = centred - centred.mean(axis=-1, keepdims=True)
        sff = (centred**2).sum(axis=-1)
        sfy = np.einsum("glk,gk->gl", np.broadcast_to(centred, (groups, *centred.shape[-2:])), mc)
        return np.maximum(syy[:, None] - sfy**2 / np.broadcast_to(sff, sfy.shape), 0.0)

    rss_gamma = rss_of(GAMMAS)
    best = np.argmin(rss_gamma, axis=1)
    local = np.clip(GAMMAS[best][:, None] + REFINE[None, :], GAMMAS[0], GAMMAS[-1])
    rss_local = rss_of(local)
    fine = np.argmin(rss_local, axis=1)
    rows = np.arange(groups)
    gamma = local[rows, fine]
    rss = np.column_stack([syy, rss_gamma[:, LINEAR], rss_local[rows, fine]])
    lof_dof = k - PARAMETERS
    checkable = lof_dof >= 1
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = seeds * rss / np.where(checkable, lof_dof, 1)[None, :] / pure_error[:, None]
        lof_p = np.where(checkable[None, :], special.fdtrc(np.where(checkable, lof_dof, 1)[None, :],
                                                           pure_dof[:, None], statistic), np.nan)
    passed = checkable[None, :] & (lof_p >= LOF_ALPHA)
    criterion = np.where(passed, seeds * rss / pure_error[:, None] + 2 * PARAMETERS[None, :], np.inf)
    choice = np.where(passed.any(axis=1), np.argmin(criterion, axis=1), -1)
    return GapFits(budgets, data, centre, means, pure_error, pure_dof, rss, rss_gamma, lof_p, passed, gamma, choice)


@dataclass(frozen=True)
class Prediction:
    """Per candidate (3), group (G) and budget (M): the fitted mean gap, the LEVEL prediction interval for a rerun's
    seed mean and the LEVEL confidence band of the curve."""

    mean: np.ndarray  # (3, G, M)
    pi_low: np.ndarray
    pi_high: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray

    def chosen(self, fits: GapFits) -> tuple[np.ndarray, ...]:
        """(mean, pi_low, pi_high, ci_low, ci_high), each (G, M): the chosen model's mean, and intervals that are the
        union over every candidate that passed its lack-of-fit test (the data cannot tell them apart, so the
        interval must hold each); NaN where none passed."""
        index = np.maximum(fits.choice, 0)
        rows = np.arange(fits.groups)
        mean = self.mean[index, rows]
        passed = fits.passed.T[:, :, None]  # (3, G, 1)
        low = lambda array: np.where(passed, array, np.inf).min(axis=0)  # noqa: E731
        high = lambda array: np.where(passed, array, -np.inf).max(axis=0)  # noqa: E731
        out = [mean, low(self.pi_low), high(self.pi_high), low(self.ci_low), high(self.ci_high)]
        for array in out:
            array[fits.choice < 0] = np.nan
        return tuple(out)


def predict(fits: GapFits, tokens, level: float = LEVEL) -> Prediction:
    """Every candidate's prediction at `tokens` (M,), with its intervals (see the module text)."""
    tokens = np.asarray(tokens, dtype=float)
    groups, seeds, k = fits.data.shape
    x = np.log(fits.budgets) - fits.centre
    xn = np.log(tokens) - fits.centre
    per_seed = np.einsum("gsk,cmk->gcsm", fits.data, _weights(x, xn, GAMMAS))  # (G, Γ, S, M)
    mean = per_seed.mean(axis=2)
    spread = per_seed.var(axis=2, ddof=1)
    power_seed = np.einsum("gsk,gmk->gsm", fits.data, _weights(x, xn, fits.gamma))  # at each group's own γ
    power_mean, power_spread = power_seed.mean(axis=1), power_seed.var(axis=1, ddof=1)
    constant = fits.data.mean(axis=2)  # (G, S): each seed's own level
    constant_mean = np.repeat(constant.mean(axis=1)[:, None], tokens.size, axis=1)
    constant_spread = np.repeat(constant.var(axis=1, ddof=1)[:, None], tokens.size, axis=1)

    s2e = fits.pure_error[:, None, None]
    dof_e = fits.pure_dof[:, None, None].astype(float)
    # Power: the union over γ's profile confidence set (the grid's γ in it, and the best γ itself).
    threshold = special.fdtri(1, fits.pure_dof, level)[:, None]
    inside = seeds * (fits.rss_gamma - fits.rss[:, 2:]) / fits.pure_error[:, None] <= threshold
    needed = inside.copy()
    needed[:, LINEAR] = True  # the linear model is a candidate of its own

    def intervals(m, v, s2, dof_s2, where=None):
        """PI and CI bounds; `where` (broadcast over the last axis): compute only there (Student's t quantiles
        are the costly part), NaN elsewhere."""
        with np.errstate(divide="ignore", invalid="ignore"):
            total = v + s2
            dof = total**2 / (v**2 / (seeds - 1) + s2**2 / dof_s2)
            quantile = np.full(dof.shape, np.nan)
            mask = np.ones(dof.shape, bool) if where is None else np.broadcast_to(where[..., None], dof.shape)
            quantile[mask] = _t(dof[mask], level)
            half_pi = quantile * np.sqrt(total / seeds)
            half_ci = _t(seeds - 1, level) * np.sqrt(v / seeds)
        return m - half_pi, m + half_pi, m - half_ci, m + half_ci

    g_lo, g_hi, gc_lo, gc_hi = intervals(mean, spread, s2e, dof_e, needed)
    p_lo, p_hi, pc_lo, pc_hi = intervals(power_mean, power_spread, s2e[:, 0], dof_e[:, 0])
    c_lo, c_hi, cc_lo, cc_hi = intervals(constant_mean, constant_spread, s2e[:, 0], dof_e[:, 0])

    def union(array, best, low: bool):
        masked = np.where(inside[:, :, None], array, np.inf if low else -np.inf)
        return np.minimum(masked.min(axis=1), best) if low else np.maximum(masked.max(axis=1), best)

    stack = lambda c, lin, power: np.stack([c, lin, power])  # noqa: E731
    return Prediction(
        mean=stack(constant_mean, mean[:, LINEAR], power_mean),
        pi_low=stack(c_lo, g_lo[:, LINEAR], union(g_lo, p_lo, True)),
        pi_high=stack(c_hi, g_hi[:, LINEAR], union(g_hi, p_hi, False)),
        ci_low=stack(cc_lo, gc_lo[:, LINEAR], union(gc_lo, pc_lo, True)),
        ci_high=stack(cc_hi, gc_hi[:, LINEAR], union(gc_hi, pc_hi, False)),
    )


@dataclass(frozen=True)
class Holdout:
    """Fit without the largest budget, predict it (per group of a GapFits)."""

    budget: float
    model: list[str | None]
    predicted: np.ndarray  # (G,)
    low: np.ndarray
    high: np.ndarray
    measured: np.ndarray
    covered: np.ndarray  # bool; False where no model (see `checked`)
    checked: np.ndarray  # bool: a model was chosen on the reduced grid


def holdout(fits: GapFits, families=None, level: float = LEVEL) -> Holdout | None:
    """The hold-out check of each group, or None when the grid has too few budgets (a fit needs ≥ 2 left)."""
    k = fits.budgets.size
    if k < 3:
        return None
    reduced = fit_gap_models(fits.budgets[:-1], fits.data[:, :, :-1], families)
    mean, low, high, _, _ = predict(reduced, fits.budgets[-1:], level).chosen(reduced)
    measured = fits.means[:, -1]
    checked = reduced.choice >= 0
    covered = checked & (low[:, 0] <= measured) & (measured <= high[:, 0])
    return Holdout(float(fits.budgets[-1]), [reduced.model(g) for g in range(fits.groups)], mean[:, 0], low[:, 0],
                   high[:, 0], measured, covered, checked)


# ---------------------------------------------------------------------------------------------------------------
# Crossovers of one group


@dataclass(frozen=True)
class Crossover:
    granularity: str
    method: str
    ratio: float
    setting: int
    kind: str  # interpolated | unresolved | extrapolated | none | not-fitted
    model: str | None  # the chosen gap model (MODELS), None when none was fitted or none passed
    budget: float | None  # point estimate (interpolated, extrapolated)
    low: float | None  # the range: interpolated/unresolved between these budgets; extrapolated: band contains 0
    high: float | None  # None with kind unresolved: beyond the largest budget
    direction: str  # "scratch catches up with pruning" | "pruning overtakes scratch"
    reason: str = ""  # kinds unresolved / none / not-fitted: why
    horizon: float | None = None
    open_low: bool = False  # extrapolated: the band contains 0 already at the largest budget
    open_high: bool = False  # extrapolated: still at the horizon
    largest_budget: float | None = None
    lof_p: float | None = None  # the chosen model's lack-of-fit p
    gamma: float | None = None  # power model: its γ
    seeds: int = 0
    fitted: bool = False  # the gap models were fitted (enough seeds and budgets)
    holdout: dict | None = None  # predicted, low, high, measured, covered, model; None: not checkable
    curve: dict | None = field(default=None, repr=False)  # tokens, mean, low, high (the 90 % prediction band)


def _direction(benefit_before: float) -> str:
    return "scratch catches up with pruning" if benefit_before > 0 else "pruning overtakes scratch"


def _log_zero(b0: float, b1: float, y0: float, y1: float) -> float:
    """Where the straight line in log tokens through (b0, y0), (b1, y1) is 0."""
    if y0 == y1:
        return math.sqrt(b0 * b1)
    l0, l1 = math.log(b0), math.log(b1)
    return math.exp(l0 + (0 - y0) / (y1 - y0) * (l1 - l0))


def inside_crossing(budgets: np.ndarray, benefit: np.ndarray, significant: np.ndarray,
                    ) -> tuple[str, float | None, float | None, float | None, str, float] | None:
    """A sign change inside the grid: (kind, budget, low, high, reason, the benefit's sign before it) or None.

    `significant`: +1 where the verdict is prune, −1 where scratch, 0 otherwise (in benefit orientation). Resolved
    (interpolated) when a significant verdict is followed by the opposite one with nothing significant between them;
    else, if the mean benefit changes sign, a range from the last significant budget before the change (or the
    smallest budget) to the first significant one after it (None: beyond the largest budget)."""
    marked = np.flatnonzero(significant != 0)
    for i, j in zip(marked[:-1], marked[1:], strict=True):
        if significant[i] == -significant[j]:
            at = None
            for a in range(i, j):
                if np.sign(benefit[a]) != np.sign(benefit[a + 1]) or benefit[a] == 0:
                    at = _log_zero(budgets[a], budgets[a + 1], benefit[a], benefit[a + 1])
                    break
            if at is None:  # the means do not change sign between two opposite significant verdicts: cannot be
                at = _log_zero(budgets[i], budgets[j], benefit[i], benefit[j])
            return "interpolated", at, float(budgets[i]), float(budgets[j]), "", float(significant[i])
    signs = np.sign(benefit)
    changes = np.flatnonzero(signs[1:] != signs[:-1])
    if not changes.size:
        return None
    first = int(changes[0])
    before = [int(i) for i in marked if i <= first]
    after = [int(j) for j in marked if j > first]
    low = float(budgets[before[-1]] if before else budgets[0])
    high = float(budgets[after[0]]) if after else None
    unresolved = ("no significant verdict on either side" if not before and not after else
                  "no significant verdict before it" if not before else
                  "no significant verdict after it" if not after else
                  "the verdicts on both sides favour the same arm")
    at = _log_zero(budgets[first], budgets[first + 1], benefit[first], benefit[first + 1])
    return "unresolved", at, low, high, unresolved, float(signs[first])


def _band_crossing(side: float, ci_low: np.ndarray, ci_high: np.ndarray) -> bool:
    """Whether the band lies wholly on the other side of 0 from `side` (the sign of the gap now) somewhere."""
    return bool(np.any(ci_high < 0)) if side > 0 else bool(np.any(ci_low > 0))


# ---------------------------------------------------------------------------------------------------------------
# From the results frames


@dataclass(frozen=True)
class GroupData:
    key: tuple  # (granularity, method, ratio, setting)
    budgets: np.ndarray
    seeds: list[int]
    data: np.ndarray | None  # (S, K) or None when not fitted
    reason: str = ""


def group_data(values: pl.DataFrame) -> list[GroupData]:
    """Per (granularity, method, ratio, setting): the budgets with ≥ 2 seeds in both arms, and the seeds that have
    both arms at every one of them (complete cases; a seed's differences must all be there to be a unit)."""
    keys = ["granularity", "method", "ratio", "setting", "budget_tokens", "seed"]
    pruned = values.filter(pl.col("init") == "pruned").group_by(keys).agg(pl.col("value").mean())
    random = values.filter(pl.col("init") == "random").group_by(keys).agg(pl.col("value").mean())
    diffs = pruned.join(random, on=keys, suffix="_random").with_columns(d=pl.col("value") - pl.col("value_random"))
    out = []
    parts = diffs.partition_by(CURVE_KEYS, as_dict=True)
    every = values.select(CURVE_KEYS).unique().sort(CURVE_KEYS).rows()
    for key in every:
        part = parts.get(key)
        if part is None:
            out.append(GroupData(key, np.array([]), [], None, "no seed has both arms at any budget"))
            continue
        counts = part.group_by("budget_tokens").len().filter(pl.col("len") >= 2)
        budgets = np.array(sorted(counts["budget_tokens"].to_list()), dtype=float)
        usable = part.filter(pl.col("budget_tokens").is_in(budgets.astype(np.int64).tolist()))
        complete = usable.group_by("seed").len().filter(pl.col("len") == budgets.size)["seed"].sort().to_list()
        if len(complete) < 2 or budgets.size < 2:
            seeds_there = part["seed"].n_unique()
            reason = (f"{seeds_there} seed(s) with both arms: a model needs ≥ 2 seeds to check it against"
                      if seeds_there < 2 else
                      f"{budgets.size} budget(s) with ≥ 2 paired seeds: a model needs ≥ 2 budgets" if budgets.size < 2
                      else "fewer than 2 seeds have both arms at every budget")
            out.append(GroupData(key, budgets, complete, None, reason))
            continue
        table = usable.filter(pl.col("seed").is_in(complete)).sort(["seed", "budget_tokens"])
        data = table["d"].to_numpy().reshape(len(complete), budgets.size)
        out.append(GroupData(key, budgets, complete, data))
    return out


@dataclass(frozen=True)
class Trend:
    """What the report shows of the gap's trend: one Crossover per group, the predictions, the hold-out check."""

    crossovers: list[Crossover]
    predictions: pl.DataFrame  # predictions.csv
    holdout: dict[int, dict]  # per setting: checked, covered, groups, budget(s)


PREDICTION_SCHEMA = {"setting": pl.Int64, "method": pl.Utf8, "ratio": pl.Float64, "budget_tokens": pl.Int64,
                     "predicted_gap": pl.Float64, "lo90": pl.Float64, "hi90": pl.Float64, "granularity": pl.Utf8,
                     "model": pl.Utf8, "extrapolated": pl.Boolean}


def trend(values: pl.DataFrame, gaps: pl.DataFrame, grid_budgets: list[int] | None = None) -> Trend:
    """Gap models, hold-out checks, crossovers and predictions for every group (see the module text).

    `values`: seed-level headline values (budgets > 0); `gaps`: stats.gap_table (its mean gaps and verdicts);
    `grid_budgets`: every budget the grid asks for (predictions.csv has a row for each, and for 2× and 4× the
    largest), default the budgets in `values`."""
    groups = group_data(values)
    grid = sorted(set(grid_budgets or values["budget_tokens"].unique().to_list()))
    largest_grid = float(max(grid)) if grid else 0.0
    targets = np.array([*grid, *(m * largest_grid for m in PREDICTION_MULTIPLES)], dtype=float)
    fitted: dict[tuple, tuple[GapFits, int, Prediction, Holdout | None, np.ndarray]] = {}
    buckets: dict[tuple, list[GroupData]] = {}
    for group in groups:
        if group.data is not None:
            buckets.setdefault((tuple(group.budgets), len(group.seeds)), []).append(group)
    for (budgets, _), members in buckets.items():
        budgets = np.array(budgets)
        families = [(m.key[0], m.key[1], m.key[3]) for m in members]  # granularity, method, setting
        fits = fit_gap_models(budgets, np.stack([m.data for m in members]), [str(f) for f in families])
        largest = budgets[-1]
        beyond = np.geomspace(largest, HORIZON * largest, EXTRAPOLATION_POINTS)
        curve = np.geomspace(budgets[0], HORIZON * largest, 48)
        points = np.concatenate([targets, beyond, curve])
        prediction = predict(fits, points)
        check = holdout(fits, [str(f) for f in families])
        for index, member in enumerate(members):
            fitted[member.key] = (fits, index, prediction, check, points)

    verdicts = {key: part.sort("budget_tokens") for key, part in gaps.partition_by(CURVE_KEYS, as_dict=True).items()}
    crossovers, rows = [], []
    n_targets = targets.size
    for group in groups:
        key = group.key
        granularity, method, ratio, setting = key
        part = verdicts.get(key)
        if part is None or part.height == 0:
            continue
        budgets_all = part["budget_tokens"].to_numpy().astype(float)
        benefit = part["benefit"].to_numpy()
        words = part["verdict"].fill_null("").to_list()
        significant = np.array([(1 if w == "prune" else -1) if w in SIGNIFICANT else 0 for w in words])
        common = dict(granularity=granularity, method=method, ratio=ratio, setting=setting,
                      largest_budget=float(budgets_all.max()), seeds=len(group.seeds))
        model = lof_p = gamma = curve = check_row = None
        choice = -1
        if key in fitted:
            fits, g, prediction, check, points = fitted[key]
            choice = int(fits.choice[g])
            model = fits.model(g)
            lof_p = float(fits.lof_p[g, choice]) if choice >= 0 else None
            gamma = float(fits.gamma[g]) if choice == 2 else None
            mean, pi_low, pi_high, ci_low, ci_high = prediction.chosen(fits)
            if check is not None:
                check_row = dict(budget=check.budget, model=check.model[g], checked=bool(check.checked[g]),
                                 covered=bool(check.covered[g]), predicted=float(check.predicted[g]),
                                 low=float(check.low[g]), high=float(check.high[g]),
                                 measured=float(check.measured[g]))
            largest = float(fits.budgets[-1])
            for i, tokens in enumerate(targets):
                rows.append(dict(setting=setting, method=method, ratio=ratio, budget_tokens=int(round(tokens)),
                                 predicted_gap=_finite(mean[g, i]), lo90=_finite(pi_low[g, i]),
                                 hi90=_finite(pi_high[g, i]), granularity=granularity, model=model,
                                 extrapolated=bool(tokens > largest)))
            if choice >= 0:
                span = slice(n_targets + EXTRAPOLATION_POINTS, None)
                curve = dict(tokens=points[span], mean=mean[g, span], low=pi_low[g, span], high=pi_high[g, span])
        else:
            for tokens in targets:
                rows.append(dict(setting=setting, method=method, ratio=ratio, budget_tokens=int(round(tokens)),
                                 predicted_gap=None, lo90=None, hi90=None, granularity=granularity, model=None,
                                 extrapolated=bool(tokens > largest_grid)))
        common.update(model=model, lof_p=lof_p, gamma=gamma, curve=curve, holdout=check_row, fitted=key in fitted)
        inside = inside_crossing(budgets_all, benefit, significant)
        if inside is not None:
            kind, at, low, high, reason, before = inside
            crossovers.append(Crossover(kind=kind, budget=at, low=low, high=high, reason=reason,
                                        direction=_direction(before), **common))
            continue
        if key not in fitted:
            crossovers.append(Crossover(kind="not-fitted", budget=None, low=None, high=None,
                                        direction=_direction(benefit[-1]), reason=group.reason, **common))
            continue
        crossovers.append(extrapolate(fits, g, prediction, check_row, points, n_targets, benefit[-1], common))
    predictions = pl.DataFrame(rows, schema=PREDICTION_SCHEMA) if rows else pl.DataFrame(schema=PREDICTION_SCHEMA)
    return Trend(crossovers, predictions.sort(["setting", "method", "ratio", "budget_tokens"]),
                 holdout_summary(crossovers))


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def extrapolate(fits: GapFits, g: int, prediction: Prediction, check: dict | None, points: np.ndarray,
                 n_targets: int, benefit_last: float, common: dict) -> Crossover:
    """Kind extrapolated, or none with the reason (see the module text)."""
    direction = _direction(benefit_last)
    choice = int(fits.choice[g])
    none = dict(kind="none", budget=None, low=None, high=None, direction=direction, horizon=HORIZON)
    if choice < 0:
        return Crossover(reason="no gap model passed its lack-of-fit test", **none, **common)
    if fits.budgets.size < MIN_BUDGETS_TO_EXTRAPOLATE:
        return Crossover(reason=f"{fits.budgets.size} budgets: a curve approaching 0 cannot be checked with fewer "
                                f"than {MIN_BUDGETS_TO_EXTRAPOLATE}, so no extrapolation", **none, **common)
    span = slice(n_targets, n_targets + EXTRAPOLATION_POINTS)
    tokens = points[span]
    mean = prediction.mean[choice, g, span]
    side = float(np.sign(fits.means[g, -1]))  # the measured mean gap at the largest budget
    changed = np.flatnonzero(np.sign(mean) != side)
    if not changed.size:
        what = {0: "constant", 1: "linear trend", 2: "power curve"}[choice]
        return Crossover(reason=f"the chosen {what} does not reach 0 within {HORIZON:g}× the largest budget",
                         **none, **common)
    first = int(changed[0])
    at = _log_zero(tokens[first - 1], tokens[first], mean[first - 1], mean[first]) if first else float(tokens[0])
    if check is None or not check["checked"]:
        return Crossover(reason=f"the trend reaches 0 at ≈ {at:.3g} tokens, but the hold-out check could not be made "
                                "(no model passed without the largest budget): not extrapolated", **none, **common)
    if not check["covered"]:
        return Crossover(reason=f"the trend reaches 0 at ≈ {at:.3g} tokens, but the model failed the hold-out check "
                                "(it did not predict the largest budget): not extrapolated", **none, **common)
    agree = all(_band_crossing(side, prediction.ci_low[c, g, span], prediction.ci_high[c, g, span])
                for c in range(len(MODELS)) if fits.passed[g, c])
    if not agree:
        return Crossover(reason=f"the trend reaches 0 at ≈ {at:.3g} tokens, within {HORIZON:g}×, but not every model "
                                f"that fits the data has its {LEVEL:.0%} band across 0 there: not resolved",
                         **none, **common)
    _, _, _, ci_low, ci_high = prediction.chosen(fits)
    ci_low, ci_high = ci_low[g, span], ci_high[g, span]
    contains = (ci_low <= 0) & (ci_high >= 0)
    index = np.flatnonzero(contains)
    low = float(tokens[index[0]]) if index.size else at
    high = float(tokens[index[-1]]) if index.size else at
    return Crossover(kind="extrapolated", budget=at, low=low, high=high, direction=direction, horizon=HORIZON,
                     open_low=bool(contains[0]), open_high=bool(contains[-1]), **common)


def holdout_summary(crossovers: list[Crossover]) -> dict[int, dict]:
    """Per setting: how many groups' held-out largest budget was checked and how many fell in the 90 % interval."""
    out: dict[int, dict] = {}
    for c in crossovers:
        entry = out.setdefault(c.setting, dict(checked=0, covered=0, groups=0, budgets=set(), models={}))
        entry["groups"] += 1
        if c.holdout and c.holdout["checked"]:
            entry["checked"] += 1
            entry["covered"] += int(c.holdout["covered"])
            entry["budgets"].add(c.holdout["budget"])
        if c.model:
            entry["models"][c.model] = entry["models"].get(c.model, 0) + 1
    for entry in out.values():
        entry["budgets"] = sorted(entry["budgets"])
    return out


def predictions_csv(predictions: pl.DataFrame) -> str:
    """predictions.csv: one row per group and budget (every budget of the grid, and 2× and 4× the largest), with
    the chosen model's predicted gap and its 90 % prediction interval; empty values where no model passed."""
    return predictions.select(list(PREDICTION_SCHEMA)).write_csv(float_precision=6)
