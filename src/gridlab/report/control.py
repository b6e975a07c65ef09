"""The embeddings control: how much of the pruned arm's advantage the parent's trained embeddings alone carry.

A pruned model keeps the parent's token embeddings, final norm and lm_head (the ratio counts decoder weights only),
so some of its advantage over a random twin may be inherited token statistics rather than decoder knowledge. The
embeddings arm is the random twin with exactly those tensors inherited (gridlab.pruning.inherit_embeddings). Per
group (granularity, method, ratio, setting, budget) the report compares the pruned arm with it by the same
statistics as with the random twin (stats.gap_table(..., against="embeddings")), and gives the **share** of the
advantage the embeddings carry:

    share = (random − embeddings) / (random − pruned)      (for a loss; signs follow the metric's direction)

0: the embeddings carry nothing of it; 1: all of it. Per seed a = benefit of the embeddings arm over random, b =
benefit of the pruned arm over random (same seed: the three arms share the data order); the share is ā / b̄, and its
interval is **Fieller's**: the θ with (ā − θ·b̄)² ≤ t²·Var(ā − θ·b̄), Var from the seeds' covariance of (a, b) over
n plus the held-out sample's covariance of the two gaps (the per-document losses, common to every seed: the
linearised ratio-estimator covariance), t with the seeds' n − 1 degrees of freedom. It is exact for normal seed
effects whatever the correlation of a and b, and says "unbounded" when the pruned arm's advantage itself is not
resolved (b̄ within its own interval of 0): then no share can be read. Coverage by simulation:
tests/test_report_control.py. The pooled share per setting and budget is the same over the seeds' means across the
groups (Σ over groups of the embeddings' advantage ÷ Σ of the pruned arm's): the answer's sentence quotes it.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from gridlab.report.stats import CONFIDENCE, PAIR_KEYS, t_quantile

GROUP = list(PAIR_KEYS)
SHARE_SCHEMA = {"granularity": pl.Utf8, "method": pl.Utf8, "ratio": pl.Float64, "setting": pl.Int64,
                "budget_tokens": pl.Int64, "share": pl.Float64, "share_low": pl.Float64, "share_high": pl.Float64,
                "share_bounded": pl.Boolean, "n_seeds": pl.UInt32, "advantage": pl.Float64,
                "embeddings_advantage": pl.Float64}
POOLED_SCHEMA = {"setting": pl.Int64, "budget_tokens": pl.Int64, "groups": pl.UInt32,
                 **{k: v for k, v in SHARE_SCHEMA.items() if k not in GROUP}}


def fieller(a: np.ndarray, b: np.ndarray, v_aa: np.ndarray, v_ab: np.ndarray, v_bb: np.ndarray, dof: np.ndarray,
            confidence: float = CONFIDENCE) -> dict[str, np.ndarray]:
    """Fieller's interval for θ = a/b from estimates a, b and the variances and covariance of their errors: the θ
    with (a − θb)² ≤ t²(v_aa − 2θ·v_ab + θ²·v_bb). Returns share (a/b; NaN where b = 0), low, high (NaN where the
    set is unbounded) and bounded (the set is an interval: b is resolved from 0 at this confidence)."""
    a, b, v_aa, v_ab, v_bb = (np.asarray(x, dtype=float) for x in (a, b, v_aa, v_ab, v_bb))
    t2 = t_quantile(dof, confidence) ** 2
    quad = b ** 2 - t2 * v_bb
    lin = -2 * (a * b - t2 * v_ab)
    const = a ** 2 - t2 * v_aa
    with np.errstate(invalid="ignore", divide="ignore"):
        disc = np.sqrt(np.maximum(lin ** 2 - 4 * quad * const, 0.0))
        bounded = np.isfinite(quad) & (quad > 0)
        first, second = (-lin - disc) / (2 * quad), (-lin + disc) / (2 * quad)
        share = np.where(b != 0, a / b, np.nan)
    return dict(share=share, low=np.where(bounded, np.minimum(first, second), np.nan),
                high=np.where(bounded, np.maximum(first, second), np.nan), bounded=bounded)


def _benefits(values: pl.DataFrame, sign: float, keys: list[str]) -> pl.DataFrame:
    """Per ``keys`` and seed with all three arms: a (embeddings' benefit over random) and b (pruned's)."""
    wide = (values.filter(pl.col("init").is_in(["pruned", "random", "embeddings"]))
            .pivot(on="init", index=[*keys, "seed"], values="value", aggregate_function="first"))
    for arm in ("pruned", "random", "embeddings"):
        if arm not in wide.columns:
            return pl.DataFrame(schema={**{k: values.schema[k] for k in keys}, "seed": pl.Int64, "a": pl.Float64,
                                        "b": pl.Float64})
    return wide.drop_nulls(["pruned", "random", "embeddings"]).select(
        *keys, "seed", a=sign * (pl.col("embeddings") - pl.col("random")),
        b=sign * (pl.col("pruned") - pl.col("random")))


def _document_covariance(values: pl.DataFrame, documents: pl.DataFrame, sign: float,
                         keys: list[str]) -> pl.DataFrame:
    """Per ``keys``: the held-out sample's covariance of the two seed-mean gaps (m_aa, m_ab, m_bb), from the
    per-document losses (each arm's document sums averaged over its seeds; a = embeddings − random, b = pruned −
    random, signed as benefits): the linearised ratio-estimator covariance, n/(n − 1)·Σ u·w / (Σx)², u and w each
    gap's residual d − R·x. Groups without per-document losses for all three arms are absent (covariance 0)."""
    empty = pl.DataFrame(schema={**{k: values.schema[k] for k in keys}, "m_aa": pl.Float64, "m_ab": pl.Float64,
                                 "m_bb": pl.Float64})
    if documents.height == 0:
        return empty
    rows = documents.join(values.select("cell_id", *keys, "init"), on="cell_id", how="inner")
    arms = rows.group_by([*keys, "init", "document"]).agg(x=pl.col("tokens").first(), y=pl.col("loss_sum").mean())
    wide = arms.pivot(on="init", index=[*keys, "document"], values="y", aggregate_function="first")
    tokens = arms.group_by([*keys, "document"]).agg(x=pl.col("x").first())
    if not {"pruned", "random", "embeddings"} <= set(wide.columns):
        return empty
    docs = wide.join(tokens, on=[*keys, "document"]).drop_nulls(["pruned", "random", "embeddings"]).with_columns(
        a=sign * (pl.col("embeddings") - pl.col("random")), b=sign * (pl.col("pruned") - pl.col("random")))
    total = pl.col("x").sum().over(keys)
    docs = docs.with_columns(u=pl.col("a") - pl.col("a").sum().over(keys) / total * pl.col("x"),
                             w=pl.col("b") - pl.col("b").sum().over(keys) / total * pl.col("x"))
    scale = pl.len() / (pl.len() - 1) / pl.col("x").sum() ** 2
    return docs.group_by(keys).agg(
        m_aa=scale * (pl.col("u") ** 2).sum(), m_ab=scale * (pl.col("u") * pl.col("w")).sum(),
        m_bb=scale * (pl.col("w") ** 2).sum(), n_docs=pl.len()).filter(pl.col("n_docs") >= 2).drop("n_docs")


