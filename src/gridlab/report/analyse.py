"""Results database → the tables the report lays out.

Everything except `read_results` is a pure function over polars DataFrames. Conventions used throughout:

- a *group* is one (granularity, method, ratio, init, setting, budget) combination; its seeds are the samples;
- *gap* = mean(pruned) − mean(random) of the headline metric, in the metric's own units;
- *benefit* = the gap signed so that positive means pruning is better (−gap for lower-is-better metrics);
- intervals are two-sided 95 % Student-t intervals; gaps use Welch's unequal-variance interval.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
from scipy import optimize, stats

from gridlab.errors import UserError

CONFIDENCE = 0.95
GROUP_KEYS = ["granularity", "method", "ratio", "init", "setting", "budget_tokens"]
ARM_KEYS = ["granularity", "method", "ratio", "setting", "budget_tokens"]
STATUSES = ("pending", "running", "done", "failed", "cancelled")
GRANULARITY_ORDER = {"depth": 0, "width": 1, "sparse": 2}
# The extrapolated crossover is searched up to this multiple of the largest measured budget.
EXTRAPOLATION_HORIZON = 10.0
ALPHA_BOUNDS = (1e-3, 3.0)
MIN_POINTS_FOR_FIT = 4  # three parameters plus at least one degree of freedom
BOOTSTRAP_DRAWS = 400

_LOWER_IS_BETTER_WORDS = ("loss", "ppl", "perplexity", "bits_per_byte", "bpb", "error")


def higher_is_better(metric: str) -> bool:
    """Direction of a metric, from its name.

    Losses, perplexities and bits-per-byte (anywhere: `val_loss`, `eval/<corpus>/loss`,
    `lm_eval/wikitext/word_perplexity`) are lower-is-better; other `lm_eval/<task>/<metric>` names (acc, acc_norm,
    exact_match, f1, mcc, ...) are higher-is-better; any other name is treated as lower-is-better.
    """
    leaf = metric.rsplit("/", 1)[-1].split(",", 1)[0].lower()
    if any(word in leaf for word in _LOWER_IS_BETTER_WORDS):
        return False
    return metric.startswith("lm_eval/")


# ---------------------------------------------------------------------------------------------------------------
# Reading the database


@dataclass(frozen=True)
class Results:
    grid: dict
    cells: pl.DataFrame
    metrics: pl.DataFrame


_CELL_COLUMNS = {
    "cell_id": pl.Utf8, "method": pl.Utf8, "granularity": pl.Utf8, "ratio": pl.Float64,
    "achieved_ratio": pl.Float64, "init": pl.Utf8, "setting": pl.Int64, "budget_tokens": pl.Int64,
    "trained_tokens": pl.Int64, "seed": pl.Int64, "status": pl.Utf8, "error": pl.Utf8,
}
_METRIC_COLUMNS = {"cell_id": pl.Utf8, "tokens": pl.Int64, "name": pl.Utf8, "value": pl.Float64, "stderr": pl.Float64}


def read_results(db_path: Path) -> Results:
    """Read the grid row, the cells and the metrics of a results database (read-only)."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise UserError(f"no results database at {db_path}: run `gridlab submit` first, or pass the grid's folder")
    with duckdb.connect(str(db_path), read_only=True) as con:
        tables = {row[0] for row in con.execute("select table_name from information_schema.tables").fetchall()}
        missing = {"grid", "cells", "metrics"} - tables
        if missing:
            raise UserError(f"{db_path} is not a gridlab results database: tables {sorted(missing)} are missing")
        grid_rows = con.sql("select * from grid").pl()
        cells = con.sql(f"select {', '.join(_CELL_COLUMNS)} from cells").pl()
        metrics = con.sql(f"select {', '.join(_METRIC_COLUMNS)} from metrics").pl()
    grid = grid_rows.row(0, named=True) if grid_rows.height else {}
    return Results(
        grid=grid,
        cells=cells.cast(_CELL_COLUMNS, strict=False) if cells.height else pl.DataFrame(schema=_CELL_COLUMNS),
        metrics=metrics.cast(_METRIC_COLUMNS, strict=False) if metrics.height else pl.DataFrame(schema=_METRIC_COLUMNS),
    )


