"""The regime the verdicts describe, for the report's first screen: optimizer steps per budget, tokens per parameter,
the held-out sample and its measurement noise against the margin — and the warnings when the grid is too small for
its verdicts to answer the question (they then describe the first Adam steps, or the held-out sample's noise).

Pure: the grid's stored spec, the grid row, the headline values and the metrics table in; a Regime out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import polars as pl

from gridlab.report.tables import format_number, format_tokens

MIN_STEPS = 100  # below this many optimizer steps a verdict describes the first Adam steps
COMPUTE_OPTIMAL = 20  # tokens per parameter (Hoffmann et al., 2022)
Z = 1.96  # the 95 % normal quantile of the measurement-noise check


@dataclass(frozen=True)
class Regime:
    batch_tokens: int | None  # tokens per optimizer step (schedule.batch_size × seq_len); None without a spec
    budgets: list[dict]  # per budget B: steps, tokens per parameter of the pruned models (min/max)
    parent_tokens: int | None
    parent_params: int | None
    sample_sequences: int | None  # held-out sequences per measurement (None: the whole validation split)
    seq_len: int | None
    stderr: float | None  # median stderr of the headline metric over the compared cells (None: not measured)
    margin: float
    gap_stderr: float | None = None  # median document-sampling stderr of a paired gap (stats.measurement_error)
    warnings: list[str] = field(default_factory=list)

    @property
    def parent_per_param(self) -> float | None:
        if self.parent_tokens and self.parent_params:
            return self.parent_tokens / self.parent_params
        return None

    @property
    def measurement_noise(self) -> float | None:
        """The 95 % half-width a gap carries from the held-out sample alone: Z × the paired gap's document-sampling
        stderr where the per-document losses are in the database, else Z·√2·stderr (the two models' losses taken as
        uncorrelated: an upper bound for positively correlated models)."""
        if self.gap_stderr is not None:
            return Z * self.gap_stderr
        return None if self.stderr is None else Z * math.sqrt(2) * self.stderr


def _spec_number(spec: dict, *path: str) -> int | None:
    node = spec
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, int | float) and not isinstance(node, bool) else None


def _median_stderr(values: pl.DataFrame, metrics: pl.DataFrame, metric: str) -> float | None:
    """The median stderr of the metric's last value over the compared cells, when any carries one."""
    last = (metrics.filter(pl.col("name") == metric).sort("tokens").group_by("cell_id", maintain_order=True)
            .agg(pl.col("stderr").last()))
    stderr = values.select("cell_id").join(last, on="cell_id")["stderr"].drop_nulls()
    stderr = stderr.filter(stderr.is_finite())
    return float(stderr.median()) if stderr.len() else None


def regime(spec: dict, grid: dict, values: pl.DataFrame, metrics: pl.DataFrame, metric: str,
           margin: float, gaps: pl.DataFrame | None = None) -> Regime:
    """The regime of the compared cells (`values`: headline values of budgets B > 0) and its warnings; `gaps`
    (stats.gap_table) gives the paired gaps' measurement error when the database has the per-document losses."""
    gap_stderr = None
    if gaps is not None and "se_measurement" in gaps.columns:
        measured = gaps["se_measurement"].drop_nulls()
        gap_stderr = float(measured.median()) if measured.len() else None
    seq_len = _spec_number(spec, "seq_len")
    batch = _spec_number(spec, "schedule", "batch_size")
    batch_tokens = int(batch * seq_len) if batch and seq_len else None
    budgets = []
    pruned = values.filter(pl.col("init") == "pruned") if "params" in values.columns else values.clear()
    for budget in sorted(values["budget_tokens"].unique().to_list()):
        params = pruned.filter(pl.col("budget_tokens") == budget)["params"].drop_nulls() if pruned.height else None
        per_param = (budget / params.max(), budget / params.min()) if params is not None and params.len() else None
        budgets.append(dict(budget=budget, steps=budget / batch_tokens if batch_tokens else None,
                            per_param=per_param))
    sequences = _spec_number(spec, "evaluation", "max_sequences")
    result = Regime(batch_tokens=batch_tokens, budgets=budgets, parent_tokens=grid.get("parent_tokens"),
                    parent_params=grid.get("parent_params"), sample_sequences=sequences, seq_len=seq_len,
                    stderr=_median_stderr(values, metrics, metric), margin=margin, gap_stderr=gap_stderr)
    return Regime(**{**result.__dict__, "warnings": _warnings(result, metric)})


