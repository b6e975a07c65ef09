"""Analysis → summary.md: the answer, the verdict tables and the key sentences as Markdown, so that a README's
results section can be regenerated from the report (numbers with ASCII signs, tables GitHub renders)."""

from __future__ import annotations

import math

from gridlab.report.analyse import Analysis
from gridlab.report.read import LM_EVAL_AVERAGE
from gridlab.report.stats import NO_INTERVAL
from gridlab.report.tables import (
    SETTING_NAMES,
    SETTING_PHRASES,
    WITHOUT_INTERVAL,
    format_tokens,
    inference_phrase,
    setting2_text,
    slope_text,
    square_rows,
)


def _gap(entry: dict | None, with_method: bool = False) -> str:
    """'-0.32 ± 0.05 prune (n=3)': the gap, its 95 % half-width, the verdict (none without an interval)."""
    if entry is None:
        return "–"
    text = f"{entry['gap']:+.3g}"
    has_interval = entry.get("half") is not None and not math.isnan(entry["half"])
    if has_interval:
        text += f" ± {entry['half']:.2g}"
    word = entry.get("call") or entry["verdict"]
    text += f" {word}" if has_interval else f" (n={entry.get('n_seeds') or 1}, no interval)"
    if has_interval and entry.get("n_seeds") is not None:
        text += f" (n={entry['n_seeds']})"
    if with_method and has_interval and entry.get("call") not in (None, "scratch", NO_INTERVAL):
        text += f" {entry['method']}"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def clean(cell) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    return (["| " + " | ".join(map(clean, header)) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(clean, row)) + " |" for row in rows])


def summary_markdown(analysis: Analysis, generated: str) -> str:
    a = analysis
    direction = "higher is better" if a.higher_is_better else "lower is better"
    lines = [f"# gridlab report — {a.grid.get('name') or 'unnamed grid'}: summary", ""]
    lines += [sentence for s in a.answer for sentence in (s, "")]
    warnings = [*a.regime.warnings, *(a.selection.warnings if a.selection else [])]
    lines += [f"> **Warning.** {warning}" for warning in warnings]
    if warnings:
        lines.append("")
    if a.regime_line:
        lines += [a.regime_line, ""]
    interval = "repeated confidence interval" if a.adaptive is not None else "interval"
    within = "the gap is shown to lie" if a.adaptive is not None else "the 90 % interval lies"
    sequential = (" — sequential verdicts of an adaptive study (below, \"How the design was reached\")"
                  if a.adaptive is not None else "")
    lines += [f"Headline metric `{a.metric}` ({direction}); gap = pruned − random ± the half-width of its 95 % "
              f"{interval} ({inference_phrase(a.gaps, a.pool)}); verdicts: equivalent when {within} within "
              f"±{a.margin:g} (TOST), prune or scratch when the gap differs from 0, else inconclusive, each "
              f"with Benjamini–Hochberg at a 5 % false discovery rate over the setting's cells{sequential}. "
              f"Generated {generated} from the results database; index.html has the details, verdicts.csv every "
              f"cell.", ""]

    if a.adaptive is not None:
        lines += _design(a)
    for setting in (1, 2):
        budgets, rows = a.answer_tables[setting]
        if not rows:
            continue
        lines += [f"## The answer — {SETTING_NAMES[setting]}", "",
                  f"One call per granularity × ratio × budget ({SETTING_PHRASES[setting]}): does the granularity's "
                  f"best method beat scratch? Adjusted for choosing it among the granularity's methods; n = the "
                  f"fewest seeds behind a compared interval.", ""]
        lines += _table(["granularity", "ratio", *[f"B = {format_tokens(b)}" for b in budgets]],
                        [[r["granularity"], f"{r['ratio']:g}", *[_gap(e, True) for e in r["entries"]]] for r in rows])
        lines.append("")

    for setting in (1, 2):
        budgets, rows = a.recommendations[setting]
        if not rows:
            continue
        counts = a.verdicts.get(setting, {})
        lines += [f"## Verdicts per method — {SETTING_NAMES[setting]}", ""]
        lines += _table(["granularity", "method", "ratio", *[f"B = {format_tokens(b)}" for b in budgets]],
                        [[r["granularity"], r["method"], f"{r['ratio']:g}", *[_gap(e) for e in r["entries"]]]
                         for r in rows])
        total = sum(v for k, v in counts.items() if k != WITHOUT_INTERVAL)
        changed = a.sensitivity.get(setting, {})
        lines += ["", f"Verdicts: {', '.join(f'{k} {v}' for k, v in counts.items())} of {total} cells. "
                  f"Sensitivity check (each cell's own paired t): {changed.get('changed', 0)} of "
                  f"{changed.get('total', 0)} verdicts change.", ""]

    lines += _control(a)
    lines += _learning_rates(a)
    lines += _trend_and_transfer(a)
    if a.downstream is not None:
        d = a.downstream
        lines += [f"## Downstream accuracy (`{LM_EVAL_AVERAGE}`, higher is better)", "",
                  f"Average over {len(d.tasks)} lm-eval task score(s): {', '.join(f'`{t}`' for t in d.tasks)}.", ""]
        lines += [s for sentence in d.sentences for s in (sentence, "")]
        for setting in (1, 2):
            budgets, rows = square_rows(d.squares, setting)
            if rows:
                lines += [f"### {SETTING_NAMES[setting]}", ""]
                lines += _table(["granularity", "ratio", *[f"B = {format_tokens(b)}" for b in budgets]],
                                [[r["granularity"], f"{r['ratio']:g}", *[_gap(e, True) for e in r["entries"]]]
                                 for r in rows])
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _signed(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:+.3g}"


