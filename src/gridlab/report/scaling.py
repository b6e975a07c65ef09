"""Scaling fits and crossovers: where the pruned − random gap changes sign as the budget B grows.

Per (granularity, method, ratio, setting), in this order:
1. *interpolated*: the mean gap changes sign between two measured budgets → linear in log tokens between them;
2. *power law*: each arm's seed-level values fitted with L(D) = E + A·D^(−α); when both fits converge, the first
   crossing of the fitted curves beyond the largest budget, up to POWER_LAW_HORIZON × it, with a parametric
   bootstrap interval;
3. *linear gap in log tokens*: otherwise (the usual case when the curves are straight in log tokens over a short
   range) the gap itself fitted as a + b·ln B (OLS over seed-level differences when seeds pair, else one line per
   arm), which always converges; its zero is reported only within LINEAR_HORIZON × the largest budget, with the
   95 % interval of the budgets where the fitted gap's confidence band contains 0 (Fieller's construction), and is
   always labelled an extrapolation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from gridlab.report.stats import t_quantile

POWER_LAW_HORIZON = 10.0  # the power-law crossover is searched up to this multiple of the largest budget
LINEAR_HORIZON = 4.0  # the linear trend is extrapolated at most this multiple beyond the largest budget
ALPHA_BOUNDS = (1e-3, 3.0)
MIN_POINTS_FOR_FIT = 4  # power law: three parameters plus at least one degree of freedom
MIN_BUDGETS_FOR_LINE = 3  # linear gap: two parameters plus one budget to see whether it is straight
BOOTSTRAP_DRAWS = 400
MIN_CROSSING_FRACTION = 0.5  # a power-law crossover is reported only when most bootstrap draws cross too
CURVE_KEYS = ["granularity", "method", "ratio", "setting"]


# ---------------------------------------------------------------------------------------------------------------
# Power law per arm


@dataclass(frozen=True)
class PowerLawFit:
    """L(D) = E + A·(D/reference)^(−α), fitted on the lower-is-better orientation of the metric."""

    converged: bool
    message: str
    reference: float = 1.0
    params: tuple[float, float, float] | None = None  # (E, A, alpha)
    covariance: np.ndarray | None = field(default=None, repr=False)
    sign: float = 1.0  # +1: fitted on the metric itself; −1: fitted on −metric (higher-is-better metrics)

    def predict(self, tokens) -> np.ndarray:
        """The fitted curve in the metric's own orientation."""
        e, a, alpha = self.params
        return self.sign * (e + a * (np.asarray(tokens, dtype=float) / self.reference) ** (-alpha))


def _power_law(x, e, a, alpha):
    return e + a * x ** (-alpha)


def _power_law_jacobian(x, e, a, alpha):
    power = x ** (-alpha)
    return np.column_stack([np.ones_like(x), power, -a * power * np.log(x)])


STARTING_ALPHAS = np.geomspace(0.01, 3.0, 48)


