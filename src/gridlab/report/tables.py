"""Analysis results → the tables and sentences the report lays out (plain dicts and lists; no statistics here)."""

from __future__ import annotations

import math
from collections import Counter

import polars as pl

from gridlab.report import stats
from gridlab.report.control import share_text
from gridlab.report.recipes import ARM_ORDER, Selection
from gridlab.report.scaling import Crossover
from gridlab.report.transfer import COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER, Transfer

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


def setting_sentence(squares: pl.DataFrame, setting: int, metric: str, higher_is_better: bool,
                     control: str | None = None) -> str | None:
    """The answer's sentence for one setting: the squares' calls, where they fall and the best method's gap at the
    smallest and largest budget; ``control``: the embeddings control's clause (control_clause), appended."""
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
            f"better){'; ' + control if control else ''}.")


# ---------------------------------------------------------------------------------------------------------------
# The embeddings control (control.py) and each arm's learning rate (recipes.py)


def control_clause(pooled: pl.DataFrame, setting: int) -> str | None:
    """'of the pruned arm's advantage over scratch, the inherited embeddings alone carry 62 % [48 %, 75 %] at 10k
    and 31 % [12 %, 50 %] at 80k tokens (the embeddings control, pooled over 24 groups)': the pooled share at the
    smallest and largest budget where the pruned arm has an advantage to share."""
    part = pooled.filter((pl.col("setting") == setting) & (pl.col("advantage") > 0)).sort("budget_tokens")
    if part.height == 0:
        return None
    ends = part.row(0, named=True), part.row(part.height - 1, named=True)
    quoted = [f"{share_text(e['share'], e['share_low'], e['share_high'], e['share_bounded'])} at "
              f"{format_tokens(e['budget_tokens'])}" for e in (ends if part.height > 1 else ends[:1])]
    groups = max(part["groups"].to_list())
    return (f"of the pruned arm's advantage over scratch, the inherited embeddings alone carry "
            f"{' and '.join(quoted)} tokens (the embeddings control, pooled over {groups} group"
            f"{'s' if groups != 1 else ''})")


def control_rows(random_gaps: pl.DataFrame, embeddings_gaps: pl.DataFrame, shares: pl.DataFrame,
                 setting: int) -> tuple[list[int], list[dict]]:
    """The embeddings control as a table: rows granularity × method × ratio, one entry per budget with the pruned −
    embeddings gap (``e``), the pruned − random gap (``r``) and the share (``share``, its text) — None if absent."""
    keys = ["granularity", "method", "ratio", "budget_tokens"]
    part = embeddings_gaps.filter(pl.col("setting") == setting)
    budgets = sorted(part["budget_tokens"].unique().to_list())
    random = {tuple(r[k] for k in keys): r for r in random_gaps.filter(pl.col("setting") == setting).iter_rows(
        named=True)}
    share = {tuple(r[k] for k in keys): r for r in shares.filter(pl.col("setting") == setting).iter_rows(named=True)}
    rows = []
    for (granularity, method, ratio), group in sorted(
        part.group_by(["granularity", "method", "ratio"]),
        key=lambda item: (*granularity_key(item[0][0]), item[0][1], item[0][2]),
    ):
        by_budget = {}
        for row in group.iter_rows(named=True):
            key = (granularity, method, ratio, row["budget_tokens"])
            found = share.get(key)
            text = share_text(found["share"], found["share_low"], found["share_high"], found["share_bounded"]) \
                if found else "–"
            by_budget[row["budget_tokens"]] = dict(e=row, r=random.get(key), share=text)
        rows.append(dict(granularity=granularity, method=method, ratio=ratio,
                         entries=[by_budget.get(b) for b in budgets]))
    return budgets, rows


def arm_label(init: str, setting: int) -> str:
    """An arm as the tables name it: pruned and the embeddings control train B in either setting (one run, listed
    once), random init per setting."""
    return {"pruned": "pruned", "embeddings": "embeddings control"}.get(init, f"{init}, setting {setting}")


