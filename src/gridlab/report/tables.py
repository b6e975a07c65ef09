"""Analysis results → the tables and sentences the report lays out (plain dicts and lists; no statistics here)."""

from __future__ import annotations

import math
from collections import Counter

import polars as pl

from gridlab.report import stats
from gridlab.report.capacity import Capacity
from gridlab.report.scaling import Crossover

GRANULARITY_ORDER = {"depth": 0, "width": 1, "sparse": 2}
STATUSES = ("pending", "running", "done", "failed", "cancelled", "unknown")
SETTING_NAMES = {1: "Setting 1 — same budget", 2: "Setting 2 — whole-pipeline budget"}
SETTING_PHRASES = {1: "random init trains the same B tokens", 2: "random init also trains the parent's P tokens"}


def granularity_key(granularity: str) -> tuple:
    return GRANULARITY_ORDER.get(granularity, 9), granularity


def format_tokens(tokens: float | None) -> str:
    if tokens is None or (isinstance(tokens, float) and math.isnan(tokens)):
        return "–"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(tokens) >= size:
            return f"{tokens / size:.3g}{unit}"
    return f"{tokens:.3g}"


def format_signed(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}g}".replace("-", "−")


def format_number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}".replace("-", "−")


def _span(budgets: list) -> str:
    if len(budgets) == 1:
        return format_tokens(budgets[0])
    return f"{format_tokens(budgets[0])}–{format_tokens(budgets[-1])}"


POOL_PHRASES = {
    "model": "a mixed model of the per-seed differences per method, setting and budget (REML, Satterthwaite dof "
             "combined with the cell's own n − 1)",
    "none": "each cell's own paired t (n − 1 dof)",
}
CALLS = ("prune", "equivalent", "inconclusive", "scratch")  # the answer's words, in the order the report counts them


def inference_phrase(gaps: pl.DataFrame, pool: str) -> str:
    """How the intervals were made, in a few words: the pooling model, and Welch where seeds do not pair."""
    welch = "; Welch where the arms share no seed" if (gaps["test"] == "Welch").any() else ""
    return f"{POOL_PHRASES[pool]}{welch}"


# ---------------------------------------------------------------------------------------------------------------
# The answer: one square per granularity × ratio × setting × budget


def answer_squares(gaps: pl.DataFrame, margin: float) -> pl.DataFrame:
    """stats.answer_squares (the selection-adjusted call per square) in the report's granularity order."""
    squares = stats.answer_squares(gaps, margin)
    order = pl.col("granularity").replace_strict(GRANULARITY_ORDER, default=9, return_dtype=pl.Int64)
    return squares.sort([order, "granularity", "ratio", "setting", "budget_tokens"])


def _budget_pattern(part: pl.DataFrame) -> str:
    """'prune in every square at 10k–40k tokens; at 80k: 7 prune, 5 inconclusive' from the squares of a setting."""
    labels = []
    for (budget,), at in part.group_by("budget_tokens", maintain_order=True):
        counts = Counter(at["call"].to_list())
        if len(counts) == 1:
            labels.append((budget, f"{next(iter(counts))} in every square"))
        else:
            labels.append((budget, ", ".join(f"{counts[c]} {c}" for c in (*CALLS, stats.NO_INTERVAL) if counts[c])))
    runs: list[tuple[list, str]] = []
    for budget, label in labels:
        if runs and runs[-1][1] == label:
            runs[-1][0].append(budget)
        else:
            runs.append(([budget], label))
    phrases = []
    for budgets, label in runs:
        where = f"{_span(budgets)} tokens"
        phrases.append(f"{label} at {where}" if "every" in label else f"at {where}: {label}")
    return "; ".join(phrases)