def grid_spec(grid: dict) -> dict:
    """The grid's validated spec as stored in `grid.spec_json`, or {} when absent or unreadable."""
    try:
        spec = json.loads(grid.get("spec_json") or "{}")
    except (TypeError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


# ---------------------------------------------------------------------------------------------------------------
# Per cell and per group


def available_metrics(metrics: pl.DataFrame) -> list[str]:
    return sorted(metrics.get_column("name").unique().drop_nulls().to_list())


def headline_values(cells: pl.DataFrame, metrics: pl.DataFrame, metric: str) -> pl.DataFrame:
    """One row per finished cell that has `metric`: the cell's columns plus `value` (the metric at its last tokens)."""
    last = (
        metrics.filter(pl.col("name") == metric)
        .sort("tokens", nulls_last=False)
        .group_by("cell_id", maintain_order=True)
        .agg(pl.col("value").last())
    )
    return cells.filter(pl.col("status") == "done").join(last, on="cell_id", how="inner").filter(
        pl.col("value").is_finite()
    )


def _t_half_width(sd: np.ndarray, n: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * sd / np.sqrt(n)
    return np.where(n >= 2, half, np.nan)


def seed_summary(values: pl.DataFrame) -> pl.DataFrame:
    """Mean and t-interval over seeds per group; `ci_low`/`ci_high` are null for a single seed."""
    grouped = (
        values.group_by(GROUP_KEYS)
        .agg(
            n=pl.col("value").count(),
            mean=pl.col("value").mean(),
            sd=pl.col("value").std(),
            trained_tokens=pl.col("trained_tokens").mean(),
        )
        .sort(GROUP_KEYS)
    )
    half = _t_half_width(grouped["sd"].fill_null(0).to_numpy(), grouped["n"].to_numpy())
    return grouped.with_columns(half=pl.Series(half).fill_nan(None)).with_columns(
        ci_low=pl.col("mean") - pl.col("half"), ci_high=pl.col("mean") + pl.col("half")
    )


def verdict(benefit_low: float | None, benefit_high: float | None, benefit: float) -> str:
    """prune / scratch / tie from the interval of the benefit; without an interval the sign decides, marked (n=1)."""
    if benefit_low is None or benefit_high is None or math.isnan(benefit_low):
        word = "prune" if benefit > 0 else "scratch" if benefit < 0 else "tie"
        return f"{word} (n=1)"
    if benefit_low > 0:
        return "prune"
    if benefit_high < 0:
        return "scratch"
    return "tie"


def gap_table(summary: pl.DataFrame, lower_is_better: bool) -> pl.DataFrame:
    """Pruned vs random per (granularity, method, ratio, setting, budget): gap, Welch interval, benefit, verdict."""
    arm_columns = ["n", "mean", "sd"]
    pruned = summary.filter(pl.col("init") == "pruned").select(ARM_KEYS + arm_columns)
    random = summary.filter(pl.col("init") == "random").select(ARM_KEYS + arm_columns)
    joined = pruned.join(random, on=ARM_KEYS, how="inner", suffix="_random").rename(
        {"n": "n_pruned", "mean": "mean_pruned", "sd": "sd_pruned"}
    )
    if joined.height == 0:
        return joined.with_columns(
            *(pl.lit(None, dtype=pl.Float64).alias(c)
              for c in ("gap", "half", "benefit", "benefit_low", "benefit_high")),
            pl.lit(None, dtype=pl.Utf8).alias("verdict"),
        )
    n_p, n_r = joined["n_pruned"].to_numpy().astype(float), joined["n_random"].to_numpy().astype(float)
    var_p = joined["sd_pruned"].fill_null(0).to_numpy() ** 2 / n_p
    var_r = joined["sd_random"].fill_null(0).to_numpy() ** 2 / n_r
    se = np.sqrt(var_p + var_r)
    with np.errstate(invalid="ignore", divide="ignore"):
        dof = (var_p + var_r) ** 2 / (var_p**2 / (n_p - 1) + var_r**2 / (n_r - 1))
        half = np.where(se > 0, stats.t.ppf(0.5 + CONFIDENCE / 2, dof) * se, 0.0)
    half = np.where((n_p >= 2) & (n_r >= 2), half, np.nan)
    gap = joined["mean_pruned"].to_numpy() - joined["mean_random"].to_numpy()
    benefit = -gap if lower_is_better else gap
    low, high = benefit - half, benefit + half
    verdicts = [
        verdict(None if math.isnan(lo) else lo, None if math.isnan(hi) else hi, b)
        for lo, hi, b in zip(low, high, benefit)
    ]
    return joined.with_columns(
        gap=pl.Series(gap),
        half=pl.Series(half).fill_nan(None),
        benefit=pl.Series(benefit),
        benefit_low=pl.Series(low).fill_nan(None),
        benefit_high=pl.Series(high).fill_nan(None),
        verdict=pl.Series(verdicts, dtype=pl.Utf8),
    ).sort(ARM_KEYS)


# ---------------------------------------------------------------------------------------------------------------
# Power-law fits and crossovers


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


def _starting_point(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Best (E, A, α) over a grid of α, with E and A solved by linear least squares for each α (all α at once:
    a straight-line fit of y on x^(−α))."""
    alphas = np.geomspace(0.01, 3.0, 48)
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
    tokens: np.ndarray, values: np.ndarray, lower_is_better: bool = True, max_evaluations: int = 2000
) -> PowerLawFit:
    """Least-squares fit of L(D) = E + A·D^(−α) (A ≥ 0, α in ALPHA_BOUNDS, E ≤ min L) by `scipy.optimize.curve_fit`.

    Needs at least MIN_POINTS_FOR_FIT distinct token counts; otherwise the fit is under-determined and is not made.
    A fit that does not converge, or whose covariance cannot be estimated (e.g. a flat curve, where α is not
    identifiable), or that ends with A = 0 or α on a bound, is returned with `converged=False` and the reason.
    """
    tokens = np.asarray(tokens, dtype=float)
    sign = 1.0 if lower_is_better else -1.0
    y = sign * np.asarray(values, dtype=float)
    distinct = np.unique(tokens).size
    if distinct < MIN_POINTS_FOR_FIT:
        return PowerLawFit(False, f"under-determined: {distinct} budget(s), a fit needs {MIN_POINTS_FOR_FIT}")
    reference = float(tokens.min())
    x = tokens / reference
    start = _starting_point(x, y)
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


@dataclass(frozen=True)
class Crossover:
    granularity: str
    method: str
    ratio: float
    setting: int
    kind: str  # interpolated | extrapolated | none | not-fitted | no-data
    budget: float | None
    low: float | None
    high: float | None
    text: str
    fits: dict[str, PowerLawFit] = field(default_factory=dict, repr=False)  # "pruned", "random"
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
    lower_is_better: bool, horizon: float = EXTRAPOLATION_HORIZON, seed: int = 0,
) -> tuple[float | None, float | None, float | None, float]:
    """Where the fitted curves cross beyond the largest budget, up to `horizon` × it.

    Compares pruned at D with random at D + random_offset. Returns (crossover, 2.5 %, 97.5 % quantile, fraction of
    draws that cross); the interval comes from a parametric bootstrap over each fit's covariance.
    """
    grid = np.geomspace(largest_budget, horizon * largest_budget, 240)
    direction = -1.0 if lower_is_better else 1.0

    def benefit(p_params, r_params):
        return direction * (_curve(pruned, p_params, grid) - _curve(random, r_params, grid + random_offset))

    point = _first_crossing(grid, benefit(np.array([pruned.params]), np.array([random.params])))[0]
    rng = np.random.default_rng(seed)
    drawn = _first_crossing(
        grid, benefit(_draw_params(pruned, rng, BOOTSTRAP_DRAWS), _draw_params(random, rng, BOOTSTRAP_DRAWS))
    )
    crossed = drawn[np.isfinite(drawn)]
    fraction = crossed.size / BOOTSTRAP_DRAWS
    if math.isnan(point):
        return None, None, None, fraction
    low, high = (np.quantile(crossed, [0.025, 0.975]) if crossed.size else (np.nan, np.nan))
    return float(point), float(low), float(high), fraction


def format_tokens(tokens: float | None) -> str:
    if tokens is None or (isinstance(tokens, float) and math.isnan(tokens)):
        return "–"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(tokens) >= size:
            return f"{tokens / size:.3g}{unit}"
    return f"{tokens:.3g}"


def _direction(benefit_before: float) -> str:
    return "scratch catches up with pruning" if benefit_before > 0 else "pruning overtakes scratch"


def crossovers(
    values: pl.DataFrame, gaps: pl.DataFrame, parent_tokens: float, lower_is_better: bool,
    horizon: float = EXTRAPOLATION_HORIZON,
) -> list[Crossover]:
    """Crossover budget per (granularity, method, ratio, setting): interpolated inside the grid, else extrapolated."""
    results: list[Crossover] = []
    pruned_fits: dict[tuple, PowerLawFit] = {}
    gap_parts = gaps.sort("budget_tokens").partition_by(["granularity", "method", "ratio", "setting"], as_dict=True)
    value_parts = values.partition_by(["granularity", "method", "ratio"], as_dict=True)
    for (granularity, method, ratio, setting), rows in sorted(gap_parts.items()):
        key = dict(granularity=granularity, method=method, ratio=ratio, setting=setting)
        budgets = rows["budget_tokens"].to_numpy().astype(float)
        offset = float(parent_tokens or 0) if setting == 2 else 0.0
        arm_values = value_parts[(granularity, method, ratio)]
        pruned_key = (granularity, method, ratio)
        if pruned_key not in pruned_fits:
            # A pruned cell is listed once per setting with the same training run: fit each budget × seed once.
            pruned_points = arm_values.filter(pl.col("init") == "pruned").unique(["budget_tokens", "seed"])
            pruned_fits[pruned_key] = fit_power_law(
                pruned_points["budget_tokens"].to_numpy(), pruned_points["value"].to_numpy(), lower_is_better
            )
        random_points = arm_values.filter((pl.col("init") == "random") & (pl.col("setting") == setting))
        fits = {
            "pruned": pruned_fits[pruned_key],
            "random": fit_power_law(
                random_points["budget_tokens"].to_numpy() + offset, random_points["value"].to_numpy(), lower_is_better
            ),
        }
        inside = interpolate_sign_change(budgets, rows["benefit"].to_numpy())
        if inside is not None:
            at, low, high = inside
            text = (
                f"{_direction(rows['benefit'][0])} at {format_tokens(at)} tokens, interpolated in log tokens "
                f"between the measured budgets "
                f"{format_tokens(low)} and {format_tokens(high)}"
            )
            results.append(Crossover(**key, kind="interpolated", budget=at, low=low, high=high, text=text,
                                     fits=fits, random_offset=offset))
            continue
        if not all(fit.converged for fit in fits.values()):
            reasons = "; ".join(f"{arm}: {fit.message}" for arm, fit in fits.items() if not fit.converged)
            text = f"no sign change between {format_tokens(budgets.min())} and {format_tokens(budgets.max())}; " \
                   f"not extrapolated ({reasons})"
            results.append(Crossover(**key, kind="not-fitted", budget=None, low=None, high=None, text=text,
                                     fits=fits, random_offset=offset))
            continue
        at, low, high, fraction = extrapolate_crossover(
            fits["pruned"], fits["random"], float(budgets.max()), offset, lower_is_better, horizon
        )
        if at is None:
            text = f"no crossover within {horizon:g}× the largest budget ({format_tokens(budgets.max())}) " \
                   f"by the fitted curves ({fraction:.0%} of bootstrap draws cross there)"
            results.append(Crossover(**key, kind="none", budget=None, low=None, high=None, text=text,
                                     fits=fits, random_offset=offset))
        else:
            text = f"{_direction(rows['benefit'][-1])} at {format_tokens(at)} tokens, extrapolated from fitted " \
                   f"L(D) = E + A·D^(−α) per arm " \
                   f"(95 % bootstrap interval {format_tokens(low)}–{format_tokens(high)}; " \
                   f"{fraction:.0%} of draws cross within {horizon:g}×)"
            results.append(Crossover(**key, kind="extrapolated", budget=at, low=low, high=high, text=text,
                                     fits=fits, random_offset=offset))
    return results


# ---------------------------------------------------------------------------------------------------------------
# Tables for the template


def recommendation_rows(gaps: pl.DataFrame, setting: int) -> tuple[list[int], list[dict]]:
    """Budgets (columns) and rows granularity × method × ratio, each with one entry per budget (None if absent)."""
    table = gaps.filter(pl.col("setting") == setting)
    budgets = sorted(table["budget_tokens"].unique().to_list())
    rows = []
    for (granularity, method, ratio), group in sorted(
        table.group_by(["granularity", "method", "ratio"]),
        key=lambda item: (GRANULARITY_ORDER.get(item[0][0], 9), item[0][0], item[0][1], item[0][2]),
    ):
        by_budget = {row["budget_tokens"]: row for row in group.iter_rows(named=True)}
        rows.append(dict(granularity=granularity, method=method, ratio=ratio,
                         entries=[by_budget.get(b) for b in budgets]))
    return budgets, rows


def arm_rows(summary: pl.DataFrame) -> tuple[list[int], list[dict]]:
    """Seed statistics pivoted: rows granularity × method × ratio × arm, one entry per budget (None if absent).

    Arms: pruned init (one training run, listed once), random init in setting 1, random init in setting 2.
    """
    arms = summary.with_columns(
        arm=pl.when(pl.col("init") == "pruned").then(pl.lit("pruned"))
        .otherwise(pl.format("random, setting {}", pl.col("setting")))
    ).unique(["granularity", "method", "ratio", "arm", "budget_tokens"], keep="first", maintain_order=True)
    budgets = sorted(arms["budget_tokens"].unique().to_list())
    rows = []
    for (granularity, method, ratio, arm), group in sorted(
        arms.group_by(["granularity", "method", "ratio", "arm"]),
        key=lambda item: (GRANULARITY_ORDER.get(item[0][0], 9), *item[0]),
    ):
        by_budget = {row["budget_tokens"]: row for row in group.iter_rows(named=True)}
        rows.append(dict(granularity=granularity, method=method, ratio=ratio, arm=arm,
                         entries=[by_budget.get(b) for b in budgets]))
    return budgets, rows


def _budget_span(budgets: list[int]) -> str:
    if len(budgets) == 1:
        return f"{format_tokens(budgets[0])} tokens"
    return f"{format_tokens(budgets[0])}–{format_tokens(budgets[-1])} tokens"


def summary_sentences(gaps: pl.DataFrame, crossover_list: list[Crossover]) -> list[dict]:
    """Per granularity × ratio, the recommendation in words for each setting.

    At each budget the best method of the granularity (largest benefit) stands for pruning: prune if its verdict is
    prune, scratch if every method's verdict is scratch, otherwise a tie. Consecutive budgets with the same call are
    merged into one phrase.
    """
    setting_names = {1: "same budget (setting 1)", 2: "whole-pipeline budget (setting 2)"}
    out = []
    for (granularity, ratio), group in sorted(
        gaps.group_by(["granularity", "ratio"]),
        key=lambda item: (GRANULARITY_ORDER.get(item[0][0], 9), item[0][0], item[0][1]),
    ):
        lines = []
        for setting in sorted(group["setting"].unique().to_list()):
            phrases = []
            per_budget = group.filter(pl.col("setting") == setting).sort("budget_tokens")
            calls = []
            for budget, at_budget in per_budget.group_by("budget_tokens", maintain_order=True):
                best = at_budget.sort("benefit", descending=True).row(0, named=True)
                words = [v.split(" ")[0] for v in at_budget["verdict"]]
                few = any("(n=1)" in v for v in at_budget["verdict"])
                if best["verdict"].startswith("prune"):
                    call = f"prune ({best['method']})"
                elif all(w == "scratch" for w in words):
                    call = "train from scratch"
                else:
                    call = "tie: scratch matches pruning"
                calls.append((budget[0], call + (" [single seed]" if few else "")))
            runs: list[tuple[list[int], str]] = []
            for budget, call in calls:
                if runs and runs[-1][1] == call:
                    runs[-1][0].append(budget)
                else:
                    runs.append(([budget], call))
            for index, (budgets, call) in enumerate(runs):
                if len(runs) == 1:
                    where = f"at every measured budget ({_budget_span(budgets)})"
                elif index == 0:
                    where = f"with a limited budget ({_budget_span(budgets)})"
                elif index == len(runs) - 1:
                    where = f"with the largest budgets ({_budget_span(budgets)})"
                else:
                    where = f"at {_budget_span(budgets)}"
                phrases.append(f"{where}, {call}")
            found = [c for c in crossover_list if c.granularity == granularity and c.ratio == ratio
                     and c.setting == setting and c.budget is not None]
            sentence = "; ".join(phrases) + "."
            if found:
                sentence += " Crossover: " + ", ".join(f"{c.method} at {format_tokens(c.budget)} tokens ({c.kind})"
                                                       for c in found) + "."
            lines.append(dict(setting=setting, setting_name=setting_names.get(setting, f"setting {setting}"),
                              sentence=sentence[0].upper() + sentence[1:]))
        out.append(dict(granularity=granularity, ratio=ratio, lines=lines))
    return out


def cost_rows(budgets: list[int], parent_tokens: float | None, calibration_tokens: float | None) -> list[dict]:
    """Tokens each arm costs per budget: the pruned arm pays parent pretraining + calibration + B; random init
    trains B (setting 1) or parent + B (setting 2)."""
    parent, calibration = float(parent_tokens or 0), float(calibration_tokens or 0)
    return [
        dict(budget=budget, pruned_training=budget, pruned_total=parent + calibration + budget,
             random_1=budget, random_2=parent + budget)
        for budget in budgets
    ]


def status_counts(cells: pl.DataFrame) -> dict[str, int]:
    counts = dict(cells.group_by("status").len().iter_rows())
    ordered = {status: int(counts.pop(status, 0)) for status in STATUSES}
    ordered.update({str(k): int(v) for k, v in counts.items()})
    return ordered


def missing_groups(cells: pl.DataFrame, values: pl.DataFrame) -> list[dict]:
    """Cells without a headline value, grouped by what they are and why (status, or no such metric)."""
    without = cells.join(values.select("cell_id"), on="cell_id", how="anti").with_columns(
        reason=pl.when(pl.col("status") == "done").then(pl.lit("done, metric missing")).otherwise(pl.col("status"))
    )
    grouped = (
        without.group_by(["granularity", "method", "ratio", "init", "setting", "reason"])
        .agg(
            cells=pl.len(),
            budgets=pl.col("budget_tokens").unique().sort(),
            seeds=pl.col("seed").unique().sort(),
            errors=pl.col("error").drop_nulls().unique().sort().head(3),
        )
        .sort(["granularity", "method", "ratio", "init", "setting", "reason"], nulls_last=True)
    )
    return grouped.to_dicts()


def grid_dimensions(cells: pl.DataFrame) -> dict:
    """What the grid asks for, from its cells: methods per granularity, ratios, budgets, seeds, settings."""
    pruned = cells.filter(pl.col("init") == "pruned")
    methods = (
        pruned.select(["granularity", "method"]).unique().sort(["granularity", "method"]).group_by(
            "granularity", maintain_order=True).agg(pl.col("method")).iter_rows()
    )
    return dict(
        methods=sorted(((g, m) for g, m in methods), key=lambda item: (GRANULARITY_ORDER.get(item[0], 9), item[0])),
        ratios=sorted(cells["ratio"].drop_nulls().unique().to_list()),
        budgets=sorted(cells["budget_tokens"].drop_nulls().unique().to_list()),
        seeds=sorted(cells["seed"].drop_nulls().unique().to_list()),
        settings=sorted(cells["setting"].drop_nulls().unique().to_list()),
    )


# ---------------------------------------------------------------------------------------------------------------
# Everything the report needs


@dataclass
class Analysis:
    metric: str
    lower_is_better: bool
    grid: dict
    spec: dict
    counts: dict[str, int]
    dimensions: dict
    values: pl.DataFrame
    summary: pl.DataFrame
    gaps: pl.DataFrame
    crossovers: list[Crossover]
    sentences: list[dict]
    recommendations: dict[int, tuple[list[int], list[dict]]]
    arms: tuple[list[int], list[dict]]
    costs: list[dict]
    missing: list[dict]
    curves: pl.DataFrame  # train_loss per (granularity, method, ratio, init, setting, tokens) at the largest budget


def training_curves(cells: pl.DataFrame, metrics: pl.DataFrame, name: str = "train_loss") -> pl.DataFrame:
    """Seed-mean `name` against tokens for each group's largest finished budget."""
    curve_points = metrics.filter(pl.col("name") == name).select(["cell_id", "tokens", "value"])
    done = cells.filter(pl.col("status") == "done")
    largest = done.group_by(["granularity", "method", "ratio", "init", "setting"]).agg(
        pl.col("budget_tokens").max()
    )
    chosen = done.join(largest, on=["granularity", "method", "ratio", "init", "setting", "budget_tokens"])
    return (
        chosen.join(curve_points, on="cell_id")
        .group_by(["granularity", "method", "ratio", "init", "setting", "budget_tokens", "tokens"])
        .agg(pl.col("value").mean())
        .sort(["granularity", "method", "ratio", "init", "setting", "tokens"])
    )


def analyse(results: Results, metric: str = "val_loss") -> Analysis:
    names = available_metrics(results.metrics)
    if names and metric not in names:
        raise UserError(f"metric {metric!r} is not in the results; available: {', '.join(names)}")
    lower = not higher_is_better(metric)
    values = headline_values(results.cells, results.metrics, metric)
    summary = seed_summary(values)
    gaps = gap_table(summary, lower)
    parent_tokens = results.grid.get("parent_tokens")
    crossover_list = crossovers(values, gaps, parent_tokens, lower)
    budgets = sorted(results.cells["budget_tokens"].drop_nulls().unique().to_list())
    return Analysis(
        metric=metric,
        lower_is_better=lower,
        grid=results.grid,
        spec=grid_spec(results.grid),
        counts=status_counts(results.cells),
        dimensions=grid_dimensions(results.cells),
        values=values,
        summary=summary,
        gaps=gaps,
        crossovers=crossover_list,
        sentences=summary_sentences(gaps, crossover_list),
        recommendations={s: recommendation_rows(gaps, s) for s in (1, 2)},
        arms=arm_rows(summary),
        costs=cost_rows(budgets, parent_tokens, results.grid.get("calibration_tokens")),
        missing=missing_groups(results.cells, values),
        curves=training_curves(results.cells, results.metrics),
    )