def selection_rows(selection: Selection | None) -> tuple[list[int], list[dict]]:
    """Each arm's chosen lr when the grid swept: rows granularity × method × ratio × arm, one entry per budget
    (lr, lrs, edge) — None if absent; empty without a sweep."""
    if selection is None or not selection.swept:
        return [], []
    chosen = selection.chosen.filter(pl.col("budget_tokens") > 0).sort("setting")
    # pruned and embeddings train B in either setting: one row each (their first setting's), random one per setting
    chosen = chosen.with_columns(row_setting=pl.when(pl.col("init") == "random").then(pl.col("setting"))
                                 .otherwise(pl.lit(0)))
    chosen = chosen.unique(["granularity", "method", "ratio", "init", "row_setting", "budget_tokens"], keep="first",
                           maintain_order=True)
    budgets = sorted(chosen["budget_tokens"].unique().to_list())
    rows = []
    for (granularity, method, ratio, init, setting), group in sorted(
        chosen.group_by(["granularity", "method", "ratio", "init", "row_setting"]),
        key=lambda item: (*granularity_key(item[0][0]), item[0][1], item[0][2], ARM_ORDER.get(item[0][3], 9),
                          item[0][4]),
    ):
        by_budget = {row["budget_tokens"]: row for row in group.iter_rows(named=True)}
        rows.append(dict(granularity=granularity, method=method, ratio=ratio, arm=arm_label(init, setting),
                         entries=[by_budget.get(b) for b in budgets]))
    return budgets, rows


COMPARISON_COLUMNS = ["lr_pruned", "lr_random", "lr_embeddings", "gap_embeddings", "lo95_embeddings",
                      "hi95_embeddings", "verdict_embeddings", "embeddings_share", "embeddings_share_low",
                      "embeddings_share_high"]


def comparisons(selection: Selection | None, control) -> pl.DataFrame | None:
    """Per cell (PAIR_KEYS): each arm's lr (the chosen one under a sweep, else the arm's only one) and, with the
    embeddings control, the pruned − embeddings gap, its 95 % interval and verdict, and the embeddings' share of the
    pruned arm's advantage with its Fieller interval: the columns verdicts.csv adds (COMPARISON_COLUMNS)."""
    if selection is None:
        return None
    lrs = selection.lr_of()
    frame = None
    for arm in ("pruned", "random", "embeddings"):
        part = lrs.filter(pl.col("init") == arm).drop("init").rename({"lr": f"lr_{arm}"})
        frame = part if frame is None else frame.join(part, on=stats.PAIR_KEYS, how="full", coalesce=True)
    if control is not None:
        gaps = control.gaps.select(*stats.PAIR_KEYS, gap_embeddings="gap",
                                   lo95_embeddings=pl.col("gap") - pl.col("half"),
                                   hi95_embeddings=pl.col("gap") + pl.col("half"), verdict_embeddings="verdict")
        shares = control.shares.select(*stats.PAIR_KEYS, embeddings_share="share",
                                       embeddings_share_low="share_low", embeddings_share_high="share_high")
        frame = frame.join(gaps, on=stats.PAIR_KEYS, how="left").join(shares, on=stats.PAIR_KEYS, how="left")
    return frame


# ---------------------------------------------------------------------------------------------------------------
# Crossovers and the hold-out check (scaling.py)


def crossover_summary(found: list[Crossover], setting: int) -> str | None:
    """One line per setting: the models chosen, how many groups cross inside the grid between significant verdicts,
    how many change sign without a resolved crossing, how many reach 0 by extrapolation, and how many neither."""
    mine = [c for c in found if c.setting == setting]
    if not mine:
        return None
    total = len(mine)
    models = Counter(c.model or "none passed" for c in mine if c.fitted)
    chosen = ", ".join(f"{name} {models[name]}" for name in (*MODEL_ORDER, "none passed") if models[name])
    text = f"Setting {setting}: {total} group{'s' if total != 1 else ''} (method × ratio)"
    if chosen:
        text += f"; gap models chosen by lack of fit: {chosen}"
    inside = [c for c in mine if c.kind == "interpolated"]
    text += f"; {len(inside)} cross inside the grid between significant verdicts"
    if inside:
        text += f" (at {_span(sorted(c.budget for c in inside))} tokens)"
    unresolved = [c for c in mine if c.kind == "unresolved"]
    if unresolved:
        text += f"; {len(unresolved)} change sign inside the grid without a resolved crossing (ranges below)"
    extrapolated = sorted((c for c in mine if c.kind == "extrapolated"), key=lambda c: c.budget)
    if extrapolated:
        verb = "reaches" if len(extrapolated) == 1 else "reach"
        text += (f"; {len(extrapolated)} {verb} 0 by extrapolation within {extrapolated[0].horizon:g}× the largest "
                 f"budget {format_tokens(extrapolated[0].largest_budget)} (at "
                 f"{_span([c.budget for c in extrapolated])} tokens)")
    rest = [c for c in mine if c.kind in ("none", "not-fitted")]
    if rest:
        reasons = Counter(_reason_class(c) for c in rest)
        text += (f"; {len(rest)} neither (" + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
                 + ")")
    return text + "."


