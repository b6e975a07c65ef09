"""Seed statistics: intervals of the pruned − random gap, verdicts with multiplicity control, the answer's squares
adjusted for the choice of the best method, and the design power.

Conventions:
- a *group* is one (granularity, method, ratio, init, setting, budget) combination; its seeds are the samples;
- a *cell* (pair) is a pruned group and its random twin (same granularity, method, ratio, setting, budget); a pruned
  cell and the random cell with the same seed share the data order and the calibration sample, so the per-seed
  difference d = pruned − random is the unit of analysis (the seed is the unit of replication);
- *gap* = pruned − random of the headline metric, in the metric's own units; *benefit* = the gap signed so that
  positive means pruning is better (−gap for lower-is-better metrics);
- intervals are two-sided 95 %; the *margin* δ (grid spec `[report] margin`) is the smallest gap that matters.

Intervals (`pool`):
- "model" (default): per (granularity, method, setting, budget) the per-seed differences over the ratios follow the
  mixed model of gridlab.report.mixed (a seed effect shared by the budget's ratios and a cell effect, each with its
  own variance per budget and family; REML; missing seeds handled by GLS). A cell's interval uses the model's
  variance of its mean and the harmonic mean of the model's Satterthwaite degrees of freedom and the cell's own
  n − 1 (the seed stratum's): Satterthwaite alone is optimistic with two or three seeds when the seed effect
  dominates (tests/test_report_mixed.py measures both). Where the model cannot be fitted, the cell's own paired t.
- "none": every cell's own paired t interval (n − 1 degrees of freedom), the sensitivity check of the model.
Cells whose arms share no seed use Welch's interval (unequal variances, Welch–Satterthwaite dof). A cell needs two
seeds of its own for an interval; without one it has no verdict.

Verdicts per cell, over the cells of one setting: p-values of the difference (two-sided t) and of equivalence
(TOST: two one-sided tests against ±δ), each adjusted by Benjamini–Hochberg at a 5 % false discovery rate;
*equivalent* when equivalence is declared, else *prune* / *scratch* when the difference is, else *inconclusive*.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import special

from gridlab.report import mixed

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # the FDR of the verdicts; the TOST uses the (1 − 2α) interval, as equivalence tests do
POWER = 0.80  # of the design power figure
DEFAULT_MARGIN = 0.02  # in the metric's units: 0.02 nats of loss = 2 % of perplexity (docs/report.md)
GROUP_KEYS = ["granularity", "method", "ratio", "init", "setting", "budget_tokens"]
PAIR_KEYS = ["granularity", "method", "ratio", "setting", "budget_tokens"]
FAMILY_KEYS = ["granularity", "method", "setting"]
ROW_KEYS = [*FAMILY_KEYS, "budget_tokens"]  # one row of the model: a family's ratios at one budget
SQUARE_KEYS = ["granularity", "ratio", "setting", "budget_tokens"]
POOLING = ("model", "none")
REMOVED_POOLING = {"seeds": "it pooled the spread over ratios and budgets as if they were independent",
                   "ratios": "it pooled the spread over ratios and budgets as if they were independent"}
VERDICTS = ("prune", "scratch", "equivalent", "inconclusive")
# one_sided_tests' p-values; a gap table that carries them (a sequential study's) gives answer_squares its own
TEST_COLUMNS = ("above", "below", "under_margin", "over_minus")
MAX_SEEDS = 1000  # the design power is searched up to this many seeds per arm
MODEL = "mixed model (REML)"
CELL_T = "per-cell paired t"
FALLBACK = "per-cell paired t (model not fitted)"
WELCH = "Welch"


def t_quantile(dof, confidence: float = CONFIDENCE) -> np.ndarray:
    """The two-sided `confidence` quantile of Student's t; NaN where dof < 1 or unknown."""
    dof = np.asarray(dof, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.where(dof >= 1, special.stdtrit(np.where(dof >= 1, dof, 1.0), 0.5 + confidence / 2), np.nan)


def _t_cdf(dof: np.ndarray, t: np.ndarray) -> np.ndarray:
    return special.stdtr(dof, t)


def seed_summary(values: pl.DataFrame) -> pl.DataFrame:
    """Mean and t-interval over seeds per group; `half`, `ci_low`, `ci_high` are null for a single seed."""
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
    n = grouped["n"].to_numpy().astype(float)
    half = t_quantile(n - 1) * grouped["sd"].fill_null(0).to_numpy() / np.sqrt(n)
    return grouped.with_columns(half=pl.Series(half, dtype=pl.Float64).fill_nan(None)).with_columns(
        ci_low=pl.col("mean") - pl.col("half"), ci_high=pl.col("mean") + pl.col("half")
    )


# ---------------------------------------------------------------------------------------------------------------
# Intervals


def interval_dof(satterthwaite: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The degrees of freedom of a model interval: the harmonic mean of the model's Satterthwaite dof and the cell's
    own n − 1 (the seed stratum's). With few seeds Satterthwaite's plug-in dof is too large exactly when the seed
    effect's mean square comes out small by chance; the harmonic mean keeps the coverage at nominal in the design's
    simulations (tests/test_report_mixed.py) while keeping most of what the model gains from the other ratios."""
    own = np.asarray(seeds, dtype=float) - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(own >= 1, 2.0 / (1.0 / satterthwaite + 1.0 / own), np.nan)


def model_intervals(y: np.ndarray) -> dict[str, np.ndarray]:
    """The model's estimate for each cell of rows of per-seed differences y (rows, seeds, cells; NaN where a seed has
    no difference; every cell observed at least once): gap, se, dof (interval_dof), the between-seed variance of one
    seed's difference (`marginal`), the two variance components (`seed`: shared by the row's cells; `cell`), and
    `fitted`. Where the model does not converge (a row whose seeds' means nearly coincide puts the REML optimum on the
    edge of positive definiteness) a cell gets its own paired t interval (n − 1 dof) and `fitted` is False. Cells with
    fewer than two seeds have no se."""
    rows, _, m = y.shape
    seeds = (~np.isnan(y)).sum(axis=1)
    filled = np.where(np.isnan(y), 0.0, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        own_mean = filled.sum(axis=1) / seeds
        squares = np.where(np.isnan(y), 0.0, (y - own_mean[:, None, :]) ** 2).sum(axis=1)
        own_var = np.where(seeds >= 2, squares / (seeds - 1), np.nan)
    out = {"gap": own_mean, "se": np.sqrt(own_var / seeds), "dof": np.where(seeds >= 2, seeds - 1.0, np.nan),
           "marginal": own_var, "seed": np.full((rows, m), np.nan), "cell": np.full((rows, m), np.nan),
           "fitted": np.zeros((rows, m), bool)}
    usable = (seeds.sum(axis=1) - m) >= 1  # a residual degree of freedom at least
    if not usable.any():
        return out
    layout = mixed.layout(np.arange(m), np.zeros(m, int))
    fit = mixed.fit(y[usable], layout)
    ok = fit.converged
    at = np.flatnonzero(usable)[ok]
    theta = dict(zip(layout.names, fit.theta[ok].T, strict=True))
    enough = seeds[at] >= 2
    out["gap"][at] = fit.mean[ok]
    out["se"][at] = np.where(enough, np.sqrt(fit.variance[ok]), np.nan)
    out["dof"][at] = np.where(enough, interval_dof(fit.dof[ok], seeds[at]), np.nan)
    out["marginal"][at] = fit.marginal[ok]
    out["seed"][at] = theta.get("seed", np.zeros(len(at)))[:, None]
    out["cell"][at] = theta["residual@0"][:, None]
    out["fitted"][at] = True
    return out


def _cell_arrays(diffs: pl.DataFrame) -> tuple[pl.DataFrame, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """The per-seed differences as dense arrays for the model: one row per (family, budget), its ratios as cells.
    Returns the cell index (PAIR_KEYS, `_m` cells in its row, `_row`, `_cell`) and, per cell count m, the array
    (rows, seeds, m) and the row ids it holds."""
    cells = (diffs.select(PAIR_KEYS).unique()
             .with_columns(_row=pl.struct(ROW_KEYS).rank("dense").cast(pl.Int64) - 1)
             .with_columns(_cell=pl.col("ratio").rank("dense").over("_row").cast(pl.Int64) - 1,
                           _m=pl.len().over("_row").cast(pl.Int64)))
    located = diffs.join(cells, on=PAIR_KEYS).with_columns(_seed=pl.col("seed").rank("dense").cast(pl.Int64) - 1)
    seeds = int(located["_seed"].max()) + 1 if located.height else 0
    arrays = {}
    for (m,), part in located.group_by("_m"):
        rows = np.unique(part["_row"].to_numpy())
        y = np.full((len(rows), seeds, int(m)), np.nan)
        y[np.searchsorted(rows, part["_row"].to_numpy()), part["_seed"].to_numpy(), part["_cell"].to_numpy()] = \
            part["d"].to_numpy()
        keep = ~np.isnan(y).all(axis=(0, 2))  # seeds that appear in these rows
        arrays[int(m)] = (y[:, keep], rows)
    return cells, arrays


def _model_columns(diffs: pl.DataFrame) -> pl.DataFrame:
    """Per paired cell: the model's gap, se, dof, marginal variance, components and whether it was fitted."""
    cells, arrays = _cell_arrays(diffs)
    names = ("gap", "se", "dof", "marginal", "seed", "cell", "fitted")
    parts = []
    for m, (y, rows) in arrays.items():
        result = model_intervals(y)
        parts.append(pl.DataFrame({"_row": np.repeat(rows, m), "_cell": np.tile(np.arange(m), len(rows)),
                                   **{f"model_{k}": result[k].ravel() for k in names}}))
    if not parts:
        return cells.select(PAIR_KEYS)
    fitted = pl.concat(parts).with_columns(pl.col(pl.Float64).fill_nan(None))
    return cells.join(fitted, on=["_row", "_cell"]).drop("_row", "_cell", "_m")


def _arm_stats(values: pl.DataFrame, init: str) -> pl.DataFrame:
    return values.filter(pl.col("init") == init).group_by(PAIR_KEYS).agg(
        n=pl.col("value").count(), mean=pl.col("value").mean(), var=pl.col("value").var())


def pair_differences(values: pl.DataFrame, against: str = "random") -> pl.DataFrame:
    """Per cell and seed present in both arms: d = pruned − random (``against``: the arm compared with, e.g. the
    embeddings control; its columns keep the name ``*_random``)."""
    pruned = values.filter(pl.col("init") == "pruned").select([*PAIR_KEYS, "seed", "value"])
    random = values.filter(pl.col("init") == against).select([*PAIR_KEYS, "seed", "value"])
    return pruned.join(random, on=[*PAIR_KEYS, "seed"], suffix="_random").with_columns(
        d=pl.col("value") - pl.col("value_random"))


def _welch(var_p, n_p, var_r, n_r) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        a, b = var_p / n_p, var_r / n_r
        se = np.sqrt(a + b)
        dof = (a + b) ** 2 / (np.where(n_p > 1, a**2 / (n_p - 1), np.nan) + np.where(n_r > 1, b**2 / (n_r - 1), np.nan))
        dof = np.where(se > 0, dof, np.minimum(n_p, n_r) - 1)
    return se, dof


_GAP_SCHEMA = {
    **dict(zip(PAIR_KEYS, (pl.Utf8, pl.Utf8, pl.Float64, pl.Int64, pl.Int64), strict=True)),
    "n_pruned": pl.UInt32, "n_random": pl.UInt32, "n_pairs": pl.UInt32, "n_seeds": pl.UInt32,
    "mean_pruned": pl.Float64, "mean_random": pl.Float64, "test": pl.Utf8, "model": pl.Utf8,
    "observed_gap": pl.Float64, "gap": pl.Float64, "se": pl.Float64, "dof": pl.Float64, "half": pl.Float64,
    "benefit": pl.Float64, "benefit_low": pl.Float64, "benefit_high": pl.Float64, "p_value": pl.Float64,
    "q_value": pl.Float64, "p_equivalent": pl.Float64, "q_equivalent": pl.Float64, "verdict": pl.Utf8,
    "sd_seed": pl.Float64, "sd_cell": pl.Float64, "sd_between_seeds": pl.Float64, "seeds_needed": pl.Float64,
    "cell_gap": pl.Float64, "cell_half": pl.Float64, "cell_dof": pl.Float64, "cell_verdict": pl.Utf8,
    "se_seeds": pl.Float64, "se_measurement": pl.Float64,
}


def gap_table(values: pl.DataFrame, higher_is_better: bool, pool: str = "model",
              margin: float = DEFAULT_MARGIN, measurement: pl.DataFrame | None = None,
              against: str = "random") -> pl.DataFrame:
    """Pruned vs random per cell (granularity, method, ratio, setting, budget) from seed-level headline values.
    ``against``: the arm the pruned one is compared with ("random", or "embeddings": the embeddings control, by the
    same statistics; the columns keep their names, ``*_random`` then meaning that arm).

    Columns: n_pruned, n_random, n_pairs (seeds in both arms), n_seeds (seeds behind the estimate), mean_pruned,
    mean_random, test ("paired" or "Welch": how the arms' seeds pair), model (MODEL, CELL_T, FALLBACK or WELCH),
    observed_gap (mean pruned − mean random), gap (the estimate: the model's GLS mean, the mean difference, or
    observed_gap for Welch), se, dof, half (95 % half-width), benefit (+ = pruning better), benefit_low/high,
    p_value / q_value (difference from 0; q: Benjamini–Hochberg over the setting's cells), p_equivalent /
    q_equivalent (TOST against ±margin), verdict (VERDICTS), sd_seed (sd of the seed effect shared by the budget's
    ratios; signed square root, it may be negative), sd_cell, sd_between_seeds (sd of one seed's difference: what
    the design power uses), seeds_needed (seeds per arm for 80 % power at the margin; MAX_SEEDS + 1 = more), and the
    sensitivity check: cell_gap, cell_half, cell_dof and cell_verdict from the cell's own paired t interval.

    ``measurement`` (measurement_error: PAIR_KEYS, se_measurement, documents) adds the held-out sample's error of
    each gap to its seeds' (with_measurement) in every interval, verdict and the sensitivity check: se_seeds and
    se_measurement are the two parts of se. Without it (a metric without per-document losses, an older database)
    the intervals are the seeds' alone and se_measurement is empty.
    """
    if pool in REMOVED_POOLING:
        raise ValueError(f"pooling {pool!r} was removed ({REMOVED_POOLING[pool]}, and under-covers); "
                         f"valid: {', '.join(POOLING)}")
    if pool not in POOLING:
        raise ValueError(f"unknown pooling {pool!r}; valid: {', '.join(POOLING)}")
    pruned, random = _arm_stats(values, "pruned"), _arm_stats(values, against)
    joined = pruned.join(random, on=PAIR_KEYS, how="inner", suffix="_random").rename(
        {"n": "n_pruned", "mean": "mean_pruned", "var": "var_pruned"})
    if joined.height == 0:
        return pl.DataFrame(schema=_GAP_SCHEMA)
    diffs = pair_differences(values, against)
    per_cell = diffs.group_by(PAIR_KEYS).agg(n_pairs=pl.len(), mean_d=pl.col("d").mean(), var_d=pl.col("d").var())
    joined = joined.join(per_cell, on=PAIR_KEYS, how="left").with_columns(n_pairs=pl.col("n_pairs").fill_null(0))
    if pool == "model" and diffs.height:
        joined = joined.join(_model_columns(diffs), on=PAIR_KEYS, how="left")
    if measurement is not None and measurement.height:
        joined = joined.join(measurement.select(*PAIR_KEYS, "se_measurement", "documents"), on=PAIR_KEYS,
                             how="left")
    joined = joined.sort(PAIR_KEYS)

    paired = joined["n_pairs"].to_numpy() > 0
    n_d = joined["n_pairs"].to_numpy().astype(float)
    n_p, n_r = (joined[c].to_numpy().astype(float) for c in ("n_pruned", "n_random"))
    var_p, var_r = (joined[c].fill_null(np.nan).to_numpy().astype(float) for c in ("var_pruned", "var_random"))
    observed = joined["mean_pruned"].to_numpy() - joined["mean_random"].to_numpy()
    mean_d = joined["mean_d"].fill_null(np.nan).to_numpy().astype(float)
    var_d = joined["var_d"].fill_null(np.nan).to_numpy().astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        cell_se = np.where(n_d >= 2, np.sqrt(var_d / n_d), np.nan)
    cell_dof = np.where(n_d >= 2, n_d - 1, np.nan)
    welch_se, welch_dof = _welch(var_p, n_p, var_r, n_r)
    welch_ok = (n_p >= 2) & (n_r >= 2)

    def column(name: str, fill=np.nan) -> np.ndarray:
        if name not in joined.columns:
            return np.full(joined.height, fill)
        return joined[name].fill_null(fill).to_numpy().astype(type(fill) if isinstance(fill, bool) else float)

    modelled = column("model_fitted", False) & paired
    fitted = np.isfinite(column("model_gap")) & paired  # by the model, or its fallback inside a model row
    gap = np.where(paired, np.where(fitted, column("model_gap"), mean_d), observed)
    se = np.where(fitted, column("model_se"), np.where(paired, cell_se, np.where(welch_ok, welch_se, np.nan)))
    dof = np.where(fitted, column("model_dof"), np.where(paired, cell_dof, np.where(welch_ok, welch_dof, np.nan)))
    model = np.where(modelled, MODEL, np.where(paired, CELL_T if pool == "none" else FALLBACK, WELCH))
    n_seeds = np.where(paired, n_d, np.minimum(n_p, n_r))
    between = np.where(fitted, column("model_marginal"), np.where(paired, var_d, var_p + var_r))
    se_seeds = se
    se_measurement, documents = column("se_measurement"), column("documents")
    se, dof = with_measurement(se, dof, se_measurement, documents)
    cell_se, cell_dof = with_measurement(cell_se, cell_dof, se_measurement, documents)

    sign = 1.0 if higher_is_better else -1.0
    setting = joined["setting"].to_numpy()
    decided = decide(sign * gap, se, dof, setting, margin)
    cell_decided = decide(sign * mean_d, cell_se, cell_dof, setting, margin)
    half = decided["half"]
    return joined.select([*PAIR_KEYS, "n_pruned", "n_random", "n_pairs", "mean_pruned", "mean_random"]).with_columns(
        n_seeds=pl.Series(n_seeds, dtype=pl.UInt32),
        test=pl.Series(np.where(paired, "paired", "Welch"), dtype=pl.Utf8),
        model=pl.Series(model, dtype=pl.Utf8),
        observed_gap=pl.Series(observed, dtype=pl.Float64),
        gap=pl.Series(gap, dtype=pl.Float64),
        se=_series(decided["se"]),
        dof=_series(np.where(np.isfinite(decided["se"]), dof, np.nan)),
        half=_series(half),
        benefit=pl.Series(sign * gap, dtype=pl.Float64),
        benefit_low=_series(sign * gap - half),
        benefit_high=_series(sign * gap + half),
        p_value=_series(decided["p"]), q_value=_series(decided["q"]),
        p_equivalent=_series(decided["p_equivalent"]), q_equivalent=_series(decided["q_equivalent"]),
        verdict=pl.Series(decided["verdict"], dtype=pl.Utf8),
        sd_seed=_series(np.sign(column("model_seed")) * np.sqrt(np.abs(column("model_seed")))),
        sd_cell=_series(np.sqrt(column("model_cell"))),
        sd_between_seeds=_series(np.sqrt(between)),
        se_seeds=_series(np.where(np.isfinite(decided["se"]), se_seeds, np.nan)),
        se_measurement=_series(se_measurement),
        seeds_needed=_series(design_seeds(between, margin, se_measurement)),
        cell_gap=_series(mean_d),
        cell_half=_series(cell_decided["half"]),
        cell_dof=_series(np.where(np.isfinite(cell_decided["se"]), cell_dof, np.nan)),
        cell_verdict=pl.Series(cell_decided["verdict"], dtype=pl.Utf8),
    ).cast(_GAP_SCHEMA)


MEASUREMENT_SCHEMA = {**{k: v for k, v in _GAP_SCHEMA.items() if k in PAIR_KEYS}, "se_measurement": pl.Float64,
                      "documents": pl.UInt32}


def measurement_error(values: pl.DataFrame, documents: pl.DataFrame, against: str = "random") -> pl.DataFrame:
    """Per cell (PAIR_KEYS): the document-sampling stderr of the seed-mean gap (``se_measurement``) and the documents
    it rests on, from the per-document losses of the cells in ``values`` (gridlab.report.read.document_losses, one
    metric). Every model of a grid is scored on the same held-out sample, so this error is common to all seeds: it
    does not shrink with more seeds, and the seeds' spread does not contain it. It is the linearised ratio-estimator
    stderr of the documents' paired differences (gridlab.measure.paired_gap), vectorised over every cell: each arm's
    per-document loss sums averaged over its seeds, the gap R = ΣΔ_d / ΣX_d, and
    var(R) = n/(n − 1) · Σ_d (Δ_d − R·X_d)² / (ΣX_d)². Cells whose arms were not scored on the same documents get
    none (the join keeps the documents both arms have; a document one arm lacks makes the cell's error unknown)."""
    if documents.height == 0 or values.height == 0:
        return pl.DataFrame(schema=MEASUREMENT_SCHEMA)
    keyed = documents.join(values.select("cell_id", *PAIR_KEYS, "init"), on="cell_id", how="inner")
    arms = keyed.group_by([*PAIR_KEYS, "init", "document"]).agg(
        x=pl.col("tokens").first(), y=pl.col("loss_sum").mean())
    pruned = arms.filter(pl.col("init") == "pruned").drop("init")
    random = arms.filter(pl.col("init") == against).drop("init")
    per_arm = (arms.filter(pl.col("init").is_in(["pruned", against])).group_by([*PAIR_KEYS, "init"])
               .agg(n=pl.len()).group_by(PAIR_KEYS).agg(arms=pl.len(), n_min=pl.col("n").min(),
                                                          n_max=pl.col("n").max()))
    paired = pruned.join(random, on=[*PAIR_KEYS, "document"], how="inner", suffix="_random").with_columns(
        d=pl.col("y") - pl.col("y_random"))
    sums = paired.group_by(PAIR_KEYS).agg(
        n=pl.len(), sx=pl.col("x").sum(), sd=pl.col("d").sum(), sdd=(pl.col("d") ** 2).sum(),
        sdx=(pl.col("d") * pl.col("x")).sum(), sxx=(pl.col("x") ** 2).sum())
    sums = sums.join(per_arm, on=PAIR_KEYS).filter(
        (pl.col("arms") == 2) & (pl.col("n") == pl.col("n_min")) & (pl.col("n") == pl.col("n_max"))
        & (pl.col("n") >= 2) & (pl.col("sx") > 0))
    ratio = pl.col("sd") / pl.col("sx")
    residual = (pl.col("sdd") - 2 * ratio * pl.col("sdx") + ratio ** 2 * pl.col("sxx")).clip(lower_bound=0)
    return sums.select(
        *PAIR_KEYS,
        se_measurement=(pl.col("n") / (pl.col("n") - 1) * residual).sqrt() / pl.col("sx"),
        documents=pl.col("n").cast(pl.UInt32),
    ).cast(MEASUREMENT_SCHEMA)


def with_measurement(se: np.ndarray, dof: np.ndarray, se_measurement: np.ndarray,
                     documents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The se of a gap with the held-out sample's error added to the seeds' (independent: the sample is fixed, the
    seeds vary), and its Welch–Satterthwaite dof (the measurement term has documents − 1). Where there is no
    measurement error (a metric without per-document losses) se and dof are unchanged; where there is no seed
    interval (one seed) there is none after either."""
    se, dof = np.asarray(se, dtype=float), np.asarray(dof, dtype=float)
    m = np.asarray(se_measurement, dtype=float)
    m_dof = np.asarray(documents, dtype=float) - 1
    has = np.isfinite(m) & (m_dof >= 1) & np.isfinite(se)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.sqrt(se ** 2 + np.where(has, m ** 2, 0.0))
        seed_part = np.where(se > 0, se ** 4 / dof, 0.0)
        combined = total ** 4 / (seed_part + np.where(has, m ** 4 / m_dof, 0.0))
    return np.where(has, total, se), np.where(has & (total > 0), combined, dof)


def _series(values: np.ndarray) -> pl.Series:
    return pl.Series(np.asarray(values, dtype=float), dtype=pl.Float64).fill_nan(None)


# ---------------------------------------------------------------------------------------------------------------
# Verdicts


def benjamini_hochberg(p: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q) within each group; NaN p stay NaN and do not count."""
    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if not ok.any():
        return q
    index = np.flatnonzero(ok)
    groups = np.asarray(group)[index]
    order = np.lexsort((p[index], groups))
    index, groups, sorted_p = index[order], groups[order], p[index][order]
    starts = np.r_[0, np.flatnonzero(groups[1:] != groups[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(groups)])
    rank = np.arange(len(groups)) - np.repeat(starts, sizes) + 1
    scaled = sorted_p * np.repeat(sizes, sizes) / rank
    # q_(i) = min over j ≥ i of scaled_(j), within each group: a reversed running minimum per group.
    reversed_min = np.empty_like(scaled)
    for start, size in zip(starts, sizes, strict=True):
        reversed_min[start:start + size] = np.minimum.accumulate(scaled[start:start + size][::-1])[::-1]
    q[index] = np.minimum(reversed_min, 1.0)
    return q


def one_sided(benefit: np.ndarray, se: np.ndarray, dof: np.ndarray, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """p-values of H0: benefit ≤ shift (small when the benefit is above it) and of H0: benefit ≥ shift (small when
    below it). se = 0 gives 0 or 1; missing se gives NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (benefit - shift) / se
        above = np.where(se > 0, 1 - _t_cdf(dof, t), np.where(benefit > shift, 0.0, 1.0))
        below = np.where(se > 0, _t_cdf(dof, t), np.where(benefit < shift, 0.0, 1.0))
    missing = ~(np.isfinite(se) & (np.isfinite(dof) | (se == 0)))
    return np.where(missing, np.nan, above), np.where(missing, np.nan, below)


def one_sided_tests(benefit: np.ndarray, se: np.ndarray, dof: np.ndarray, margin: float) -> dict[str, np.ndarray]:
    """The four one-sided p-values every verdict is made of: `above` (H0: benefit ≤ 0), `below` (H0: benefit ≥ 0),
    `under_margin` (H0: benefit ≥ +δ) and `over_minus` (H0: benefit ≤ −δ). NaN where there is no interval.
    gridlab.report.sequential turns them into their group-sequential counterparts."""
    above, below = one_sided(benefit, se, dof, 0.0)
    return dict(above=above, below=below, under_margin=one_sided(benefit, se, dof, margin)[1],
                over_minus=one_sided(benefit, se, dof, -margin)[0])


def judge(tests: dict[str, np.ndarray], group: np.ndarray, alpha: float = ALPHA) -> dict[str, np.ndarray]:
    """Verdicts from one_sided_tests' p-values (fixed-sample or sequential): the difference from 0 (two-sided: twice
    the smaller side) and equivalence within ±δ (TOST: the larger of the two), each Benjamini–Hochberg-adjusted
    within `group` (a setting); *equivalent* when equivalence is declared, else *prune* / *scratch* (the side that
    rejects) when the difference is, else *inconclusive*. Returns p, q, p_equivalent, q_equivalent, verdict."""
    above, below = tests["above"], tests["below"]
    p = np.minimum(1.0, 2 * np.minimum(above, below))
    p_equivalent = np.maximum(tests["under_margin"], tests["over_minus"])
    q, q_equivalent = benjamini_hochberg(p, group), benjamini_hochberg(p_equivalent, group)
    verdict = np.where(q_equivalent <= alpha, "equivalent",
                       np.where(q <= alpha, np.where(above < below, "prune", "scratch"), "inconclusive"))
    return dict(p=p, q=q, p_equivalent=p_equivalent, q_equivalent=q_equivalent, verdict=verdict)


def decide(benefit: np.ndarray, se: np.ndarray, dof: np.ndarray, group: np.ndarray, margin: float,
           alpha: float = ALPHA) -> dict[str, np.ndarray]:
    """Verdicts of cells with an estimate, its se and dof: the difference from 0 (two-sided t) and equivalence
    within ±margin (TOST), each Benjamini–Hochberg-adjusted within `group` (a setting). Returns se (NaN where no
    interval), half (95 % half-width), p, q, p_equivalent, q_equivalent and verdict (VERDICTS)."""
    benefit, se, dof = (np.asarray(x, dtype=float) for x in (benefit, se, dof))
    se = np.where(np.isfinite(se) & ((se == 0) | (np.isfinite(dof) & (dof > 0))), se, np.nan)
    judged = judge(one_sided_tests(benefit, se, dof, margin), group, alpha)
    return dict(se=se, half=half_width(se, dof), **judged)


def half_width(se: np.ndarray, dof: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """Half-width of the two-sided interval t(dof)·se for any positive, possibly fractional dof (a Satterthwaite
    dof can fall below 1); 0 where se is 0, NaN where there is no se or dof."""
    se, dof = np.asarray(se, dtype=float), np.asarray(dof, dtype=float)
    ok = np.isfinite(dof) & (dof > 0)
    with np.errstate(invalid="ignore"):
        quantile = np.where(ok, special.stdtrit(np.where(ok, dof, 1.0), 0.5 + confidence / 2), np.nan)
        return np.where(se == 0, 0.0, quantile * se)


def design_seeds(between: np.ndarray, margin: float, measurement: np.ndarray | None = None, alpha: float = ALPHA,
                 power: float = POWER) -> np.ndarray:
    """Seeds per arm a rerun needs to decide at the margin with `power`: the smallest n ≥ 2 for which a true gap of
    ±margin is told from 0 (two-sided t at alpha) and a true gap of 0 is declared equivalent (TOST), with the
    measured between-seed variance of one seed's difference and the cell's own n − 1 degrees of freedom (no
    pooling assumed), plus the held-out sample's stderr of the gap (``measurement``), which more seeds do not reduce.
    NaN without a variance; MAX_SEEDS + 1 when even MAX_SEEDS would not do (always, when the sample's error alone
    is too large: then a larger held-out sample is what helps)."""
    between = np.asarray(between, dtype=float)
    fixed = np.zeros(between.shape) if measurement is None else np.nan_to_num(np.asarray(measurement, float))
    out = np.full(between.shape, np.nan)
    ok = np.isfinite(between) & (between >= 0)
    if not ok.any() or margin <= 0:
        return out
    n = np.arange(2, MAX_SEEDS + 1, dtype=float)
    dof = n - 1
    difference = special.stdtrit(dof, 1 - alpha / 2) + special.stdtrit(dof, power)
    equivalence = special.stdtrit(dof, 1 - alpha) + special.stdtrit(dof, 1 - (1 - power) / 2)
    factor = np.maximum(difference, equivalence)
    se = np.sqrt(between[ok][:, None] / n[None, :] + fixed[ok][:, None] ** 2)  # decreasing in n
    needed = factor[None, :] * se <= margin
    found = needed.any(axis=1)
    out[ok] = np.where(found, n[np.argmax(needed, axis=1)], MAX_SEEDS + 1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The answer: one square per granularity × ratio × setting × budget


_SQUARE_SCHEMA = {"granularity": pl.Utf8, "ratio": pl.Float64, "setting": pl.Int64, "budget_tokens": pl.Int64,
                  "call": pl.Utf8, "method": pl.Utf8, "gap": pl.Float64, "half": pl.Float64, "test": pl.Utf8,
                  "methods": pl.UInt32, "decided_by": pl.UInt32, "n_seeds": pl.UInt32, "p_value": pl.Float64,
                  "q_value": pl.Float64, "p_equivalent": pl.Float64, "q_equivalent": pl.Float64}
NO_INTERVAL = "no interval"


def square_tests(benefit: np.ndarray, se: np.ndarray, dof: np.ndarray, square: np.ndarray,
                 margin: float) -> dict[str, np.ndarray]:
    """Per square (the methods of one granularity at one ratio, setting and budget) the tests of the best method
    against scratch, adjusted for choosing it (square_combine) from each method's fixed-sample t tests. Returns per
    square (sorted ids): p (two-sided direction), p_equivalent, prune (the direction is prune), k (methods with an
    interval)."""
    return square_combine(one_sided_tests(benefit, se, dof, margin), square)


def square_combine(tests: dict[str, np.ndarray], square: np.ndarray) -> dict[str, np.ndarray]:
    """The squares' tests from the methods' one-sided p-values (one_sided_tests, or their sequential counterparts):
    'some method beats scratch' is a union over the k methods (Bonferroni: k × the smallest one-sided p), 'every
    method loses' an intersection (the largest one-sided p); equivalence of the best method with scratch needs every
    method below +δ (intersection) and some method above −δ (union, Bonferroni)."""
    above, below = tests["above"], tests["below"]
    under_margin, over_minus = tests["under_margin"], tests["over_minus"]
    ok = np.isfinite(above)
    ids, inverse = np.unique(square, return_inverse=True)
    size = len(ids)
    k = np.bincount(inverse, weights=ok, minlength=size)

    def smallest(p):
        out = np.full(size, np.inf)
        np.minimum.at(out, inverse[ok], p[ok])
        return out

    def largest(p):
        out = np.full(size, -np.inf)
        np.maximum.at(out, inverse[ok], p[ok])
        return out

    with np.errstate(invalid="ignore"):
        p_prune = np.minimum(1.0, k * smallest(above))
        p_scratch = largest(below)
        p = np.minimum(1.0, 2 * np.minimum(p_prune, p_scratch))
        p_equivalent = np.maximum(largest(under_margin), np.minimum(1.0, k * smallest(over_minus)))
    none = k == 0
    return dict(ids=ids, p=np.where(none, np.nan, p), p_equivalent=np.where(none, np.nan, p_equivalent),
                prune=p_prune <= p_scratch, k=k)


def answer_squares(gaps: pl.DataFrame, margin: float = DEFAULT_MARGIN, alpha: float = ALPHA) -> pl.DataFrame:
    """Per granularity × ratio × setting × budget the call the reader wants — does pruning, with the granularity's
    best method, beat training from scratch? — with square_tests' adjustment for the choice of the method and
    Benjamini–Hochberg over the setting's squares: prune / scratch / equivalent / inconclusive, or NO_INTERVAL when
    no method has an interval there (no verdict). Columns: the keys, call, method (prune: the method with the
    strongest evidence; otherwise the one with the largest benefit), its gap, half and test, methods (compared),
    decided_by (methods with an interval), n_seeds (the fewest seeds behind a compared interval), p/q values."""
    if gaps.height == 0:
        return pl.DataFrame(schema=_SQUARE_SCHEMA)
    given = all(name in gaps.columns for name in TEST_COLUMNS)  # a sequential study's own p-values (sequential.py)
    frame = gaps.select(*SQUARE_KEYS, "method", "gap", "half", "test", "benefit", "se", "dof", "n_seeds",
                        *(TEST_COLUMNS if given else ())).with_columns(
        _square=pl.struct(SQUARE_KEYS).rank("dense").cast(pl.Int64) - 1)
    benefit = frame["benefit"].to_numpy().astype(float)
    se, dof = (frame[c].fill_null(np.nan).to_numpy().astype(float) for c in ("se", "dof"))
    one_sided_p = ({name: frame[name].fill_null(np.nan).to_numpy().astype(float) for name in TEST_COLUMNS}
                   if given else one_sided_tests(benefit, se, dof, margin))
    tests = square_combine(one_sided_p, frame["_square"].to_numpy())
    setting = (frame.group_by("_square").agg(pl.col("setting").first()).sort("_square")["setting"].to_numpy())
    q = benjamini_hochberg(tests["p"], setting)
    q_equivalent = benjamini_hochberg(tests["p_equivalent"], setting)
    call = np.where(tests["k"] == 0, NO_INTERVAL,
                    np.where(q_equivalent <= alpha, "equivalent",
                             np.where(q <= alpha, np.where(tests["prune"], "prune", "scratch"), "inconclusive")))
    calls = pl.DataFrame({"_square": tests["ids"].astype(np.int64), "call": call, "p_value": tests["p"],
                          "q_value": q, "p_equivalent": tests["p_equivalent"], "q_equivalent": q_equivalent,
                          "decided_by": tests["k"].astype(np.int64)}).with_columns(pl.col(pl.Float64).fill_nan(None))
    best = (
        frame.with_columns(_above=pl.Series(one_sided_p["above"]).fill_nan(None))
        .join(calls, on="_square")
        .with_columns(_has=pl.col("se").is_not_null(),
                      # prune: the method with the strongest evidence; otherwise the largest benefit
                      _first=pl.when(pl.col("call") == "prune").then(-pl.col("_above")).otherwise(0.0))
        .sort(["_has", "_first", "benefit"], descending=True, nulls_last=True)
        .group_by("_square", maintain_order=True)
        .agg(*[pl.col(c).first() for c in (*SQUARE_KEYS, "call", "method", "gap", "half", "test", "p_value",
                                            "q_value", "p_equivalent", "q_equivalent", "decided_by")],
             methods=pl.len(), n_seeds=pl.col("n_seeds").filter(pl.col("_has")).min())
    )
    return best.sort(SQUARE_KEYS).select(list(_SQUARE_SCHEMA)).cast(_SQUARE_SCHEMA)