def _starting_point(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Best (E, A, α) over a grid of α, with E and A solved by linear least squares for each α (all α at once:
    a straight-line fit of y on x^(−α))."""
    alphas = STARTING_ALPHAS
    z = x[None, :] ** -alphas[:, None]
    z_centred = z - z.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = (z_centred @ (y - y.mean())) / np.einsum("ij,ij->i", z_centred, z_centred)
    e = y.mean() - a * z.mean(axis=1)
    error = ((e[:, None] + a[:, None] * z - y[None, :]) ** 2).sum(axis=1)
    error[~((a >= 0) & (e <= y.min()) & np.isfinite(error))] = np.inf
    best = int(np.argmin(error))
    if np.isinf(error[best]):
        spread = float(np.ptp(y)) or 1.0
        return float(y.min()) - 0.1 * spread, spread, 0.3
    return float(e[best]), float(a[best]), float(alphas[best])


def fit_power_law(
    tokens: np.ndarray, values: np.ndarray, higher_is_better: bool = False, max_evaluations: int = 2000
) -> PowerLawFit:
    """Least-squares fit of L(D) = E + A·D^(−α) (A ≥ 0, α in ALPHA_BOUNDS, E ≤ min L) by `scipy.optimize.curve_fit`.

    Needs at least MIN_POINTS_FOR_FIT distinct token counts; otherwise the fit is under-determined and is not made.
    A fit that does not converge, or whose covariance cannot be estimated (e.g. a flat curve, where α is not
    identifiable), or that ends with A = 0 or α on a bound, is returned with `converged=False` and the reason.
    """
    from scipy import optimize  # here: ~0.7 s to import, and the plotting process unpickles fits without fitting

    tokens = np.asarray(tokens, dtype=float)
    sign = -1.0 if higher_is_better else 1.0
    y = sign * np.asarray(values, dtype=float)
    distinct = np.unique(tokens).size
    if distinct < MIN_POINTS_FOR_FIT:
        return PowerLawFit(False, f"under-determined: {distinct} budget(s), a fit needs {MIN_POINTS_FOR_FIT}")
    reference = float(tokens.min())
    x = tokens / reference
    start = _starting_point(x, y)
    if start[2] <= STARTING_ALPHAS[0]:
        # The best α of the grid is its smallest: the curve is straight in log tokens over this range, where
        # E + A·D^(−α) tends to a line in ln D as α → 0 (A → ∞): α, A and E are not identifiable, and the optimizer
        # would only walk to α's bound.
        return PowerLawFit(False, f"fit did not converge to an interior solution (the values are straight in log "
                           f"tokens: best α ≤ {STARTING_ALPHAS[0]:g})", reference, sign=sign)
    upper_e = float(y.min())
    start = (min(start[0], upper_e), max(start[1], 0.0), min(max(start[2], ALPHA_BOUNDS[0]), ALPHA_BOUNDS[1]))
    bounds = ([-np.inf, 0.0, ALPHA_BOUNDS[0]], [upper_e + 1e-12, np.inf, ALPHA_BOUNDS[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", optimize.OptimizeWarning)
        try:
            params, cov = optimize.curve_fit(
                _power_law, x, y, p0=start, bounds=bounds, jac=_power_law_jacobian, max_nfev=max_evaluations,
                method="trf",
            )
        except (RuntimeError, optimize.OptimizeWarning) as error:
            return PowerLawFit(False, f"fit did not converge ({error})", reference, sign=sign)
    params = tuple(float(p) for p in params)
    if not np.all(np.isfinite(cov)):
        return PowerLawFit(False, "fit did not converge (parameter covariance not estimable)", reference,
                           params, None, sign)
    e, a, alpha = params
    if a <= 1e-6 * (abs(e) + 1) or alpha <= ALPHA_BOUNDS[0] * 1.001 or alpha >= ALPHA_BOUNDS[1] * 0.999:
        # A (numerically) 0 or α at a bound: the data show no power-law decrease, so E, A and α mean nothing.
        return PowerLawFit(False, f"fit did not converge to an interior solution (A = {a:.3g}, α = {alpha:.3g} "
                           f"at a bound)", reference, params, None, sign)
    return PowerLawFit(True, "converged", reference, params, cov, sign)


def _first_crossing(grid: np.ndarray, benefit: np.ndarray) -> np.ndarray:
    """Per row of `benefit` (draws × grid points), the first grid point where its sign differs from column 0."""
    changed = np.sign(benefit) != np.sign(benefit[:, :1])
    has = changed.any(axis=1)
    first = np.argmax(changed, axis=1)
    result = np.full(benefit.shape[0], np.nan)
    rows = np.nonzero(has)[0]
    if rows.size:
        i = first[rows]
        b0, b1 = benefit[rows, i - 1], benefit[rows, i]
        l0, l1 = np.log(grid[i - 1]), np.log(grid[i])
        result[rows] = np.exp(l0 + (0 - b0) / (b1 - b0) * (l1 - l0))
    return result


def _draw_params(fit: PowerLawFit, rng: np.random.Generator, draws: int) -> np.ndarray:
    sample = rng.multivariate_normal(np.array(fit.params), fit.covariance, size=draws, check_valid="ignore")
    sample[:, 1] = np.clip(sample[:, 1], 0, None)
    sample[:, 2] = np.clip(sample[:, 2], *ALPHA_BOUNDS)
    return sample


def _curve(fit: PowerLawFit, params: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    x = tokens[None, :] / fit.reference
    return fit.sign * (params[:, :1] + params[:, 1:2] * x ** (-params[:, 2:3]))


def extrapolate_crossover(
    pruned: PowerLawFit, random: PowerLawFit, largest_budget: float, random_offset: float,
    horizon: float = POWER_LAW_HORIZON, seed: int = 0,
) -> tuple[float | None, float | None, float | None, float]:
    """Where the fitted curves cross beyond the largest budget, up to `horizon` × it.

    Compares pruned at D with random at D + random_offset. Returns (crossover, 2.5 %, 97.5 % quantile, fraction of
    draws that cross); the interval comes from a parametric bootstrap over each fit's covariance.
    """
    grid = np.geomspace(largest_budget, horizon * largest_budget, 240)

    def gap(p_params, r_params):
        return _curve(pruned, p_params, grid) - _curve(random, r_params, grid + random_offset)

    point = _first_crossing(grid, gap(np.array([pruned.params]), np.array([random.params])))[0]
    rng = np.random.default_rng(seed)
    drawn = _first_crossing(
        grid, gap(_draw_params(pruned, rng, BOOTSTRAP_DRAWS), _draw_params(random, rng, BOOTSTRAP_DRAWS))
    )
    crossed = drawn[np.isfinite(drawn)]
    fraction = crossed.size / BOOTSTRAP_DRAWS
    if math.isnan(point):
        return None, None, None, fraction
    low, high = (np.quantile(crossed, [0.025, 0.975]) if crossed.size else (np.nan, np.nan))
    return float(point), float(low), float(high), fraction


# ---------------------------------------------------------------------------------------------------------------
# Linear gap in log tokens


@dataclass(frozen=True)
class Line:
    """Ordinary least squares y = ybar + slope·(x − xbar) over n points, x = ln tokens."""

    n: int
    xbar: float
    ybar: float
    slope: float
    sxx: float
    s2: float  # residual variance, n − 2 degrees of freedom

    @property
    def dof(self) -> int:
        return self.n - 2

    def mean(self, x: np.ndarray) -> np.ndarray:
        return self.ybar + self.slope * (np.asarray(x, dtype=float) - self.xbar)

    def variance(self, x: np.ndarray) -> np.ndarray:
        return self.s2 * (1 / self.n + (np.asarray(x, dtype=float) - self.xbar) ** 2 / self.sxx)


def fit_line(tokens: np.ndarray, values: np.ndarray) -> Line:
    x, y = np.log(np.asarray(tokens, dtype=float)), np.asarray(values, dtype=float)
    xbar, ybar = float(x.mean()), float(y.mean())
    sxx = float(((x - xbar) ** 2).sum())
    slope = float(((x - xbar) * (y - ybar)).sum() / sxx)
    residual = y - (ybar + slope * (x - xbar))
    return Line(int(x.size), xbar, ybar, slope, sxx, float((residual**2).sum() / max(x.size - 2, 1)))


@dataclass(frozen=True)
class LinearGapFit:
    """The gap pruned − random as a straight line in ln B: one line through the per-seed differences when the seeds
    pair at every budget, else the difference of one line per arm (independent, Welch–Satterthwaite dof)."""

    lines: tuple[Line, ...]  # (differences,) or (pruned, random)
    largest_budget: float
    smallest_budget: float

    @property
    def paired(self) -> bool:
        return len(self.lines) == 1

    def predict(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        """Fitted gap at `tokens` and the half-width of its 95 % confidence band."""
        x = np.log(np.asarray(tokens, dtype=float))
        if self.paired:
            (line,) = self.lines
            return line.mean(x), t_quantile(line.dof) * np.sqrt(line.variance(x))
        pruned, random = self.lines
        a, b = pruned.variance(x), random.variance(x)
        with np.errstate(invalid="ignore", divide="ignore"):
            dof = (a + b) ** 2 / (a**2 / pruned.dof + b**2 / random.dof)
        return pruned.mean(x) - random.mean(x), t_quantile(dof) * np.sqrt(a + b)

    def zero(self) -> float | None:
        """ln B where the fitted gap is 0 (None when the line is flat)."""
        if self.paired:
            intercept, slope = self.lines[0].ybar - self.lines[0].slope * self.lines[0].xbar, self.lines[0].slope
        else:
            p, r = self.lines
            intercept = (p.ybar - p.slope * p.xbar) - (r.ybar - r.slope * r.xbar)
            slope = p.slope - r.slope
        return None if slope == 0 else -intercept / slope


def fit_linear_gap(points: pl.DataFrame, paired: bool) -> LinearGapFit | str:
    """`points`: seed-level rows (init, budget_tokens, seed, value) of one (granularity, method, ratio, setting),
    budgets > 0. The fit, or why it is not made."""
    budgets = np.unique(points["budget_tokens"].to_numpy())
    if budgets.size < MIN_BUDGETS_FOR_LINE:
        return f"under-determined: {budgets.size} budget(s), a line needs {MIN_BUDGETS_FOR_LINE}"
    if paired:
        pruned = points.filter(pl.col("init") == "pruned").select("budget_tokens", "seed", "value")
        random = points.filter(pl.col("init") == "random").select("budget_tokens", "seed", "value")
        diffs = pruned.join(random, on=["budget_tokens", "seed"], suffix="_random")
        lines = (fit_line(diffs["budget_tokens"].to_numpy(), (diffs["value"] - diffs["value_random"]).to_numpy()),)
    else:
        lines = tuple(fit_line(arm["budget_tokens"].to_numpy(), arm["value"].to_numpy())
                      for arm in (points.filter(pl.col("init") == init) for init in ("pruned", "random")))
    if any(line.dof < 1 for line in lines):
        return "under-determined: one point per budget (a single seed) leaves the line no residual to measure"
    return LinearGapFit(lines, float(budgets.max()), float(budgets.min()))


def linear_crossover(fit: LinearGapFit, horizon: float = LINEAR_HORIZON,
                     ) -> tuple[float | None, float | None, float | None, bool, bool, str]:
    """The zero of the fitted gap when it lies beyond the largest budget and within `horizon` × it: (budget, low,
    high, open_low, open_high, reason). low/high: the budgets in [largest, horizon × largest] where the gap's 95 %
    band contains 0; open_low: the band contains 0 already at the largest budget; open_high: still at the horizon."""
    x_max = math.log(fit.largest_budget)
    zero = fit.zero()
    end = x_max + math.log(horizon)
    if zero is None:
        return None, None, None, False, False, "the fitted gap does not change with the budget"
    gap_now = float(fit.predict([fit.largest_budget])[0][0])
    if zero <= x_max:
        if fit.smallest_budget < math.exp(zero):
            reason = "the fitted line changes sign inside the grid though the measured gaps do not"
        else:
            reason = "the fitted gap moves away from 0 as the budget grows"
        return None, None, None, False, False, reason
    if zero > end:
        at = math.exp(zero)
        return None, None, None, False, False, (
            f"the fitted gap ({gap_now:+.3g} at the largest budget) would reach 0 only beyond {horizon:g}× the largest "
            f"budget (at ≈ {at:.3g} tokens, too far to extrapolate)")
    xs = np.linspace(x_max, end, 240)
    gap, half = fit.predict(np.exp(xs))
    inside = np.abs(gap) <= half
    if not inside.any():  # the band is narrower than the grid spacing: the point itself is the interval
        return math.exp(zero), math.exp(zero), math.exp(zero), False, False, ""
    index = np.nonzero(inside)[0]
    return (math.exp(zero), float(math.exp(xs[index[0]])), float(math.exp(xs[index[-1]])), bool(inside[0]),
            bool(inside[-1]), "")


# ---------------------------------------------------------------------------------------------------------------
# Crossovers per group


@dataclass(frozen=True)
class Crossover:
    granularity: str
    method: str
    ratio: float
    setting: int
    kind: str  # interpolated | extrapolated | none | not-fitted
    model: str | None  # "sign change" | "power law" | "linear gap in log tokens" | None
    budget: float | None
    low: float | None
    high: float | None
    direction: str  # "scratch catches up with pruning" | "pruning overtakes scratch"
    reason: str = ""  # kind none / not-fitted: why there is no crossover to report
    horizon: float | None = None
    open_low: bool = False  # the interval reaches down to the largest measured budget
    open_high: bool = False  # the interval reaches the horizon
    fraction: float | None = None  # power law: share of bootstrap draws that cross within the horizon
    largest_budget: float | None = None
    fits: dict[str, PowerLawFit] = field(default_factory=dict, repr=False)  # "pruned", "random"
    linear: LinearGapFit | None = field(default=None, repr=False)
    random_offset: float = 0.0  # tokens the random arm trains beyond the budget (setting 2: parent tokens)


def interpolate_sign_change(budgets: np.ndarray, benefit: np.ndarray) -> tuple[float, float, float] | None:
    """First budget where the benefit changes sign, linear in log tokens; (crossover, lower, upper budget)."""
    for i in range(len(budgets) - 1):
        b0, b1 = benefit[i], benefit[i + 1]
        if b0 == 0:
            return float(budgets[i]), float(budgets[i]), float(budgets[i])
        if np.sign(b0) != np.sign(b1):
            l0, l1 = np.log(budgets[i]), np.log(budgets[i + 1])
            at = l0 + (0 - b0) / (b1 - b0) * (l1 - l0)
            return float(np.exp(at)), float(budgets[i]), float(budgets[i + 1])
    return None


def _direction(benefit_before: float) -> str:
    return "scratch catches up with pruning" if benefit_before > 0 else "pruning overtakes scratch"


def crossovers(values: pl.DataFrame, gaps: pl.DataFrame, parent_tokens: float | None, higher_is_better: bool,
               ) -> list[Crossover]:
    """Crossover per (granularity, method, ratio, setting) from the seed-level values (budgets > 0) and the gaps."""
    results: list[Crossover] = []
    pruned_fits: dict[tuple, PowerLawFit] = {}
    gap_parts = gaps.sort("budget_tokens").partition_by(CURVE_KEYS, as_dict=True)
    value_parts = values.partition_by(["granularity", "method", "ratio"], as_dict=True)
    for (granularity, method, ratio, setting), rows in sorted(gap_parts.items()):
        key = dict(granularity=granularity, method=method, ratio=ratio, setting=setting)
        budgets = rows["budget_tokens"].to_numpy().astype(float)
        benefit = rows["benefit"].to_numpy()
        offset = float(parent_tokens or 0) if setting == 2 else 0.0
        arm_values = value_parts[(granularity, method, ratio)]
        if (granularity, method, ratio) not in pruned_fits:
            # A pruned cell is listed once per setting with the same training run: fit each budget × seed once.
            points = arm_values.filter(pl.col("init") == "pruned").unique(["budget_tokens", "seed"])
            pruned_fits[(granularity, method, ratio)] = fit_power_law(
                points["budget_tokens"].to_numpy(), points["value"].to_numpy(), higher_is_better)
        in_setting = arm_values.filter((pl.col("setting") == setting)
                                       & pl.col("budget_tokens").is_in(rows["budget_tokens"].implode()))
        random_points = in_setting.filter(pl.col("init") == "random")
        fits = {
            "pruned": pruned_fits[(granularity, method, ratio)],
            "random": fit_power_law(random_points["budget_tokens"].to_numpy() + offset,
                                    random_points["value"].to_numpy(), higher_is_better),
        }
        linear = fit_linear_gap(in_setting, paired=bool((rows["test"] == "paired").all()))
        common = dict(**key, fits=fits, random_offset=offset, largest_budget=float(budgets.max()),
                      linear=linear if isinstance(linear, LinearGapFit) else None)
        inside = interpolate_sign_change(budgets, benefit)
        if inside is not None:
            at, low, high = inside
            results.append(Crossover(kind="interpolated", model="sign change", budget=at, low=low, high=high,
                                     direction=_direction(benefit[0]), **common))
            continue
        if all(fit.converged for fit in fits.values()):
            at, low, high, fraction = extrapolate_crossover(fits["pruned"], fits["random"], float(budgets.max()),
                                                            offset)
            if at is None or fraction < MIN_CROSSING_FRACTION:
                reason = ("the fitted curves do not cross there" if at is None else
                          f"the fitted curves cross at {at:.3g} tokens, but only {fraction:.0%} of the bootstrap draws "
                          f"do: not a crossover the data support")
                results.append(Crossover(kind="none", model="power law", budget=None, low=None, high=None,
                                         direction=_direction(benefit[-1]), horizon=POWER_LAW_HORIZON,
                                         fraction=fraction, reason=reason, **common))
            else:
                results.append(Crossover(kind="extrapolated", model="power law", budget=at, low=low, high=high,
                                         direction=_direction(benefit[-1]), horizon=POWER_LAW_HORIZON,
                                         fraction=fraction, **common))
            continue
        power_reason = "; ".join(f"{arm}: {fit.message}" for arm, fit in fits.items() if not fit.converged)
        if not isinstance(linear, LinearGapFit):
            results.append(Crossover(kind="not-fitted", model=None, budget=None, low=None, high=None,
                                     direction=_direction(benefit[-1]),
                                     reason=f"power law not converged ({power_reason}); linear gap: {linear}",
                                     **common))
            continue
        at, low, high, open_low, open_high, reason = linear_crossover(linear)
        results.append(Crossover(
            kind="extrapolated" if at is not None else "none", model="linear gap in log tokens", budget=at, low=low,
            high=high, direction=_direction(benefit[-1]), reason=reason, horizon=LINEAR_HORIZON, open_low=open_low,
            open_high=open_high, **common))
    return results