MODEL_ORDER = ("power", "linear in log B", "constant")


def _reason_class(c: Crossover) -> str:
    if c.kind == "not-fitted":
        return "too few seeds or budgets to fit and check a model"
    if "lack-of-fit" in c.reason:
        return "no model passed its lack-of-fit test"
    if "cannot be checked" in c.reason:
        return "too few budgets to extrapolate"
    if "hold-out check could not" in c.reason:
        return "trend reaches 0 but the hold-out check could not be made"
    if "hold-out" in c.reason:
        return "trend reaches 0 but its model failed the hold-out check"
    if "not resolved" in c.reason:
        return f"trend reaches 0 within {c.horizon:g}× but not significantly"
    return f"trend does not reach 0 within {c.horizon:g}×"


def crossover_text(c: Crossover) -> str:
    if c.kind == "interpolated":
        return (f"{c.direction} between {format_tokens(c.low)} and {format_tokens(c.high)} (significant verdicts on "
                f"both sides), at ≈ {format_tokens(c.budget)} where the mean gap changes sign (linear in log tokens)")
    if c.kind == "unresolved":
        high = format_tokens(c.high) if c.high is not None else "beyond the largest budget"
        near = f" (≈ {format_tokens(c.budget)}, linear in log tokens)" if c.budget is not None else ""
        return (f"the mean gap changes sign{near}, not resolved ({c.reason}): the crossover lies anywhere from "
                f"{format_tokens(c.low)} to {high}")
    if c.kind == "extrapolated":
        low = f"≤ {format_tokens(c.largest_budget)}" if c.open_low else format_tokens(c.low)
        high = f"> {format_tokens(c.horizon * c.largest_budget)}" if c.open_high else format_tokens(c.high)
        return (f"extrapolation: {c.direction} at ≈ {format_tokens(c.budget)} tokens "
                f"({c.budget / c.largest_budget:.1f}× the largest budget), from the {c.model} model (lack-of-fit "
                f"p = {c.lof_p:.2f}; it predicted the held-out largest budget); every model that fits has its "
                f"90 % band across 0 by {c.horizon:g}×; the chosen model's band contains 0 from {low} to {high}")
    return c.reason


def crossover_rows(found: list[Crossover]) -> list[dict]:
    """The groups that cross inside the grid, change sign without a resolved crossing, or cross by extrapolation."""
    rows = [c for c in found if c.kind in ("interpolated", "unresolved", "extrapolated")]
    rows.sort(key=lambda c: (c.setting, *granularity_key(c.granularity), c.method, c.ratio))
    return [dict(granularity=c.granularity, method=c.method, ratio=c.ratio, setting=c.setting, kind=c.kind,
                 model=c.model, budget=c.budget, text=crossover_text(c)) for c in rows]


def holdout_sentence(holdout: dict[int, dict]) -> str:
    """How many measured gaps at the largest budget fell in the 90 % prediction intervals of models fitted without it,
    per setting."""
    budgets = sorted({b for entry in holdout.values() for b in entry["budgets"]})
    if not budgets:
        return ("Hold-out check: not possible here (it needs at least 3 budgets, 2 seeds with both arms at each, and a "
                "model that passes its lack-of-fit test without the largest budget).")
    parts = []
    for setting, entry in sorted(holdout.items()):
        part = f"setting {setting}: {entry['covered']} of {entry['checked']}"
        if entry["groups"] > entry["checked"]:
            part += f" ({entry['groups'] - entry['checked']} more could not be checked)"
        parts.append(part)
    where = _span(budgets) if len(budgets) > 1 else format_tokens(budgets[0])
    return (f"Hold-out check: fitted without the largest budget ({where} tokens), the models' 90 % prediction "
            f"intervals held the measured seed-mean gap there in {'; '.join(parts)} groups (a group cannot be checked "
            f"when no model passes its lack-of-fit test on the reduced grid).")


# ---------------------------------------------------------------------------------------------------------------
# Effective data transferred and setting 2 (transfer.py)


