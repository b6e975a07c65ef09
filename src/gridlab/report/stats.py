"""Seed statistics: intervals, the pruned − random gap (paired or Welch), pooling, verdicts, seeds to resolve a tie.

Conventions:
- a *group* is one (granularity, method, ratio, init, setting, budget) combination; its seeds are the samples;
- a *pair* is a pruned group and its random twin (same granularity, method, ratio, setting, budget); a pruned cell
  and the random cell with the same seed share the data order and the calibration sample;
- *gap* = pruned − random of the headline metric, in the metric's own units;
- *benefit* = the gap signed so that positive means pruning is better (−gap for lower-is-better metrics);
- intervals are two-sided 95 % Student-t intervals.

Inference per pair: **paired** when both arms have the same seeds (the mean and spread of the per-seed differences),
**Welch** otherwise (unequal variances, Welch–Satterthwaite degrees of freedom). Pooling (`pool`):
- "none": each pair on its own;
- "seeds" (default): the spread is pooled over the pairs of a family (granularity, method, setting): every ratio and
  budget of a method in a setting shares one noise variance (paired: of the differences; Welch: per arm), with the
  degrees of freedom of all its seeds — model d = μ(ratio, budget) + ε, ε ~ N(0, σ²(method, setting));
- "ratios": additionally, in paired families with at least 3 ratios, the gap at each budget is linear in the
  ratio, d = a(budget) + b(budget)·ratio + ε with one σ² per family; each ratio's estimate is the fitted line.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
from scipy import special

CONFIDENCE = 0.95
GROUP_KEYS = ["granularity", "method", "ratio", "init", "setting", "budget_tokens"]
PAIR_KEYS = ["granularity", "method", "ratio", "setting", "budget_tokens"]
FAMILY_KEYS = ["granularity", "method", "setting"]
POOLING = ("none", "seeds", "ratios")
MIN_RATIOS_FOR_RATIO_MODEL = 3
MAX_SEEDS = 1000  # "seeds to resolve a tie" is searched up to this many per arm


def t_quantile(dof) -> np.ndarray:
    """The two-sided CONFIDENCE quantile of Student's t; NaN where dof < 1 or unknown."""
    dof = np.asarray(dof, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.where(dof >= 1, special.stdtrit(np.where(dof >= 1, dof, 1.0), 0.5 + CONFIDENCE / 2), np.nan)


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


def _arm_stats(values: pl.DataFrame, init: str) -> pl.DataFrame:
    return values.filter(pl.col("init") == init).group_by(PAIR_KEYS).agg(
        n=pl.col("value").count(), mean=pl.col("value").mean(), var=pl.col("value").var(),
        seeds=pl.col("seed").sort(),
    )


def _pair_differences(values: pl.DataFrame) -> pl.DataFrame:
    """Per pair key and seed present in both arms: d = pruned − random."""
    pruned = values.filter(pl.col("init") == "pruned").select([*PAIR_KEYS, "seed", "value"])
    random = values.filter(pl.col("init") == "random").select([*PAIR_KEYS, "seed", "value"])
    return pruned.join(random, on=[*PAIR_KEYS, "seed"], suffix="_random").with_columns(
        d=pl.col("value") - pl.col("value_random"))


def _pooled(frame: pl.DataFrame, var: str, n: str, where: str, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled variance Σ(n−1)·var / Σ(n−1) over the rows of each `keys` family where `where` holds, and its dof."""
    weighted = frame.with_columns(
        _ss=pl.when(pl.col(where)).then((pl.col(n) - 1) * pl.col(var).fill_null(0)).otherwise(0.0),
        _dof=pl.when(pl.col(where)).then(pl.col(n) - 1).otherwise(0),
    ).with_columns(_ss_f=pl.col("_ss").sum().over(keys), _dof_f=pl.col("_dof").sum().over(keys))
    dof = weighted["_dof_f"].to_numpy().astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = np.where(dof > 0, weighted["_ss_f"].to_numpy() / np.where(dof > 0, dof, 1), np.nan)
    return variance, dof


def _satterthwaite(a: np.ndarray, b: np.ndarray, dof_a: np.ndarray, dof_b: np.ndarray) -> np.ndarray:
    """Degrees of freedom of a + b, two independent variance terms with dof_a and dof_b."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a + b) ** 2 / (np.where(dof_a > 0, a**2 / dof_a, np.nan) + np.where(dof_b > 0, b**2 / dof_b, np.nan))


def _ratio_model(diffs: pl.DataFrame) -> pl.DataFrame:
    """Per (family, budget) with ≥ MIN_RATIOS_FOR_RATIO_MODEL ratios: OLS of d on ratio over the seed-level
    differences; σ² pooled over the budgets of the family. One row per pair key with the fitted value and its se."""
    lines = (
        diffs.group_by([*FAMILY_KEYS, "budget_tokens"])
        .agg(
            N=pl.len(), ratios=pl.col("ratio").n_unique(), xbar=pl.col("ratio").mean(), ybar=pl.col("d").mean(),
            sxx=((pl.col("ratio") - pl.col("ratio").mean()) ** 2).sum(),
            sxy=((pl.col("ratio") - pl.col("ratio").mean()) * (pl.col("d") - pl.col("d").mean())).sum(),
            syy=((pl.col("d") - pl.col("d").mean()) ** 2).sum(),
        )
        .filter(pl.col("ratios") >= MIN_RATIOS_FOR_RATIO_MODEL)
        .with_columns(slope=pl.col("sxy") / pl.col("sxx"))
        .with_columns(rss=(pl.col("syy") - pl.col("slope") * pl.col("sxy")).clip(lower_bound=0),
                      rdof=pl.col("N") - 2)
        .with_columns(s2=pl.col("rss").sum().over(FAMILY_KEYS) / pl.col("rdof").sum().over(FAMILY_KEYS),
                      model_dof=pl.col("rdof").sum().over(FAMILY_KEYS))
    )
    at_ratio = diffs.select([*PAIR_KEYS]).unique().join(lines, on=[*FAMILY_KEYS, "budget_tokens"])
    return at_ratio.select(
        *PAIR_KEYS,
        model_gap=pl.col("ybar") + pl.col("slope") * (pl.col("ratio") - pl.col("xbar")),
        model_se=(pl.col("s2") * (1 / pl.col("N") + (pl.col("ratio") - pl.col("xbar")) ** 2 / pl.col("sxx"))).sqrt(),
        model_dof=pl.col("model_dof").cast(pl.Float64),
    )


_GAP_SCHEMA = {
    **dict(zip(PAIR_KEYS, (pl.Utf8, pl.Utf8, pl.Float64, pl.Int64, pl.Int64), strict=True)),
    "n_pruned": pl.UInt32, "n_random": pl.UInt32, "n_pairs": pl.UInt32, "mean_pruned": pl.Float64,
    "mean_random": pl.Float64, "test": pl.Utf8, "model": pl.Utf8, "observed_gap": pl.Float64, "gap": pl.Float64,
    "se": pl.Float64, "dof": pl.Float64, "half": pl.Float64, "benefit": pl.Float64, "benefit_low": pl.Float64,
    "benefit_high": pl.Float64, "verdict": pl.Utf8, "seeds_needed": pl.Float64,
}


def gap_table(values: pl.DataFrame, higher_is_better: bool, pool: str = "seeds") -> pl.DataFrame:
    """Pruned vs random per (granularity, method, ratio, setting, budget) from seed-level headline values.

    Columns: n_pruned, n_random, n_pairs (seeds in both arms), mean_pruned, mean_random, test ("paired" or
    "Welch"), model ("per pair", "pooled σ" or "linear in ratio"), observed_gap (mean pruned − mean random),
    gap (the model's estimate: observed_gap except under the ratio model), se, dof, half (95 % half-width),
    benefit (+ = pruning better), benefit_low/high, verdict, seeds_needed (ties: seeds per arm that would resolve
    a gap of this size at this spread, ≈; MAX_SEEDS + 1 = more than MAX_SEEDS; null otherwise).
    """
    if pool not in POOLING:
        raise ValueError(f"unknown pooling {pool!r}; valid: {', '.join(POOLING)}")
    pruned, random = _arm_stats(values, "pruned"), _arm_stats(values, "random")
    joined = pruned.join(random, on=PAIR_KEYS, how="inner", suffix="_random").rename(
        {"n": "n_pruned", "mean": "mean_pruned", "var": "var_pruned", "seeds": "seeds_pruned"})
    if joined.height == 0:
        return pl.DataFrame(schema=_GAP_SCHEMA)
    diffs = _pair_differences(values)
    paired_stats = diffs.group_by(PAIR_KEYS).agg(n_pairs=pl.len(), mean_d=pl.col("d").mean(), var_d=pl.col("d").var())
    joined = joined.join(paired_stats, on=PAIR_KEYS, how="left").with_columns(
        n_pairs=pl.col("n_pairs").fill_null(0),
        paired=(pl.col("seeds_pruned") == pl.col("seeds_random")) & pl.col("n_pairs").eq(pl.col("n_pruned")),
    ).with_columns(welch=~pl.col("paired")).sort(PAIR_KEYS)

    paired = joined["paired"].to_numpy()
    n_p = joined["n_pruned"].to_numpy().astype(float)
    n_r = joined["n_random"].to_numpy().astype(float)
    n_d = joined["n_pairs"].to_numpy().astype(float)
    observed = joined["mean_pruned"].to_numpy() - joined["mean_random"].to_numpy()
    if pool == "none":
        var_d = joined["var_d"].to_numpy().astype(float)
        dof_d = n_d - 1
        var_p, dof_p = joined["var_pruned"].to_numpy().astype(float), n_p - 1
        var_r, dof_r = joined["var_random"].to_numpy().astype(float), n_r - 1
    else:
        var_d, dof_d = _pooled(joined, "var_d", "n_pairs", "paired", FAMILY_KEYS)
        var_p, dof_p = _pooled(joined, "var_pruned", "n_pruned", "welch", FAMILY_KEYS)
        var_r, dof_r = _pooled(joined, "var_random", "n_random", "welch", FAMILY_KEYS)
    with np.errstate(invalid="ignore", divide="ignore"):
        se_paired = np.sqrt(var_d / n_d)
        a, b = var_p / n_p, var_r / n_r
        se_welch = np.sqrt(a + b)
        dof_welch = np.where(se_welch > 0, _satterthwaite(a, b, dof_p, dof_r), np.minimum(dof_p, dof_r))
    se = np.where(paired, se_paired, se_welch)
    dof = np.where(paired, dof_d, dof_welch)
    gap = observed.copy()
    model = np.array(["per pair" if pool == "none" else "pooled σ"] * len(gap), dtype=object)
    if pool == "ratios":
        fitted = joined.select(PAIR_KEYS).with_row_index("_row").join(
            _ratio_model(diffs.join(joined.filter(pl.col("paired")).select(PAIR_KEYS), on=PAIR_KEYS)), on=PAIR_KEYS)
        rows = fitted["_row"].to_numpy()
        gap[rows] = fitted["model_gap"].to_numpy()
        se[rows] = fitted["model_se"].to_numpy()
        dof[rows] = fitted["model_dof"].to_numpy()
        model[rows] = "linear in ratio"
    se = np.where(np.isfinite(se) & (dof >= 1), se, np.nan)
    half = t_quantile(dof) * se
    half = np.where(se == 0, 0.0, half)
    sign = 1.0 if higher_is_better else -1.0
    benefit = sign * gap
    low, high = benefit - half, benefit + half
    verdicts = [verdict(None if math.isnan(lo) else lo, None if math.isnan(hi) else hi, value)
                for lo, hi, value in zip(low, high, benefit, strict=True)]
    needed = seeds_to_resolve(np.abs(gap), se, dof, np.where(paired, n_d, np.minimum(n_p, n_r)),
                              np.array([v == "tie" for v in verdicts]), paired)
    return joined.select([*PAIR_KEYS, "n_pruned", "n_random", "n_pairs", "mean_pruned", "mean_random"]).with_columns(
        test=pl.Series(np.where(paired, "paired", "Welch"), dtype=pl.Utf8),
        model=pl.Series(model.tolist(), dtype=pl.Utf8),
        observed_gap=pl.Series(observed, dtype=pl.Float64),
        gap=pl.Series(gap, dtype=pl.Float64),
        se=pl.Series(se, dtype=pl.Float64).fill_nan(None),
        dof=pl.Series(dof, dtype=pl.Float64).fill_nan(None),
        half=pl.Series(half, dtype=pl.Float64).fill_nan(None),
        benefit=pl.Series(benefit, dtype=pl.Float64),
        benefit_low=pl.Series(low, dtype=pl.Float64).fill_nan(None),
        benefit_high=pl.Series(high, dtype=pl.Float64).fill_nan(None),
        verdict=pl.Series(verdicts, dtype=pl.Utf8),
        seeds_needed=pl.Series(needed, dtype=pl.Float64).fill_nan(None),
    ).cast(_GAP_SCHEMA)


def seeds_to_resolve(gap: np.ndarray, se: np.ndarray, dof: np.ndarray, n: np.ndarray, rows: np.ndarray,
                     paired: np.ndarray) -> np.ndarray:
    """Smallest seeds per arm n' for which the 95 % half-width t(dof')·se·√(n/n') falls below |gap|, assuming the
    gap and the spread stay as observed; dof' = dof + (n' − n) for paired differences (one more difference per
    seed), dof·(n' − 1)/(n − 1) for Welch (both arms grow). Only for `rows`; NaN elsewhere or when there is no
    spread to extrapolate; MAX_SEEDS + 1 when even MAX_SEEDS would not do."""
    out = np.full(gap.shape, np.nan)
    ok = rows & np.isfinite(se) & (se > 0) & np.isfinite(gap) & np.isfinite(dof) & (n >= 1)
    if not ok.any():
        return out
    g, s, d, k, pair = gap[ok], se[ok], dof[ok], n[ok], paired[ok]

    def resolves(m: np.ndarray) -> np.ndarray:
        grown = np.where(pair, d + (m - k), d * (m - 1) / np.maximum(k - 1, 1))
        return t_quantile(grown) * s * np.sqrt(k / m) < g

    low, high = k.copy(), np.full(k.shape, float(MAX_SEEDS))
    never = ~resolves(high)
    for _ in range(12):  # bisection on integers: 2^12 > MAX_SEEDS
        mid = np.floor((low + high) / 2)
        good = resolves(mid)
        high = np.where(good, mid, high)
        low = np.where(good, low, mid)
        if np.all(high - low <= 1):
            break
    out[ok] = np.where(never, MAX_SEEDS + 1, high)
    return out


def family_spread(values: pl.DataFrame, gaps: pl.DataFrame) -> pl.DataFrame:
    """Per family (granularity, method, setting): the pooled spread of paired differences and its dof, the number of
    pairs with each test, and Bartlett's test of equal variance across the family's pairs (p; null with fewer than
    two pairs of ≥ 2 differences). The check of the pooling model."""
    from scipy import stats  # here: scipy.stats takes ~0.7 s to import, and the plotting process never needs it
    diffs = _pair_differences(values).join(gaps.filter(pl.col("test") == "paired").select(PAIR_KEYS), on=PAIR_KEYS)
    rows = []
    for key, part in sorted(gaps.group_by(FAMILY_KEYS), key=lambda item: item[0]):
        granularity, method, setting = key
        family = diffs.filter((pl.col("granularity") == granularity) & (pl.col("method") == method)
                              & (pl.col("setting") == setting))
        samples = [g["d"].to_numpy() for _, g in family.group_by(["ratio", "budget_tokens"]) if g.height >= 2]
        dof = sum(len(s) - 1 for s in samples)
        pooled_sd = math.sqrt(sum(((s - s.mean()) ** 2).sum() for s in samples) / dof) if dof else None
        p = None
        if len(samples) >= 2 and all(np.ptp(s) > 0 for s in samples):
            p = float(stats.bartlett(*samples).pvalue)
        rows.append(dict(granularity=granularity, method=method, setting=setting,
                         paired=int((part["test"] == "paired").sum()), welch=int((part["test"] == "Welch").sum()),
                         pooled_sd=pooled_sd, dof=dof, bartlett_p=p))
    return pl.DataFrame(rows, schema={"granularity": pl.Utf8, "method": pl.Utf8, "setting": pl.Int64,
                                      "paired": pl.Int64, "welch": pl.Int64, "pooled_sd": pl.Float64,
                                      "dof": pl.Int64, "bartlett_p": pl.Float64})