def setting_sentence(squares: pl.DataFrame, setting: int, metric: str, higher_is_better: bool) -> str | None:
    part = squares.filter(pl.col("setting") == setting).sort("budget_tokens")
    if part.height == 0:
        return None
    counts = Counter(part["call"].to_list())
    total = part.height
    tally = ", ".join(f"{word} {counts[word]}" for word in CALLS)
    budgets = sorted(part["budget_tokens"].unique().to_list())
    first, last = (part.filter(pl.col("budget_tokens") == b)["gap"].mean() for b in (budgets[0], budgets[-1]))
    trend = (f"the best method's gap in {metric} averages {format_signed(first, 2)} at {format_tokens(budgets[0])} "
             f"and {format_signed(last, 2)} at {format_tokens(budgets[-1])} tokens"
             if len(budgets) > 1 else f"the best method's gap in {metric} averages {format_signed(first, 2)}")
    missing = counts[stats.NO_INTERVAL]
    caveat = f" ({missing} without an interval: one seed)" if missing else ""
    better = "positive" if higher_is_better else "negative"
    return (f"Setting {setting} ({SETTING_PHRASES.get(setting, f'setting {setting}')}): of {total} granularity × "
            f"ratio × budget squares{caveat}, {tally} — {_budget_pattern(part)}; {trend} ({better} = pruning "
            f"better).")


def capacity_sentence(capacity: Capacity) -> str:
    if not capacity.available:
        return f"Whether setting 2 can favour pruning at this scale is not known: {capacity.reason}."
    counts, total = capacity.counts, len(capacity.rows)
    p = format_tokens(capacity.parent_tokens)
    advantages = [row["advantage"] for row in capacity.rows]
    spread = f"{format_number(min(map(abs, advantages)), 2)}–{format_number(max(map(abs, advantages)), 2)}"
    metric = capacity.metric
    if counts["capacity-limited"] == total:
        return (f"At P = {p} tokens the parent is capacity-limited: it reaches a better {metric} than the small "
                f"architectures trained from scratch on the same P tokens in all {total} granularity × ratio pairs "
                f"(by {spread}), so setting 2 is a fair test of whether pruning keeps what the parent learned.")
    if counts["capacity-limited"] == 0:
        data = counts["data-limited"]
        how = (f"in all {total} granularity × ratio pairs" if data == total else
               f"in {data} of {total} granularity × ratio pairs, indistinguishable in {counts['indistinguishable']}")
        return (f"At P = {p} tokens the parent is data-limited: trained from scratch on the same P tokens, the small "
                f"architectures match or beat its {metric} {how} (differences {spread}), so setting 2 must favour "
                f"scratch at this scale whatever the method — read its verdicts as a property of this scale, not of "
                f"pruning.")
    return (f"At P = {p} tokens the parent is capacity-limited in {counts['capacity-limited']} of {total} "
            f"granularity × ratio pairs, data-limited in {counts['data-limited']} and indistinguishable in "
            f"{counts['indistinguishable']}: setting 2 can favour pruning only in the capacity-limited ones "
            f"(see “Is setting 2 meaningful here?”).")


CAPACITY_READING = {
    "capacity-limited": "the parent knows more than this architecture learns from P tokens: setting 2 can favour "
                        "pruning",
    "data-limited": "this architecture learns from P tokens at least what the parent knows: setting 2 must favour "
                    "scratch here",
    "indistinguishable": "no measurable capacity advantage at P tokens: setting 2 leans to scratch here",
}


def capacity_rows(capacity: Capacity) -> list[dict]:
    rows = sorted(capacity.rows, key=lambda r: (*granularity_key(r["granularity"]), r["ratio"]))
    return [dict(row, reading=CAPACITY_READING[row["regime"]]) for row in rows]