def deff_text(entry: dict | None) -> str:
    """D_eff of one group and budget: '+40k [25k, 60k]', '> 230k', '< −5k', '–' (unknown)."""
    if entry is None or entry.get("d_eff_tokens") is None:
        return "–"
    value = entry["d_eff_tokens"]
    if entry["d_eff_bound"]:
        return f"{entry['d_eff_bound']} {_signed_tokens(value)}"
    text = _signed_tokens(value)
    if entry.get("d_eff_low") is not None:
        low = ("≤ " if entry["open_low"] else "") + _signed_tokens(entry["d_eff_low"])
        high = ("≥ " if entry["open_high"] else "") + _signed_tokens(entry["d_eff_high"])
        text += f" [{low}, {high}]"
    return text


def _signed_tokens(tokens: float) -> str:
    tokens = round(tokens)  # whole tokens: an interval clipped at the curve's first point can end at 0 ± rounding
    return "0" if tokens == 0 else ("−" if tokens < 0 else "+") + format_tokens(abs(tokens))


def transfer_rows(transfer: Transfer) -> tuple[list[int], list[dict]]:
    """D_eff as a table: rows granularity × method × ratio, one entry per budget (None if absent), with the
    random arm's slope around P."""
    frame = transfer.frame
    if frame.height == 0:
        return [], []
    first = frame.filter(pl.col("setting") == frame["setting"].min())
    budgets = sorted(first["budget_tokens"].unique().to_list())
    slopes = {(r["granularity"], r["method"], r["ratio"]): r for r in transfer.slopes.iter_rows(named=True)}
    rows = []
    for (granularity, method, ratio), group in sorted(
        first.group_by(["granularity", "method", "ratio"]),
        key=lambda item: (*granularity_key(item[0][0]), item[0][1], item[0][2]),
    ):
        by_budget = {row["budget_tokens"]: dict(row, text=deff_text(row)) for row in group.iter_rows(named=True)}
        rows.append(dict(granularity=granularity, method=method, ratio=ratio,
                         entries=[by_budget.get(b) for b in budgets], slope=slopes.get((granularity, method, ratio))))
    return budgets, rows


def setting2_text(entry: dict | None, parent_tokens: float | None) -> str:
    """D_eff against P for one group and budget: '0.27 P [0.2, 0.35] → scratch'."""
    if entry is None or entry.get("d_eff_tokens") is None or not parent_tokens:
        return "–"
    p = float(parent_tokens)
    def share(tokens: float) -> str:
        return format_number(round(tokens) / p, 2)

    text = f"{entry['d_eff_bound']} " if entry["d_eff_bound"] else ""
    text += f"{share(entry['d_eff_tokens'])} P"
    if entry.get("d_eff_low") is not None:
        low = ("≤ " if entry["open_low"] else "") + share(entry["d_eff_low"])
        high = ("≥ " if entry["open_high"] else "") + share(entry["d_eff_high"])
        text += f" [{low}, {high}]"
    return f"{text} → {entry['setting2']}"


def slope_text(slope: dict | None) -> str:
    """The random arm's change per doubling of tokens around P: '−0.12 ± 0.03 (n=2, 150k–230k)'."""
    if slope is None:
        return "–"
    text = format_signed(slope["slope"], 2)
    if slope["half"] is not None and not math.isnan(slope["half"]):
        text += f" ± {format_number(slope['half'], 2)}"
    return (f"{text} (n={slope['n']}, {format_tokens(slope['low_tokens'])}–{format_tokens(slope['high_tokens'])} "
            f"tokens)")


def parent_regime(transfer: Transfer) -> str:
    """The parent's tokens per parameter against the compute-optimal ≈ 20, in words."""
    ratio = transfer.tokens_per_parameter
    optimal = COMPUTE_OPTIMAL_TOKENS_PER_PARAMETER
    if ratio is None:
        missing = "P" if not transfer.parent_tokens else "its parameter count"
        return (f"the parent's tokens per parameter are unknown ({missing} is not in the database; ingest it again "
                f"with this gridlab)")
    where = ("far below the compute-optimal ≈ 20 (Hoffmann et al. 2022): undertrained for its size"
             if ratio < optimal / 4 else
             "far beyond the compute-optimal ≈ 20 (Hoffmann et al. 2022): trained long past it"
             if ratio > optimal * 4 else "near the compute-optimal ≈ 20 (Hoffmann et al. 2022)")
    return (f"the parent saw {format_number(ratio, 3)} tokens per parameter (P = "
            f"{format_tokens(transfer.parent_tokens)}, {format_tokens(transfer.parent_params)} parameters), {where}")