def _shares(per_seed: pl.DataFrame, covariance: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Fieller's share per ``keys`` from per-seed (a, b) and the document covariance."""
    stats = per_seed.group_by(keys).agg(
        n_seeds=pl.len().cast(pl.UInt32), a=pl.col("a").mean(), b=pl.col("b").mean(),
        s_aa=pl.col("a").var(), s_bb=pl.col("b").var(), s_ab=pl.cov("a", "b"))
    stats = stats.join(covariance, on=keys, how="left").with_columns(
        pl.col("m_aa", "m_ab", "m_bb").fill_null(0.0))
    n = stats["n_seeds"].to_numpy().astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        seeds_part = {k: stats[f"s_{k}"].fill_null(np.nan).to_numpy() / n for k in ("aa", "ab", "bb")}
    result = fieller(stats["a"].to_numpy(), stats["b"].to_numpy(),
                     *(seeds_part[k] + stats[f"m_{k}"].to_numpy() for k in ("aa", "ab", "bb")),
                     np.where(n >= 2, n - 1, np.nan))
    return stats.select(*keys, "n_seeds").with_columns(
        share=pl.Series(result["share"]).fill_nan(None),
        share_low=pl.Series(result["low"]).fill_nan(None),
        share_high=pl.Series(result["high"]).fill_nan(None),
        share_bounded=pl.Series(result["bounded"]),
        advantage=stats["b"], embeddings_advantage=stats["a"])


def embedding_shares(values: pl.DataFrame, documents: pl.DataFrame, higher_is_better: bool) -> pl.DataFrame:
    """Per group (PAIR_KEYS) with all three arms: the share of the pruned arm's advantage over random that the
    embeddings control carries, Fieller's 95 % interval (SHARE_SCHEMA; low/high empty where unbounded), the seeds
    behind it, and the two advantages (seed means, positive = better than random)."""
    sign = 1.0 if higher_is_better else -1.0
    per_seed = _benefits(values, sign, GROUP)
    if per_seed.height == 0:
        return pl.DataFrame(schema=SHARE_SCHEMA)
    shares = _shares(per_seed, _document_covariance(values, documents, sign, GROUP), GROUP)
    return shares.select(list(SHARE_SCHEMA)).cast(SHARE_SCHEMA).sort(GROUP)


def pooled_shares(values: pl.DataFrame, documents: pl.DataFrame, higher_is_better: bool) -> pl.DataFrame:
    """Per setting and budget: the share of the pruned arm's advantage the embeddings carry, pooled over the groups
    (granularity × method × ratio) that have all three arms on every seed kept (the seeds every such group has):
    the seeds' mean advantages over the groups, then Fieller's interval as per group."""
    sign = 1.0 if higher_is_better else -1.0
    per_seed = _benefits(values, sign, GROUP)
    if per_seed.height == 0:
        return pl.DataFrame(schema=POOLED_SCHEMA)
    outer = ["setting", "budget_tokens"]
    groups = per_seed.group_by(outer).agg(groups=pl.struct("granularity", "method", "ratio").n_unique())
    complete = (per_seed.join(groups, on=outer)
                .filter(pl.len().over([*outer, "seed"]) == pl.col("groups")))
    pooled = complete.group_by([*outer, "seed"]).agg(a=pl.col("a").mean(), b=pl.col("b").mean(),
                                                     groups=pl.col("groups").first())
    covariance = pl.DataFrame(schema={**{k: pl.Int64 for k in outer}, "m_aa": pl.Float64, "m_ab": pl.Float64,
                                      "m_bb": pl.Float64})
    if documents.height:
        kept = values.join(complete.select(*GROUP, "seed").unique(), on=[*GROUP, "seed"], how="semi")
        # Each document's advantages averaged over the groups: what the pooled seed means are, per document.
        per_group = documents.join(kept.select("cell_id", *GROUP, "init"), on="cell_id", how="inner")
        pooled_docs = (per_group.group_by([*GROUP, "init", "document"])
                       .agg(tokens=pl.col("tokens").first(), loss_sum=pl.col("loss_sum").mean())
                       .group_by([*outer, "init", "document"])
                       .agg(tokens=pl.col("tokens").first(), loss_sum=pl.col("loss_sum").mean())
                       .with_columns(cell_id=pl.concat_str([pl.col("setting"), pl.col("budget_tokens"),
                                                            pl.col("init")], separator="/")))
        cells = pooled_docs.select("cell_id", *outer, "init").unique()
        covariance = _document_covariance(cells, pooled_docs.select("cell_id", "document", "tokens", "loss_sum"),
                                          sign, outer)
    shares = _shares(pooled.drop("groups"), covariance, outer)
    shares = shares.join(pooled.group_by(outer).agg(groups=pl.col("groups").first().cast(pl.UInt32)), on=outer)
    return shares.select(list(POOLED_SCHEMA)).cast(POOLED_SCHEMA).sort(outer)


def share_text(share: float | None, low: float | None, high: float | None, bounded: bool | None) -> str:
    """'62 % [48 %, 75 %]', '62 % (unbounded: the advantage is not resolved)', or '–'."""
    if share is None or not np.isfinite(share):
        return "–"
    if not bounded or low is None or high is None:
        return f"{100 * share:.0f} % (interval unbounded)"
    return f"{100 * share:.0f} % [{100 * low:.0f} %, {100 * high:.0f} %]"
