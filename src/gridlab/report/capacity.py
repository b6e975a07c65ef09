"""Is setting 2 meaningful at this scale? The parent against the small architecture trained from scratch on the
parent's own P tokens.

Setting 2 gives random init P + B tokens, so it can favour pruning only if the parent knows more than the small
architecture can learn from P tokens. A setting-2 random trajectory passes through exactly P tokens; its branch at
B = 0 (a cell with budget_tokens 0, setting 2, random init) is that small architecture trained from scratch on P
tokens. Set beside the parent's own loss after P tokens (`parent_metrics`), per granularity × ratio:

- **capacity-limited**: the parent is better than the small architecture at P tokens (the whole 95 % interval):
  its extra capacity holds what P tokens teach and the small architecture cannot learn, so setting 2 is a fair test
  of whether pruning keeps it;
- **data-limited**: the small architecture is at least as good (interval entirely on its side): at P tokens the
  parent's capacity has not paid off, so anything pruned from it starts behind a scratch model given P + B tokens,
  and setting 2 must favour scratch at this scale whatever the method;
- **indistinguishable**: the interval contains 0 — no measurable capacity advantage at P tokens.

The interval covers the small architecture's seeds (t-interval) and the parent's own stderr when one is recorded;
the parent is a single model, so its seed-to-seed spread is not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from gridlab.report.read import headline_values
from gridlab.report.stats import t_quantile

REGIMES = ("capacity-limited", "data-limited", "indistinguishable")


@dataclass(frozen=True)
class Capacity:
    available: bool
    reason: str  # why not, when not available
    metric: str | None = None
    higher_is_better: bool | None = None
    parent_tokens: float | None = None
    parent_value: float | None = None
    parent_stderr: float | None = None
    rows: list[dict] = field(default_factory=list)  # per granularity × ratio
    counts: dict[str, int] = field(default_factory=dict)  # regime → rows


def _unavailable(reason: str) -> Capacity:
    return Capacity(available=False, reason=reason)


def _parent_value(parent_metrics: pl.DataFrame, metric: str) -> tuple[float, float | None, int, bool] | None:
    rows = parent_metrics.filter((pl.col("name") == metric) & pl.col("value").is_finite()).sort("tokens")
    if rows.height == 0:
        return None
    last = rows.row(rows.height - 1, named=True)
    return last["value"], last["stderr"], last["tokens"], last["higher_is_better"]


def capacity_diagnostic(cells: pl.DataFrame, metrics: pl.DataFrame, parent_metrics: pl.DataFrame,
                        has_parent_metrics: bool, parent_tokens: float | None, headline: str = "val_loss",
                        ) -> Capacity:
    """Per granularity × ratio, the setting-2 random B = 0 cells against the parent at P (see the module text).
    The metric is the headline metric when the parent has it, else val_loss."""
    if cells.filter(pl.col("setting") == 2).height == 0:
        return _unavailable("the grid has no setting 2")
    references = cells.filter((pl.col("setting") == 2) & (pl.col("init") == "random")
                              & (pl.col("budget_tokens") == 0))
    if references.height == 0:
        return _unavailable("the grid has no setting-2 random branch at B = 0 (the small architecture trained from "
                            "scratch on exactly the parent's P tokens); grids planned before gridlab added it lack it")
    if not has_parent_metrics:
        return _unavailable("the database has no parent_metrics table (the parent's own loss after P tokens); "
                            "ingest the run again with this gridlab")
    metric = next((m for m in (headline, "val_loss") if _parent_value(parent_metrics, m) is not None), None)
    if metric is None:
        return _unavailable(f"parent_metrics has no {headline} (nor val_loss) for the parent: its measurement at "
                            "P tokens has not finished or was not recorded")
    parent_value, parent_stderr, _, declared = _parent_value(parent_metrics, metric)
    if declared is None:
        return _unavailable(f"parent_metrics declares no direction for {metric}")
    values = headline_values(references, metrics, metric)
    if values.height == 0:
        done = references.filter(pl.col("status") == "done").height
        return _unavailable(f"no setting-2 random B = 0 cell has {metric} yet ({done} of {references.height} done)")
    # Methods whose pruned models share an architecture share one random trajectory: count its branch once.
    trajectory = pl.coalesce(pl.col("branch_path"), pl.col("cell_id"))
    distinct = values.with_columns(trajectory=trajectory).unique(["granularity", "ratio", "trajectory", "seed"],
                                                                 keep="first")
    grouped = distinct.group_by(["granularity", "ratio"]).agg(
        n=pl.len(), mean=pl.col("value").mean(), sd=pl.col("value").std(),
        trained_tokens=pl.col("trained_tokens").mean(),
    ).join(values.group_by(["granularity", "ratio"]).agg(methods=pl.col("method").unique().sort()),
           on=["granularity", "ratio"]).sort(["granularity", "ratio"])
    sign = 1.0 if declared else -1.0
    n = grouped["n"].to_numpy().astype(float)
    small = grouped["mean"].to_numpy()
    sd = grouped["sd"].fill_null(np.nan).to_numpy()
    # advantage > 0: the parent is better than the small architecture at P tokens (capacity pays off)
    advantage = sign * (parent_value - small)
    with np.errstate(invalid="ignore"):
        se = np.sqrt(sd**2 / n + (parent_stderr or 0.0) ** 2)
        half = t_quantile(n - 1) * se
    rows, counts = [], dict.fromkeys(REGIMES, 0)
    for i, row in enumerate(grouped.iter_rows(named=True)):
        h = None if math.isnan(half[i]) else float(half[i])
        if h is None:
            regime = "capacity-limited" if advantage[i] > 0 else "data-limited" if advantage[i] < 0 else \
                "indistinguishable"
        elif advantage[i] - h > 0:
            regime = "capacity-limited"
        elif advantage[i] + h < 0:
            regime = "data-limited"
        else:
            regime = "indistinguishable"
        counts[regime] += 1
        rows.append(dict(granularity=row["granularity"], ratio=row["ratio"], n=row["n"], small=row["mean"],
                         small_half=None if h is None else float(t_quantile(n[i] - 1) * sd[i] / math.sqrt(n[i])),
                         trained_tokens=row["trained_tokens"], parent=parent_value,
                         difference=float(row["mean"] - parent_value), advantage=float(advantage[i]), half=h,
                         regime=regime, single_seed=h is None, methods=row["methods"]))
    return Capacity(available=True, reason="", metric=metric, higher_is_better=bool(declared),
                    parent_tokens=parent_tokens, parent_value=parent_value, parent_stderr=parent_stderr,
                    rows=rows, counts=counts)