def setting2_sentence(transfer: Transfer, short: bool = False) -> str:
    """Setting 2 judged by what it needs: how many group × budget pairs have D_eff > P, < P, undecided. ``short``: the
    answer's one sentence (the counts and D_eff's span in units of P); the section's adds the parent's tokens per
    parameter and the random arm's slope around P."""
    if not transfer.available:
        return f"Whether setting 2 can favour pruning here is not known: {transfer.reason}."
    frame = transfer.frame
    part = frame.filter(pl.col("setting") == frame["setting"].min())
    p = transfer.parent_tokens
    if not p:
        return ("Setting 2 favours pruning exactly when the pruned start is worth more scratch tokens than the parent "
                "cost (D_eff > P), but P is not in the database.")
    counts = Counter(part["setting2"].to_list())
    total = part.height
    known = part.filter(pl.col("d_eff_tokens").is_not_null())
    spread = ""
    if known.height:
        low, high = known["d_eff_tokens"].min(), known["d_eff_tokens"].max()
        spread = (f"; D_eff spans {_signed_tokens(low)} to {_signed_tokens(high)} tokens "
                  f"({format_number(low / p, 2)}–{format_number(high / p, 2)} P)")
    slope = ""
    if transfer.slopes.height:
        low, high = format_signed(transfer.slopes["slope"].min(), 2), format_signed(transfer.slopes["slope"].max(), 2)
        span = low if low == high else f"{low} to {high}"
        slope = f"; around P the random arm still changes by {span} per doubling of its tokens"
    if short:
        span = (f" (D_eff {format_number(known['d_eff_tokens'].min() / p, 2)}–"
                f"{format_number(known['d_eff_tokens'].max() / p, 2)} P)") if known.height else ""
        return (f"Setting 2 favours pruning exactly when the pruned start is worth more than the parent's "
                f"P = {format_tokens(p)} tokens, D_eff(B) > P: yes in {counts['prune']} of {total} group × budget "
                f"pairs, no in {counts['scratch']}, undecided in {counts['undecided'] + counts['unknown']}{span}.")
    return (f"Setting 2 (scratch also trains the parent's P = {format_tokens(p)} tokens) favours pruning exactly when "
            f"the pruned start is worth more scratch tokens than P, D_eff(B) > P: of {total} group × budget pairs, "
            f"{counts['prune']} yes, {counts['scratch']} no, {counts['undecided'] + counts['unknown']} undecided"
            f"{spread}; {parent_regime(transfer)}{slope}.")


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
                   "verdict", "d_eff_tokens", "d_eff_low", "d_eff_high", "d_eff_bound", *COMPARISON_COLUMNS]
_COMPARISON_SCHEMA = {**{c: pl.Float64 for c in COMPARISON_COLUMNS}, "verdict_embeddings": pl.Utf8}
_D_EFF = ("d_eff_tokens", "d_eff_low", "d_eff_high", "d_eff_bound")


def verdict_table(gaps: pl.DataFrame, transfer: pl.DataFrame | None = None,
                  comparisons: pl.DataFrame | None = None) -> pl.DataFrame:
    """verdicts.csv: one row per cell (VERDICT_COLUMNS). lo95/hi95: the 95 % interval of the gap (empty without
    one); d_eff_tokens: the effective data transferred at B (tokens of scratch training the pruned start is worth),
    d_eff_low/high its 95 % interval, d_eff_bound "" for a value, ">" or "<" where d_eff_tokens is only a bound (the
    pruned loss lies beyond the random arm's measured curve) — from a `transfer` frame keyed by the cell's keys (or
    the gaps' own columns); empty where none. `comparisons` (tables.comparisons): each arm's lr and the embeddings
    control's comparison (COMPARISON_COLUMNS); empty where the grid has no such arm."""
    schema = {"setting": pl.Int64, "method": pl.Utf8, "granularity": pl.Utf8, "ratio": pl.Float64,
              "budget_tokens": pl.Int64, "n_seeds": pl.Int64, "gap": pl.Float64, "lo95": pl.Float64,
              "hi95": pl.Float64, "verdict": pl.Utf8, "d_eff_tokens": pl.Float64, "d_eff_low": pl.Float64,
              "d_eff_high": pl.Float64, "d_eff_bound": pl.Utf8, **_COMPARISON_SCHEMA}
    if gaps.height == 0:
        return pl.DataFrame(schema=schema)
    table = gaps.with_columns(lo95=pl.col("gap") - pl.col("half"), hi95=pl.col("gap") + pl.col("half"))
    keys = ["granularity", "method", "ratio", "setting", "budget_tokens"]
    if "d_eff_tokens" not in table.columns and transfer is not None and set(keys) <= set(transfer.columns):
        present = [c for c in _D_EFF if c in transfer.columns]
        table = table.join(transfer.select(*keys, *present).unique(keys), on=keys, how="left")
    if comparisons is not None:
        table = table.join(comparisons, on=keys, how="left")
    table = table.with_columns(pl.lit(None, dtype=schema[c]).alias(c) for c in (*_D_EFF, *COMPARISON_COLUMNS)
                               if c not in table.columns)
    order = pl.col("granularity").replace_strict(GRANULARITY_ORDER, default=9, return_dtype=pl.Int64)
    return table.sort(["setting", order, "granularity", "method", "ratio", "budget_tokens"]).select(
        VERDICT_COLUMNS).cast(schema)