def crossover_summary(found: list[Crossover], setting: int, higher_is_better: bool) -> str | None:
    """One line per setting: how many groups cross inside the grid and where, how many by extrapolation (with the
    model and its horizon), and how many neither (counted, not listed)."""
    mine = [c for c in found if c.setting == setting]
    if not mine:
        return None
    total = len(mine)
    inside = [c for c in mine if c.kind == "interpolated"]
    text = f"Setting {setting}: {len(inside)} of {total} groups (method × ratio) change sign inside the grid"
    if inside:
        text += f" (at {_span(sorted(c.budget for c in inside))} tokens)"
    for model in ("power law", "linear gap in log tokens"):
        extrapolated = sorted((c for c in mine if c.kind == "extrapolated" and c.model == model),
                              key=lambda c: c.budget)
        if extrapolated:
            horizon = extrapolated[0].horizon
            largest = extrapolated[0].largest_budget
            verb = "reaches" if len(extrapolated) == 1 else "reach"
            text += (f"; {len(extrapolated)} {verb} 0 by extrapolation of the {model} within {horizon:g}× the "
                     f"largest budget {format_tokens(largest)} (at {_span([c.budget for c in extrapolated])} tokens)")
    rest = [c for c in mine if c.kind in ("none", "not-fitted")]
    if rest:
        reasons = Counter(_reason_class(c) for c in rest)
        text += (f"; {len(rest)} neither (" + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
                 + ")")
    return text + "."


def _reason_class(c: Crossover) -> str:
    if c.kind == "not-fitted":
        return "too few budgets or seeds to fit a trend"
    if c.model == "power law":
        return f"fitted power-law curves do not cross within {c.horizon:g}×"
    if "beyond" in c.reason:
        return f"trend reaches 0 only beyond {c.horizon:g}×"
    if "away" in c.reason:
        return "gap widens with the budget"
    return "no usable trend"


def crossover_text(c: Crossover) -> str:
    if c.kind == "interpolated":
        return (f"{c.direction} at {format_tokens(c.budget)} tokens, interpolated in log tokens between the measured "
                f"budgets {format_tokens(c.low)} and {format_tokens(c.high)}")
    if c.kind == "extrapolated" and c.model == "power law":
        return (f"extrapolation: {c.direction} at {format_tokens(c.budget)} tokens, from fitted L(D) = E + A·D^(−α) "
                f"per arm (95 % bootstrap interval {format_tokens(c.low)}–{format_tokens(c.high)}; "
                f"{c.fraction:.0%} of draws cross within {c.horizon:g}×)")
    if c.kind == "extrapolated":
        low = f"≤ {format_tokens(c.largest_budget)}" if c.open_low else format_tokens(c.low)
        high = f"> {format_tokens(c.horizon * c.largest_budget)}" if c.open_high else format_tokens(c.high)
        return (f"extrapolation: {c.direction} at ≈ {format_tokens(c.budget)} tokens "
                f"({c.budget / c.largest_budget:.1f}× the largest budget), from the gap's linear trend in log tokens "
                f"(95 % interval {low} – {high}; not extrapolated beyond {c.horizon:g}×)")
    return c.reason


def crossover_rows(found: list[Crossover]) -> list[dict]:
    """The groups that cross inside the grid or by extrapolation, for the table."""
    rows = [c for c in found if c.kind in ("interpolated", "extrapolated")]
    rows.sort(key=lambda c: (c.setting, *granularity_key(c.granularity), c.method, c.ratio))
    return [dict(granularity=c.granularity, method=c.method, ratio=c.ratio, setting=c.setting, kind=c.kind,
                 model=c.model, budget=c.budget, text=crossover_text(c)) for c in rows]


# ---------------------------------------------------------------------------------------------------------------
# Detail tables


def recommendation_rows(gaps: pl.DataFrame, setting: int) -> tuple[list[int], list[dict]]:
    """Budgets (columns) and rows granularity × method × ratio, each with one entry per budget (None if absent)."""
    table = gaps.filter(pl.col("setting") == setting)
    budgets = sorted(table["budget_tokens"].unique().to_list())
    rows = []
    for (granularity, method, ratio), group in sorted(
        table.group_by(["granularity", "method", "ratio"]),
        key=lambda item: (*granularity_key(item[0][0]), item[0][1], item[0][2]),
    ):
        by_budget = {row["budget_tokens"]: row for row in group.iter_rows(named=True)}
        rows.append(dict(granularity=granularity, method=method, ratio=ratio,
                         entries=[by_budget.get(b) for b in budgets]))
    return budgets, rows


