"""Analysis results → the tables and sentences the report lays out (plain dicts and lists; no statistics here)."""

from __future__ import annotations

import math
from collections import Counter

import polars as pl

from gridlab.report.capacity import Capacity
from gridlab.report.scaling import Crossover

GRANULARITY_ORDER = {"depth": 0, "width": 1, "sparse": 2}
STATUSES = ("pending", "running", "done", "failed", "cancelled", "unknown")
SETTING_NAMES = {1: "Setting 1 — same budget", 2: "Setting 2 — whole-pipeline budget"}
SETTING_PHRASES = {1: "random init trains the same B tokens", 2: "random init also trains the parent's P tokens"}
SQUARE_KEYS = ["granularity", "ratio", "setting", "budget_tokens"]


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


POOL_PHRASES = {"none": "each pair on its own", "seeds": "spread pooled over the ratios and budgets of each method "
                "and setting", "ratios": "gap linear in the ratio, spread pooled over each method and setting"}


def inference_phrase(gaps: pl.DataFrame, pool: str) -> str:
    """How the intervals were made, in a few words: the test(s) used and the pooling model."""
    tests = set(gaps["test"].to_list())
    test = ("paired by seed" if tests == {"paired"} else "Welch (seeds do not pair)" if tests == {"Welch"}
            else "paired where seeds match, else Welch")
    return f"{test}; {POOL_PHRASES[pool]}"


# ---------------------------------------------------------------------------------------------------------------
# The answer: one square per granularity × ratio × setting × budget


def answer_squares(gaps: pl.DataFrame) -> pl.DataFrame:
    """Per granularity × ratio × setting × budget the call the reader wants: the granularity's best method (largest
    benefit) stands for pruning — *prune* if its verdict is prune, *scratch* if every method's verdict is scratch,
    *tie* otherwise; `single_seed` when a verdict used rests on one seed (no interval). Columns: the keys, call,
    single_seed, method (the best), gap, half, test, methods (how many were compared)."""
    schema = {"granularity": pl.Utf8, "ratio": pl.Float64, "setting": pl.Int64, "budget_tokens": pl.Int64,
              "call": pl.Utf8, "single_seed": pl.Boolean, "method": pl.Utf8, "gap": pl.Float64,
              "half": pl.Float64, "test": pl.Utf8, "methods": pl.UInt32, "verdict": pl.Utf8}
    if gaps.height == 0:
        return pl.DataFrame(schema=schema)
    squares = (
        gaps.sort("benefit", descending=True)
        .group_by(SQUARE_KEYS, maintain_order=True)
        .agg(method=pl.col("method").first(), gap=pl.col("gap").first(), half=pl.col("half").first(),
             test=pl.col("test").first(), verdict=pl.col("verdict").first(), methods=pl.len(),
             all_scratch=pl.col("verdict").str.starts_with("scratch").all(),
             any_single=pl.col("verdict").str.ends_with("(n=1)").any())
        .with_columns(call=pl.when(pl.col("verdict").str.starts_with("prune")).then(pl.lit("prune"))
                      .when(pl.col("all_scratch")).then(pl.lit("scratch")).otherwise(pl.lit("tie")),
                      single_seed=pl.col("any_single"))
    )
    order = pl.col("granularity").replace_strict(GRANULARITY_ORDER, default=9, return_dtype=pl.Int64)
    return squares.sort([order, "granularity", "ratio", "setting", "budget_tokens"]).select(list(schema)).cast(schema)


def _budget_pattern(part: pl.DataFrame) -> str:
    """'prune in every square at 10k–40k tokens; at 80k: 7 prune, 5 tie' from the squares of one setting."""
    labels = []
    for (budget,), at in part.group_by("budget_tokens", maintain_order=True):
        counts = Counter(at["call"].to_list())
        if len(counts) == 1:
            labels.append((budget, f"{next(iter(counts))} in every square"))
        else:
            labels.append((budget, ", ".join(f"{counts[c]} {c}" for c in ("prune", "tie", "scratch") if counts[c])))
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
    tally = ", ".join(f"{word} {counts[word]}" for word in ("prune", "tie", "scratch"))
    budgets = sorted(part["budget_tokens"].unique().to_list())
    first, last = (part.filter(pl.col("budget_tokens") == b)["gap"].mean() for b in (budgets[0], budgets[-1]))
    trend = (f"the best method's gap in {metric} averages {format_signed(first, 2)} at {format_tokens(budgets[0])} "
             f"and {format_signed(last, 2)} at {format_tokens(budgets[-1])} tokens"
             if len(budgets) > 1 else f"the best method's gap in {metric} averages {format_signed(first, 2)}")
    single = int(part["single_seed"].sum())
    caveat = f" ({single} rest on a single seed)" if single else ""
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


def verdict_counts(gaps: pl.DataFrame) -> dict[int, dict[str, int]]:
    """Per setting, how many method × ratio × budget groups have each verdict word (n=1 ones counted apart)."""
    out: dict[int, dict[str, int]] = {}
    for (setting,), part in sorted(gaps.group_by("setting"), key=lambda item: item[0]):
        counts = Counter(part["verdict"].to_list())
        out[setting] = {word: counts[word] for word in ("prune", "tie", "scratch")}
        single = {f"{word} (n=1)": counts[f"{word} (n=1)"] for word in ("prune", "tie", "scratch")}
        out[setting].update({k: v for k, v in single.items() if v})
    return out


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