def arm_rows(summary: pl.DataFrame) -> tuple[list[int], list[dict]]:
    """Seed statistics pivoted: rows granularity × method × ratio × arm, one entry per budget (None if absent).

    Arms: pruned init (one training run, listed once), random init in setting 1, random init in setting 2, and the
    embeddings control (one run, listed once). Budget 0 is the reference points (pruned: right after pruning; random
    and embeddings: at init, random in setting 2 after P tokens).
    """
    arms = summary.with_columns(
        arm=pl.when(pl.col("init") == "pruned").then(pl.lit("pruned"))
        .when(pl.col("init") == "embeddings").then(pl.lit("embeddings control"))
        .otherwise(pl.format("{}, setting {}", pl.col("init"), pl.col("setting")))
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


# ---------------------------------------------------------------------------------------------------------------
# An adaptive study: how the design was reached


def study_design(adaptive, design) -> dict:
    """The report's "How the design was reached" (an adaptive study: read.Adaptive, its sequential.Design): the
    procedure in one paragraph (`text`), one row per round (what it added and why, what it cost, the verdicts of the
    look that decided it), why it stopped (`stop`, None while it goes on) and what it cost against a fixed grid
    reaching the same verdicts (`cost`)."""
    study = adaptive.study
    rows = []
    for entry in adaptive.rounds:
        verdicts = ", ".join(f"{entry.get(v) or 0} {v}" for v in stats.VERDICTS)
        rows.append(dict(round=entry["round"], what=entry["why"], cells=entry["cells_added"],
                         tokens=entry["tokens"], gpu_hours=entry["gpu_hours"], verdicts=verdicts))
    text = (f"This study ran adaptively (gridlab submit --adaptive): once the grid's cells were done, "
            f"each round looked at the verdicts and added the next seed to every cell whose verdict was inconclusive "
            f"(up to {study['max_seeds']} seeds) and the geometric midpoint of every crossover bracket (in log "
            f"tokens). The verdicts of this report are therefore sequential ones: {design.describe()}; each cell's "
            f"four one-sided tests spend α over its looks, the smallest repeated p-value over the looks is adjusted "
            f"by Benjamini–Hochberg as above, and the interval printed is the 95 % repeated confidence interval of "
            f"the cell's last look, valid at whichever look the study stopped. A fixed-sample interval on a sample "
            f"grown until it decides would cover less than it says, and is not shown.")
    grid_tokens, fixed = study.get("grid_tokens"), study.get("fixed_tokens")
    cost = None
    if grid_tokens and fixed:
        spent = grid_tokens + (study.get("tokens") or 0)
        cost = (f"The grid's own cells trained {format_tokens(grid_tokens)} tokens and the rounds "
                f"{format_tokens(study.get('tokens') or 0)}: {format_tokens(spent)} in all, "
                f"{spent / fixed:.0%} of the {format_tokens(fixed)} a fixed grid reaching the same verdicts trains "
                f"(every cell with as many seeds as the most any cell got, every budget any group got).")
    return dict(text=text, rounds=rows, stop=study.get("stop_line"), stopped=study.get("stopped"), cost=cost,
                tokens=study.get("tokens") or 0, gpu_hours=study.get("gpu_hours"))