def square_rows(squares: pl.DataFrame, setting: int) -> tuple[list[int], list[dict]]:
    """The answer's squares of one setting as a table: rows granularity × ratio, one entry per budget."""
    part = squares.filter(pl.col("setting") == setting)
    budgets = sorted(part["budget_tokens"].unique().to_list())
    rows = []
    for (granularity, ratio), group in part.group_by(["granularity", "ratio"], maintain_order=True):
        by_budget = {row["budget_tokens"]: row for row in group.iter_rows(named=True)}
        rows.append(dict(granularity=granularity, ratio=ratio, entries=[by_budget.get(b) for b in budgets]))
    return budgets, rows


WITHOUT_INTERVAL = "of them without an interval"  # the inconclusive cells that rest on one seed


def verdict_counts(gaps: pl.DataFrame) -> dict[int, dict[str, int]]:
    """Per setting, how many method × ratio × budget cells have each verdict (stats.VERDICTS), and how many of the
    inconclusive ones have no interval (one seed) under WITHOUT_INTERVAL."""
    out: dict[int, dict[str, int]] = {}
    for (setting,), part in sorted(gaps.group_by("setting"), key=lambda item: item[0]):
        counts = Counter(part["verdict"].to_list())
        out[setting] = {word: counts[word] for word in ("prune", "scratch", "equivalent", "inconclusive")}
        missing = int(part["half"].null_count())
        if missing:
            out[setting][WITHOUT_INTERVAL] = missing
    return out


def sensitivity(gaps: pl.DataFrame) -> dict[int, dict[str, int]]:
    """Per setting: how many verdicts the cells' own paired t intervals (the sensitivity check) would change, of how
    many compared, and how many cells each way."""
    out: dict[int, dict[str, int]] = {}
    for (setting,), part in sorted(gaps.group_by("setting"), key=lambda item: item[0]):
        compared = part.filter(pl.col("test") == "paired")
        changed = compared.filter(pl.col("verdict") != pl.col("cell_verdict"))
        decided = ("prune", "scratch", "equivalent")
        out[setting] = dict(
            total=compared.height, changed=changed.height,
            only_model=changed.filter(pl.col("verdict").is_in(decided)).height,
            only_cell=changed.filter(pl.col("cell_verdict").is_in(decided)).height,
        )
    return out


def model_rows(gaps: pl.DataFrame) -> list[dict]:
    """The variance model per family and budget, for the Methods section: how the intervals were made there, the
    seeds, the seed effect shared by the budget's ratios and the cell effect (sd), the between-seed sd of one
    difference and the range of dof and of seeds needed at the margin."""
    if gaps.height == 0:
        return []
    rows = (
        gaps.group_by(["granularity", "method", "setting", "budget_tokens"])
        .agg(model=pl.col("model").mode().first(), seeds=pl.col("n_seeds").max(), sd_seed=pl.col("sd_seed").first(),
             sd_cell=pl.col("sd_cell").first(), sd_between=pl.col("sd_between_seeds").median(),
             dof_low=pl.col("dof").min(), dof_high=pl.col("dof").max(),
             needed=pl.col("seeds_needed").median())
        .to_dicts()
    )
    return sorted(rows, key=lambda r: (r["setting"], *granularity_key(r["granularity"]), r["method"],
                                       r["budget_tokens"]))


VERDICT_COLUMNS = ["setting", "method", "granularity", "ratio", "budget_tokens", "n_seeds", "gap", "lo95", "hi95",
                   "verdict", "d_eff_tokens"]