def _warnings(r: Regime, metric: str) -> list[str]:
    out = []
    short = [b for b in r.budgets if b["steps"] is not None and b["steps"] < MIN_STEPS]
    if short:
        span = ", ".join(f"{format_tokens(b['budget'])} ({b['steps']:.0f})" for b in short)
        every = "Every budget is" if len(short) == len(r.budgets) else f"{len(short)} of {len(r.budgets)} budgets are"
        out.append(f"{every} under {MIN_STEPS} optimizer steps of {format_tokens(r.batch_tokens)} tokens — B (steps): "
                   f"{span}: there the verdicts describe the first Adam steps of each arm, not which start is better "
                   f"once trained.")
    noise = r.measurement_noise
    if noise is not None and noise >= r.margin:
        source = (f"a paired gap's document-sampling stderr is {format_number(r.gap_stderr, 2)} (median over cells)"
                  if r.gap_stderr is not None else
                  f"{metric}'s stderr is {format_number(r.stderr, 2)} (median over cells; the two models' errors "
                  f"taken as uncorrelated)")
        out.append(f"The held-out measurement cannot resolve the margin: {source}, so a gap carries "
                   f"±{format_number(noise, 2)} of sample noise (95 %) against a margin of "
                   f"±{format_number(r.margin, 2)}; the intervals include it, so no cell can be called equivalent "
                   f"however many seeds it has. Raise [evaluation] max_sequences.")
    return out


def regime_line(r: Regime, metric: str) -> str:
    """One sentence: steps per budget, tokens per parameter, the held-out sample and its stderr."""
    parts = []
    if r.budgets:
        first, last = r.budgets[0], r.budgets[-1]
        span = (format_tokens(first["budget"]) if first is last
                else f"{format_tokens(first['budget'])}–{format_tokens(last['budget'])}")
        if r.batch_tokens:
            steps = (f"{first['steps']:.0f}" if first is last else f"{first['steps']:.0f}–{last['steps']:.0f}")
            parts.append(f"B = {span} tokens = {steps} optimizer steps of {format_tokens(r.batch_tokens)} tokens")
        else:
            parts.append(f"B = {span} tokens (steps unknown: the database holds no grid specification)")
        ratios = [b["per_param"] for b in r.budgets if b["per_param"]]
        if ratios:
            low, high = min(x[0] for x in ratios), max(x[1] for x in ratios)
            parts.append(f"{format_number(low, 2)}–{format_number(high, 2)} training tokens per parameter of the "
                         f"pruned models")
    if r.parent_per_param is not None:
        parts.append(f"parent: {format_tokens(r.parent_tokens)} tokens = {format_number(r.parent_per_param, 2)} per "
                     f"parameter (compute-optimal ≈ {COMPUTE_OPTIMAL})")
    if r.seq_len:
        sample = ("the whole validation split" if r.sample_sequences is None else
                  f"{r.sample_sequences:,} sequences × {r.seq_len} tokens = "
                  f"{format_tokens(r.sample_sequences * r.seq_len)} tokens")
        stderr = (f", {metric} stderr ≈ {format_number(r.stderr, 2)}" if r.stderr is not None
                  else f", no stderr recorded for {metric}")
        parts.append(f"held-out sample: {sample}{stderr}")
    return ("Regime: " + "; ".join(parts) + f"; margin ±{format_number(r.margin, 2)}.") if parts else ""