def _control(a: Analysis) -> list[str]:
    """The embeddings control: per setting the pooled sentence and the table of pruned − embeddings beside pruned −
    random and the embeddings' share of the advantage."""
    if a.control is None:
        return []
    lines = ["## The embeddings control", "",
             "The random twin given the parent's token embeddings, final norm and lm_head. Each entry: pruned − "
             "embeddings ± 95 % half-width and verdict; pruned − random; the share (random − embeddings) / (random − "
             "pruned) of the pruned arm's advantage the embeddings carry, with Fieller's 95 % interval.", ""]
    for setting in (1, 2):
        budgets, rows = a.control.rows[setting]
        if not rows:
            continue
        lines += [f"### {SETTING_NAMES[setting]}", ""]
        if a.control.sentences.get(setting):
            lines += [f"Pooled over the groups: {a.control.sentences[setting]}.", ""]

        def entry(e: dict | None) -> str:
            if e is None:
                return "–"
            half = e["e"].get("half")
            text = _signed(e["e"]["gap"]) + (f" ± {half:.2g}" if half is not None else "") + f" {e['e']['verdict']}"
            return f"{text}; vs random {_signed(e['r']['gap']) if e['r'] else '–'}; share {e['share']}"

        lines += _table(["granularity", "method", "ratio", *[f"B = {format_tokens(b)}" for b in budgets]],
                        [[r["granularity"], r["method"], f"{r['ratio']:g}", *[entry(e) for e in r["entries"]]]
                         for r in rows])
        lines.append("")
    return lines


def _learning_rates(a: Analysis) -> list[str]:
    """Each arm's chosen lr (a sweep only), ^ / v at the top / bottom of its sweep."""
    budgets, rows = a.selection_rows
    if not rows:
        return []
    lines = ["## Learning rates", "",
             "Each arm at its own best lr: the lowest seed-mean `val_loss/select` (the selection half of the "
             "validation documents; `val_loss` is measured on the other half). ^ / v: the largest / smallest lr of "
             "the sweep (the sweep was too narrow there).", ""]

    def entry(e: dict | None) -> str:
        if e is None:
            return "–"
        return f"{e['lr']:g}" + {"high": " ^", "low": " v"}.get(e["edge"] or "", "")

    lines += _table(["granularity", "method", "ratio", "arm", *[f"B = {format_tokens(b)}" for b in budgets]],
                    [[r["granularity"], r["method"], f"{r['ratio']:g}", r["arm"], *[entry(e) for e in r["entries"]]]
                     for r in rows])
    return [*lines, ""]


def _trend_and_transfer(a: Analysis) -> list[str]:
    """Crossovers with the hold-out check, effective data transferred, and setting 2 judged by what it needs."""
    lines: list[str] = []
    if a.crossover_lines:
        lines += ["## Crossovers", ""]
        lines += [f"- {line}" for line in a.crossover_lines.values()]
        lines += [f"- {a.holdout_line}"]
        if a.crossover_table:
            lines.append("")
            lines += _table(["granularity", "method", "ratio", "setting", "kind", "crossover"],
                            [[c["granularity"], c["method"], f"{c['ratio']:g}", c["setting"], c["kind"], c["text"]]
                             for c in a.crossover_table])
        lines += ["", "Gap predictions with 90 % intervals for every budget and 2× and 4× the largest: "
                  "`predictions.csv`.", ""]
    budgets, rows = a.transfer_table
    lines += ["## Effective data transferred", ""]
    if rows:
        lines += ["D_eff: the scratch tokens the pruned start is worth at budget B (L_scratch(B + D_eff) = "
                  "L_pruned(B)), geometric mean over seeds [95 % interval]; > / < are bounds beyond the random "
                  "arm's measured curve.", ""]
        lines += _table(["granularity", "method", "ratio", *[f"B = {format_tokens(b)}" for b in budgets]],
                        [[r["granularity"], r["method"], f"{r['ratio']:g}",
                          *[(e or {}).get("text", "–") for e in r["entries"]]] for r in rows])
    else:
        lines.append(f"Not available: {a.effective.reason or 'no pruned/random pair has finished'}.")
    lines.append("")
    if 2 in a.dimensions["settings"]:
        lines += ["## Setting 2, judged by what it needs", "", a.setting2_summary, ""]
        if rows and a.effective.parent_tokens:
            lines += _table(["granularity", "method", "ratio", *[f"B = {format_tokens(b)}" for b in budgets],
                             "random arm around P, per doubling"],
                            [[r["granularity"], r["method"], f"{r['ratio']:g}",
                              *[setting2_text(e, a.effective.parent_tokens) for e in r["entries"]],
                              slope_text(r["slope"])] for r in rows])
            lines.append("")
    return lines


def _design(a: Analysis) -> list[str]:
    """An adaptive study: its rounds and why it stopped (the verdicts below are the sequential ones)."""
    study = a.adaptive
    lines = ["## How the design was reached", "",
             study["text"], ""]
    rows = [[r["round"], r["what"], r["cells"], format_tokens(r["tokens"]),
             "–" if r["gpu_hours"] is None else f"{r['gpu_hours']:.2f}", r["verdicts"]] for r in study["rounds"]]
    if rows:
        lines += _table(["round", "what it added, and why", "cells added", "tokens", "GPU-hours",
                         "verdicts at the look before it"], rows)
        lines.append("")
    lines.append(f"Stopped ({study['stopped']}): {study['stop']}" if study["stop"] else
                 "Going on: the last round's cells are not all done yet.")
    if study["cost"]:
        lines += ["", study["cost"]]
    lines += ["", "Only the verdicts and their intervals are sequential; the other intervals (each arm's seed "
              "interval, the gap models' prediction bands, D_eff's) are fixed-sample ones on a sample whose size "
              "depended on the data: descriptive."]
    return lines + [""]