def verdict_table(gaps: pl.DataFrame, transfer: pl.DataFrame | None = None) -> pl.DataFrame:
    """verdicts.csv: one row per cell (VERDICT_COLUMNS). lo95/hi95: the 95 % interval of the gap (empty without
    one); d_eff_tokens: the effective data transferred at B (tokens of scratch training the pruned start is worth),
    from the gaps' own column `d_eff_tokens` or a `transfer` frame keyed by the cell's keys; empty where none."""
    schema = {"setting": pl.Int64, "method": pl.Utf8, "granularity": pl.Utf8, "ratio": pl.Float64,
              "budget_tokens": pl.Int64, "n_seeds": pl.Int64, "gap": pl.Float64, "lo95": pl.Float64,
              "hi95": pl.Float64, "verdict": pl.Utf8, "d_eff_tokens": pl.Float64}
    if gaps.height == 0:
        return pl.DataFrame(schema=schema)
    table = gaps.with_columns(lo95=pl.col("gap") - pl.col("half"), hi95=pl.col("gap") + pl.col("half"))
    keys = ["granularity", "method", "ratio", "setting", "budget_tokens"]
    if "d_eff_tokens" not in table.columns:
        if transfer is not None and "d_eff_tokens" in transfer.columns and set(keys) <= set(transfer.columns):
            table = table.join(transfer.select(*keys, "d_eff_tokens").unique(keys), on=keys, how="left")
        else:
            table = table.with_columns(d_eff_tokens=pl.lit(None, dtype=pl.Float64))
    order = pl.col("granularity").replace_strict(GRANULARITY_ORDER, default=9, return_dtype=pl.Int64)
    return table.sort(["setting", order, "granularity", "method", "ratio", "budget_tokens"]).select(
        VERDICT_COLUMNS).cast(schema)


def arm_rows(summary: pl.DataFrame) -> tuple[list[int], list[dict]]:
    """Seed statistics pivoted: rows granularity × method × ratio × arm, one entry per budget (None if absent).

    Arms: pruned init (one training run, listed once), random init in setting 1, random init in setting 2. Budget 0
    is the reference points (pruned: right after pruning; random: at init, or in setting 2 after P tokens).
    """
    arms = summary.with_columns(
        arm=pl.when(pl.col("init") == "pruned").then(pl.lit("pruned"))
        .otherwise(pl.format("random, setting {}", pl.col("setting")))
    ).unique(["granularity", "method", "ratio", "arm", "budget_tokens"], keep="first", maintain_order=True)
    budgets = sorted(arms["budget_tokens"].unique().to_list())
    rows = []
    for (granularity, method, ratio, arm), group in sorted(
        arms.group_by(["granularity", "method", "ratio", "arm"]),
        key=lambda item: (*granularity_key(item[0][0]), *item[0][1:]),
    ):
        by_budget = {row["budget_tokens"]: row for row in group.iter_rows(named=True)}
        rows.append(dict(granularity=granularity, method=method, ratio=ratio, arm=arm,
                         entries=[by_budget.get(b) for b in budgets]))
    return budgets, rows


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
    keys = ["granularity", "method", "ratio", "init", "setting", "reason"]
    grouped = (
        without.group_by(keys)
        .agg(
            cells=pl.len(),
            budgets=pl.col("budget_tokens").unique().sort(),
            seeds=pl.col("seed").unique().sort(),
            errors=pl.col("error").drop_nulls().unique().sort().head(3),
        )
        .sort(keys, nulls_last=True)
    )
    return grouped.to_dicts()


def grid_dimensions(cells: pl.DataFrame) -> dict:
    """What the grid asks for, from its cells: methods per granularity, ratios, budgets, seeds, settings, and whether
    it has budget-0 reference points."""
    pruned = cells.filter(pl.col("init") == "pruned")
    methods = (
        pruned.select(["granularity", "method"]).unique().sort(["granularity", "method"]).group_by(
            "granularity", maintain_order=True).agg(pl.col("method")).iter_rows()
    )
    budgets = sorted(cells["budget_tokens"].drop_nulls().unique().to_list())
    return dict(
        methods=sorted(((g, m) for g, m in methods), key=lambda item: granularity_key(item[0])),
        ratios=sorted(cells["ratio"].drop_nulls().unique().to_list()),
        budgets=[b for b in budgets if b > 0],
        references=0 in budgets,
        seeds=sorted(cells["seed"].drop_nulls().unique().to_list()),
        settings=sorted(cells["setting"].drop_nulls().unique().to_list()),
    )
