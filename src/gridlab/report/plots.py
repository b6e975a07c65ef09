"""Analysis → SVG figures (matplotlib, Agg), each with a title, a caption and alt text.

The figure count grows with granularities × settings and the panel count with methods × ratios, never with cells or
seeds. Colours are colour-blind safe (Okabe–Ito): blue for what favours pruning, vermillion for what favours
scratch, grey for ties; every verdict is also written in its square, so no reading depends on colour alone.
"""

from __future__ import annotations

import html
import io
import re
import textwrap
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator  # noqa: E402

from gridlab.report import stats  # noqa: E402
from gridlab.report.analyse import Analysis  # noqa: E402
from gridlab.report.scaling import HORIZON, LEVEL  # noqa: E402
from gridlab.report.stats import NO_INTERVAL  # noqa: E402
from gridlab.report.tables import (  # noqa: E402
    CALLS,
    SETTING_NAMES,
    SETTING_PHRASES,
    format_signed,
    format_tokens,
    granularity_key,
    inference_phrase,
)

# Okabe–Ito, without black (kept for the random-init arm); yellow last (light on white).
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442"]
RANDOM_COLOURS = {1: "#000000", 2: "#777777"}
EMBEDDINGS_STYLE = dict(color="#000000", linestyle=":", label="embeddings control")   # trains B, like pruned init
PRUNE_BLUE, SCRATCH_VERMILLION = "#0072B2", "#D55E00"
# Diverging, colour-blind safe: vermillion (scratch better) – white – blue (pruning better), in benefit orientation.
BENEFIT_CMAP = LinearSegmentedColormap.from_list("scratch_prune", [SCRATCH_VERMILLION, "#FFFFFF", PRUNE_BLUE])
RATIO_COLOURS = ["#0072B2", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#D55E00"]


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    caption: str
    alt: str  # what the figure shows, in words, for readers who cannot see it
    svg: str


def method_colours(methods: list[str]) -> dict[str, str]:
    """One fixed colour per method for every figure of a report (methods in sorted order)."""
    return {m: OKABE_ITO[i % len(OKABE_ITO)] for i, m in enumerate(sorted(set(methods)))}


def plain(text) -> str:
    """Text from the database shown literally by matplotlib (no mathtext)."""
    return str(text).replace("$", r"\$")


_SVG_HEAD = re.compile(r"^.*?(?=<svg)", re.S)
_SVG_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
_SVG_OPEN = re.compile(r"<svg [^>]*>", re.S)


def to_svg(figure: plt.Figure, key: str, alt: str) -> str:
    """Inline-ready SVG: no XML prolog, no metadata (it names external vocabularies), ids unique per figure, and the
    alt text as its accessible name (role="img", aria-label and a <title>)."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": key, "svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(figure)
    svg = _SVG_METADATA.sub("", _SVG_HEAD.sub("", buffer.getvalue(), count=1))
    label = html.escape(alt, quote=True)
    svg = svg.replace("<svg ", f'<svg class="figure" role="img" aria-label="{label}" ', 1)
    opening = _SVG_OPEN.search(svg)
    return svg[:opening.end()] + f"\n<title>{label}</title>" + svg[opening.end():]


LEGEND_ROW_INCHES = 0.22


def _panel_grid(n_rows: int, n_cols: int, panel=(3.0, 2.3), sharex: bool = True, hspace: float = 0.45,
                right: float = 0.15, legend_rows: int = 2, left: float = 0.75, wspace: float = 0.35,
                axis_label: float = 0.55, top: float = 0.35):
    """Small multiples with fixed margins in inches (no constrained/tight layout: those redraw the figure several
    times); room below for the x-axis labels (`axis_label`) and a figure legend of `legend_rows` rows, and `top`
    above the first row."""
    width = max(5.0, panel[0] * n_cols + left + right)
    bottom = axis_label + LEGEND_ROW_INCHES * legend_rows
    height = panel[1] * n_rows + bottom + top
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(width, height), squeeze=False, sharex=sharex)
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                           top=1 - top / height, wspace=wspace, hspace=hspace)
    return figure, axes


def _title(ax, text: str, fontsize: float) -> None:
    # A fixed y: otherwise matplotlib measures every tick label of the panel to place the title (a fifth of the
    # plotting time), though nothing is drawn above the axes.
    ax.set_title(text, fontsize=fontsize, y=1.0)


def _log_x(ax) -> None:
    ax.set_xscale("log")
    ax.minorticks_off()  # minor labels (2×10^6, 3×10^6, ...) collide, and minor ticks are costly to lay out
    # Token counts as 10M, 100M, 1B: read like the tables, and no mathtext to typeset for every label.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda tokens, _: format_tokens(tokens)))
    ax.yaxis.set_major_locator(MaxNLocator(4))
    ax.tick_params(labelsize=7)


def _figure_legend(figure, axes, handles: dict | None = None) -> None:
    handles = dict(handles or {})
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        columns = max(1, min(len(handles), int(figure.get_figwidth() / 1.9)))
        figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=columns, fontsize=7.5,
                      frameon=False, bbox_to_anchor=(0.5, 0.0))


def _by_granularity(frame: pl.DataFrame) -> list[str]:
    return sorted(frame["granularity"].unique().to_list(), key=granularity_key)


def _methods_and_ratios(frame: pl.DataFrame, granularity: str) -> tuple[list[str], list[float]]:
    part = frame.filter(pl.col("granularity") == granularity)
    return sorted(part["method"].unique().to_list()), sorted(part["ratio"].unique().to_list())


def _counts_text(calls: list[str]) -> str:
    counted = ", ".join(f"{calls.count(word)} {word}" for word in CALLS)
    missing = calls.count(NO_INTERVAL)
    return counted + (f", {missing} without an interval" if missing else "")


# ---------------------------------------------------------------------------------------------------------------
# The answer


SQUARE_INCHES = (1.08, 0.34)
SQUARE_FONT = 6.2  # points: two lines of at most SQUARE_CHARACTERS fit a square
CHARACTER_WIDTH = 0.62  # of the font size: a generous average advance of DejaVu Sans, to wrap text before it spills
TITLE_FONT = 8.0
LEGEND_FONT = 7.5
CALL_FILL = {"prune": "#A6CEE9", "scratch": "#F5B78E", "equivalent": "#D9D9D9", "inconclusive": "#FFFFFF",
             NO_INTERVAL: "#FFFFFF"}
CALL_MEANING = {"prune": "prune: pruned init better", "scratch": "scratch: random init better",
                "equivalent": "equivalent: within ±δ", "inconclusive": "inconclusive",
                NO_INTERVAL: "no interval: < 2 seeds, no verdict"}


def method_keys(methods: list[str]) -> dict[str, str]:
    """A one-letter key per method (A, B, …; then A2, B2, …) for labels that must fit a square; the legend spells
    them out."""
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return {m: letters[i % len(letters)] + (str(i // len(letters) + 1) if i >= len(letters) else "")
            for i, m in enumerate(sorted(set(methods)))}


def _wrap(text: str, inches: float, fontsize: float) -> str:
    """`text` broken into lines that fit `inches` at `fontsize` (a generous estimate of the glyphs' width)."""
    per_line = max(8, int(inches * 72 / (fontsize * CHARACTER_WIDTH)))
    return "\n".join(textwrap.wrap(text, per_line)) or text


def _square_label(square: dict, keys: dict[str, str] | None) -> str:
    """Two lines that fit a square: the gap ± its half-width, and the call (with the best method's key when the
    granularity has several methods); a square without an interval shows its gap and no verdict."""
    if square["call"] == NO_INTERVAL:
        return f"{format_signed(square['gap'], 2)}\nno interval"
    word = square["call"]
    if keys is not None and square["call"] != "scratch":
        word += f" · {keys[square['method']]}"
    return f"{format_signed(square['gap'], 2)} ± {square['half']:.2g}\n{word}"


def verdict_map(analysis: Analysis) -> Figure | None:
    """One square per granularity × ratio × budget and setting: colour and word = the call, text = the best method's
    gap ± its 95 % half-width. Settings side by side when they fit, else one above the other. Every text fits its
    square or panel (tests/test_report_browser.py measures the boxes): methods are one-letter keys spelled out in the
    legend, panel titles wrap to their panel's width, and a square without an interval shows no verdict."""
    squares = analysis.squares
    if squares.height == 0:
        return None
    settings = sorted(squares["setting"].unique().to_list())
    rows = squares.select("granularity", "ratio").unique().sort(
        [pl.col("granularity").replace_strict({g: i for i, g in enumerate(_by_granularity(squares))},
                                              return_dtype=pl.Int64), "ratio"]).rows()
    multi = dict(squares.group_by("granularity").agg((pl.col("methods").max() > 1).alias("m")).iter_rows())
    keyed = squares.filter(pl.col("granularity").is_in([g for g, m in multi.items() if m])
                           & (pl.col("call") != NO_INTERVAL) & (pl.col("call") != "scratch"))["method"].to_list()
    keys = method_keys(keyed)
    budgets = {s: sorted(squares.filter(pl.col("setting") == s)["budget_tokens"].unique().to_list())
               for s in settings}
    columns = max(len(b) for b in budgets.values())
    side_by_side = columns * len(settings) <= 10
    grid_shape = (1, len(settings)) if side_by_side else (len(settings), 1)
    panel = (SQUARE_INCHES[0] * columns, SQUARE_INCHES[1] * len(rows) + 0.15)
    left, right, gap = 0.95, 0.1, 0.75  # inches; gap: between stacked panels, for the lower one's title and ticks
    if not side_by_side:  # room for the gap between stacked panels, so that the squares keep their size
        panel = (panel[0], panel[1] + gap * (len(settings) - 1) / len(settings))
    width = max(5.0, panel[0] * grid_shape[1] + left + right)
    legend = {CALL_MEANING[c]: Patch(facecolor=CALL_FILL[c], edgecolor="#999999",
                                     hatch="////" if c == NO_INTERVAL else None)
              for c in (*stats.VERDICTS, NO_INTERVAL)}
    legend.update({f"{k}: {plain(m)}": Patch(visible=False) for m, k in keys.items()})
    legend_columns = max(1, min(len(legend), int(width / 2.1)))
    legend_rows = -(-len(legend) // legend_columns)
    title_inches = panel[0] * (1 if side_by_side else 1) - 0.1
    titles = {s: _wrap(f"{SETTING_NAMES.get(s, f'Setting {s}')}", title_inches, TITLE_FONT) for s in settings}
    title_lines = max(t.count("\n") + 1 for t in titles.values())
    top = 0.25 + 0.16 * title_lines
    hspace = (gap + 0.16 * (title_lines - 1)) / panel[1]
    figure, axes = _panel_grid(*grid_shape, panel=panel, sharex=False, hspace=hspace, wspace=0.08, right=right,
                               legend_rows=legend_rows, left=left, axis_label=0.12, top=top)
    for index, setting in enumerate(settings):
        ax = axes.flat[index]
        part = squares.filter(pl.col("setting") == setting)
        cols = budgets[setting]
        ax.set_xlim(0, len(cols))
        ax.set_ylim(len(rows), 0)
        for square in part.iter_rows(named=True):
            i = rows.index((square["granularity"], square["ratio"]))
            j = cols.index(square["budget_tokens"])
            call = square["call"]
            patch = plt.Rectangle((j, i), 1, 1, facecolor=CALL_FILL[call], edgecolor="#BBBBBB",
                                  linewidth=0.8, hatch="////" if call == NO_INTERVAL else None)
            patch.set_gid(f"vm-square-{setting}-{i}-{j}")
            ax.add_patch(patch)
            # One text of two lines per square (half as many text artists to lay out as two texts).
            label = ax.text(j + 0.5, i + 0.55, _square_label(square, keys if multi.get(square["granularity"])
                                                             else None),
                            ha="center", va="center", fontsize=SQUARE_FONT, linespacing=1.5)
            label.set_gid(f"vm-label-{setting}-{i}-{j}")
        ax.set_xticks(np.arange(len(cols)) + 0.5, [f"B = {format_tokens(b)}" for b in cols], fontsize=7)
        ax.xaxis.tick_top()
        ax.tick_params(length=0, pad=2)
        first_column = index == 0 or not side_by_side
        ax.set_yticks(np.arange(len(rows)) + 0.5,
                      [f"{plain(g)} {r:g}" for g, r in rows] if first_column else [], fontsize=7)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(titles[setting], fontsize=TITLE_FONT, y=1.0, pad=13, linespacing=1.2)
    columns_legend = figure.legend(legend.values(), legend.keys(), loc="lower center", ncol=legend_columns,
                                   fontsize=LEGEND_FONT, frameon=False, bbox_to_anchor=(0.5, 0.0),
                                   handlelength=1.6, columnspacing=1.2)
    columns_legend.set_gid("vm-legend")
    sign = "positive" if analysis.higher_is_better else "negative"
    phrases = "; ".join(f"setting {s}: {SETTING_PHRASES.get(s, '')}" for s in settings)
    alt = "Verdict map. " + " ".join(
        f"Setting {s}: {_counts_text(squares.filter(pl.col('setting') == s)['call'].to_list())} of "
        f"{squares.filter(pl.col('setting') == s).height} squares." for s in settings)
    return Figure(
        key="verdict-map",
        title="The answer: prune or train from scratch",
        caption=(f"Rows: granularity × pruning ratio; columns: budget B ({phrases}). Each square asks whether the "
                 f"granularity's best method beats training from scratch: prune, scratch, equivalent (within "
                 f"±{analysis.margin:g}) or inconclusive, adjusted for choosing the best method and, by "
                 f"Benjamini–Hochberg, for the setting's many squares. Text: that method's gap pruned − random in "
                 f"{plain(analysis.metric)} ({sign} = pruning better) ± its 95 % half-width "
                 f"({inference_phrase(analysis.gaps, analysis.pool)}); letters name the methods in the legend."),
        alt=alt,
        svg=to_svg(figure, "verdict-map", alt),
    )


# ---------------------------------------------------------------------------------------------------------------
# Crossovers


def crossover_figures(analysis: Analysis, colours: dict[str, str]) -> list[Figure]:
    """Per granularity, one panel per method × ratio: metric vs budget (log x) for pruned init and random init in
    each setting, seed-mean ± 95 % interval, crossovers marked (a shaded range where a sign change is not
    resolved)."""
    figures = []
    summary = analysis.summary.filter(pl.col("budget_tokens") > 0)
    if summary.height == 0:
        return figures
    found: dict[tuple, list] = {}
    for c in analysis.crossovers:
        found.setdefault((c.granularity, c.method, c.ratio), []).append(c)
    parts = summary.partition_by(["granularity", "method", "ratio"], as_dict=True)
    for granularity in _by_granularity(summary):
        methods, ratios = _methods_and_ratios(summary, granularity)
        figure, axes = _panel_grid(len(methods), len(ratios))
        for r, method in enumerate(methods):
            for c, ratio in enumerate(ratios):
                ax = axes[r][c]
                _crossover_panel(ax, parts.get((granularity, method, ratio)),
                                 found.get((granularity, method, ratio), []), colours[method])
                _title(ax, f"{plain(method)}, ratio {ratio:g}", 8.5)
                if r == len(methods) - 1:
                    ax.set_xlabel("budget B (tokens)", fontsize=8)
                if c == 0:
                    ax.set_ylabel(plain(analysis.metric), fontsize=8)
        _figure_legend(figure, axes)
        key = f"crossover-{granularity}"
        marked = sum(1 for c in analysis.crossovers if c.granularity == granularity and c.budget is not None)
        alt = (f"Crossover plot for {granularity} pruning: {plain(analysis.metric)} against budget for "
               f"{len(methods)} method(s) × {len(ratios)} ratio(s), pruned init and random init in each setting; "
               f"{marked} crossover budget(s) marked.")
        figures.append(Figure(
            key=key,
            title=f"Crossover plot — {granularity}",
            caption=("Seed mean (markers, joined by thin lines) with its 95 % t-interval (band) per budget B for "
                     "pruned init (method colour), random init in setting 1 (black, B tokens) and in setting 2 (grey, "
                     "parent + B tokens, drawn at B). Dotted vertical lines: crossover budgets (1 and 2 name the "
                     "setting; beyond the largest budget they are extrapolations); shaded: a sign change of the mean "
                     "gap that the verdicts do not resolve."),
            alt=alt,
            svg=to_svg(figure, key, alt),
        ))
    return figures


def _crossover_panel(ax, panel: pl.DataFrame | None, crossovers: list, colour: str) -> None:
    _log_x(ax)
    if panel is None or panel.height == 0:
        ax.text(0.5, 0.5, "no finished cells", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        return
    random_settings = sorted(panel.filter(pl.col("init") == "random")["setting"].unique().to_list())
    arms = [("pruned", None, dict(color=colour, marker="o"), "pruned init", "-")]
    arms += [("random", s, dict(color=RANDOM_COLOURS.get(s, "#000000"), marker="s" if s == 1 else "D"),
              f"random init, setting {s}", "--" if s == 1 else ":") for s in random_settings]
    for init, setting, style, label, line_style in arms:
        arm = panel.filter(pl.col("init") == init)
        if arm.height == 0:
            continue
        arm = arm.filter(pl.col("setting") == (setting or arm["setting"].min())).sort("budget_tokens")
        budgets = arm["budget_tokens"].to_numpy().astype(float)
        means = arm["mean"].to_numpy()
        # Intervals as a band (one path per arm): error bars cost several SVG nodes per point.
        if arm["half"].null_count() < arm.height:
            half = arm["half"].fill_null(0).to_numpy()
            # ax.fill (one Polygon) rather than fill_between (a PolyCollection, several times slower to build)
            ax.fill(np.concatenate([budgets, budgets[::-1]]), np.concatenate([means - half, (means + half)[::-1]]),
                    color=style["color"], alpha=0.18, linewidth=0)
        ax.plot(budgets, means, linestyle=line_style, linewidth=0.6, markersize=3, label=label, **style)
    for crossover in crossovers:
        if crossover.kind == "unresolved":
            high = crossover.high if crossover.high is not None else crossover.largest_budget
            ax.axvspan(crossover.low, high, color="#CC79A7", alpha=0.12, linewidth=0,
                       label="sign change, not resolved")
        elif crossover.budget is not None:
            ax.axvline(crossover.budget, color="#CC79A7", linestyle=":", linewidth=1.1,
                       label=f"crossover ({crossover.kind})")
            ax.text(crossover.budget, 1.0, f" {crossover.setting}", transform=ax.get_xaxis_transform(),
                    fontsize=7, color="#CC79A7", va="top")


def gap_trend_figures(analysis: Analysis) -> list[Figure]:
    """Per setting, one panel per method: the mean gap against the budget (markers, one colour per ratio), the chosen
    gap model (line) with its 90 % prediction band, continued dashed into the shaded extrapolation range up to
    HORIZON × the largest budget; crosses mark extrapolated crossovers."""
    gaps = analysis.gaps
    if gaps.height == 0:
        return []
    fits = {(c.granularity, c.method, c.ratio, c.setting): c for c in analysis.crossovers}
    figures = []
    for setting in sorted(gaps["setting"].unique().to_list()):
        part = gaps.filter(pl.col("setting") == setting)
        methods = sorted(part.select("granularity", "method").unique().rows(), key=lambda gm: (*granularity_key(gm[0]),
                                                                                               gm[1]))
        ratios = sorted(part["ratio"].unique().to_list())
        columns = min(3, len(methods))
        n_rows = -(-len(methods) // columns)
        figure, axes = _panel_grid(n_rows, columns, panel=(3.1, 2.2), sharex=False, legend_rows=1)
        for ax in axes.flat[len(methods):]:
            ax.set_visible(False)
        crossings = 0
        for index, (granularity, method) in enumerate(methods):
            ax = axes.flat[index]
            _log_x(ax)
            ax.axhline(0, color="#444444", linewidth=0.8)
            largest = part["budget_tokens"].max()
            for k, ratio in enumerate(ratios):
                colour = RATIO_COLOURS[k % len(RATIO_COLOURS)]
                rows = part.filter((pl.col("method") == method) & (pl.col("granularity") == granularity)
                                   & (pl.col("ratio") == ratio)).sort("budget_tokens")
                if rows.height == 0:
                    continue
                ax.plot(rows["budget_tokens"].to_numpy(), rows["gap"].to_numpy(), marker="o", markersize=2.5,
                        linestyle="none", color=colour, label=f"ratio {ratio:g}")
                crossover = fits.get((granularity, method, ratio, setting))
                curve = crossover.curve if crossover else None
                if curve is not None:
                    tokens = curve["tokens"]
                    inside = tokens <= largest * 1.0001
                    ax.fill(np.concatenate([tokens, tokens[::-1]]),
                            np.concatenate([curve["low"], curve["high"][::-1]]), color=colour, alpha=0.10,
                            linewidth=0)
                    ax.plot(tokens[inside], curve["mean"][inside], color=colour, linewidth=0.9)
                    ax.plot(tokens[~inside], curve["mean"][~inside], color=colour, linewidth=0.9, linestyle="--")
                if crossover and crossover.kind == "extrapolated":
                    crossings += 1
                    ax.plot([crossover.budget], [0], marker="x", color=colour, markersize=5, linestyle="none")
            ax.axvspan(largest, largest * HORIZON, color="#EEEEEE", zorder=0, linewidth=0)
            _title(ax, f"{plain(method)} ({granularity})", 8.5)
            ax.set_xlabel("budget B (tokens)", fontsize=8)
            if index % columns == 0:
                ax.set_ylabel(f"gap in {plain(analysis.metric)}", fontsize=8)
        handles = {"extrapolation range": Patch(facecolor="#EEEEEE")}
        _figure_legend(figure, axes, handles)
        key = f"gap-trend-{setting}"
        sign = "positive" if analysis.higher_is_better else "negative"
        alt = (f"Gap trend in setting {setting}: mean gap pruned − random against budget for {len(methods)} "
               f"method(s) × {len(ratios)} ratio(s), with the chosen gap model and its {LEVEL:.0%} prediction band; "
               f"{crossings} extrapolated crossover(s) marked.")
        figures.append(Figure(
            key=key,
            title=f"Gap against budget — setting {setting}",
            caption=(f"Markers: mean gap pruned − random ({sign} = pruning better) per budget, one colour per ratio. "
                     f"Lines: the gap model chosen by its lack-of-fit test (constant, linear in log B, or "
                     f"g∞ + c·B^−γ), with its {LEVEL:.0%} prediction band for a rerun's seed mean (shaded), continued "
                     f"dashed into the grey extrapolation range up to {HORIZON:g}× the largest budget; no line where "
                     f"no model passed. Crosses: extrapolated crossovers. Beyond the measured budgets the lines are "
                     f"extrapolations."),
            alt=alt,
            svg=to_svg(figure, key, alt),
        ))
    return figures


def transfer_figure(analysis: Analysis) -> Figure | None:
    """Effective data transferred: per method a panel of B + D_eff (the scratch tokens the pruned model matches)
    against B, log-log, one colour per ratio, with the lines where setting 1 (D_eff = 0) and setting 2 (D_eff = P)
    break even."""
    effective = analysis.effective
    frame = analysis.transfer
    if frame.height == 0 or frame["d_eff_tokens"].is_null().all():
        return None
    frame = frame.filter(pl.col("setting") == frame["setting"].min())
    methods = sorted(frame.select("granularity", "method").unique().rows(),
                     key=lambda gm: (*granularity_key(gm[0]), gm[1]))
    ratios = sorted(frame["ratio"].unique().to_list())
    columns = min(3, len(methods))
    n_rows = -(-len(methods) // columns)
    figure, axes = _panel_grid(n_rows, columns, panel=(3.1, 2.3), sharex=False, legend_rows=2)
    for ax in axes.flat[len(methods):]:
        ax.set_visible(False)
    budgets = np.array(sorted(frame["budget_tokens"].unique().to_list()), dtype=float)
    parent = effective.parent_tokens
    for index, (granularity, method) in enumerate(methods):
        ax = axes.flat[index]
        ax.set_yscale("log")
        _log_x(ax)
        ax.minorticks_off()
        ax.yaxis.set_major_locator(LogLocator(numticks=4))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda tokens, _: format_tokens(tokens)))
        ax.plot(budgets, budgets, color="#444444", linewidth=0.8, linestyle="--", label="D_eff = 0 (setting 1 even)")
        if parent:
            ax.plot(budgets, budgets + parent, color="#777777", linewidth=0.8, linestyle=":",
                    label="D_eff = P (setting 2 even)")
        for k, ratio in enumerate(ratios):
            colour = RATIO_COLOURS[k % len(RATIO_COLOURS)]
            rows = frame.filter((pl.col("method") == method) & (pl.col("granularity") == granularity)
                                & (pl.col("ratio") == ratio) & pl.col("d_eff_tokens").is_not_null()).sort(
                "budget_tokens")
            if rows.height == 0:
                continue
            b = rows["budget_tokens"].to_numpy().astype(float)
            matched = b + rows["d_eff_tokens"].to_numpy()
            bound = rows["d_eff_bound"].to_numpy()
            exact = bound == ""
            positive = matched > 0
            ax.plot(b[exact & positive], matched[exact & positive], marker="o", markersize=3, linewidth=0.9,
                    color=colour, label=f"ratio {ratio:g}")
            low = b + rows["d_eff_low"].fill_null(np.nan).to_numpy()
            high = b + rows["d_eff_high"].fill_null(np.nan).to_numpy()
            has = exact & np.isfinite(low) & np.isfinite(high) & (low > 0)
            if has.any():
                ax.vlines(b[has], low[has], high[has], color=colour, linewidth=0.9)
            for marker, side in (("^", ">"), ("v", "<")):
                chosen = (bound == side) & positive
                if chosen.any():
                    ax.plot(b[chosen], matched[chosen], marker=marker, markersize=4, linestyle="none", color=colour)
        _title(ax, f"{plain(method)} ({granularity})", 8.5)
        ax.set_xlabel("budget B (tokens)", fontsize=8)
        if index % columns == 0:
            ax.set_ylabel("scratch tokens matched, B + D_eff", fontsize=8)
    _figure_legend(figure, axes)
    key = "transfer"
    known = frame.filter(pl.col("d_eff_tokens").is_not_null()).height
    alt = (f"Effective data transferred: for {len(methods)} method(s) × {len(ratios)} ratio(s), the scratch tokens "
           f"that match the pruned model against the budget B, with the break-even lines of setting 1 and setting 2; "
           f"{known} of {frame.height} group × budget values known.")
    return Figure(
        key=key,
        title="Effective data transferred",
        caption=("Per budget B, how many tokens of scratch training the pruned model is worth: the point where the "
                 "random arm's learning curve (setting-1 and setting-2 branches of one trajectory, made monotone) "
                 "reaches the pruned model's value, plotted as B + D_eff, geometric mean over seeds with its 95 % "
                 "interval (bars). Triangles: bounds (the pruned value lies beyond the measured curve; ▲ at least, "
                 "▼ at most). Above the dashed line pruning beats scratch at the same budget (setting 1); above the "
                 "dotted line it beats scratch given the parent's P tokens too (setting 2: D_eff > P)."),
        alt=alt,
        svg=to_svg(figure, key, alt),
    )


# ---------------------------------------------------------------------------------------------------------------
# Detail figures


def gap_heatmaps(analysis: Analysis) -> list[Figure]:
    """Per granularity: ratio × budget panels (methods × settings), colour = benefit, diverging and centred at 0."""
    gaps = analysis.gaps
    figures = []
    if gaps.height == 0:
        return figures
    limit = float(np.nanmax(np.abs(gaps["gap"].to_numpy()))) or 1.0
    norm = TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit)
    settings = sorted(gaps["setting"].unique().to_list())
    for granularity in _by_granularity(gaps):
        methods, ratios = _methods_and_ratios(gaps, granularity)
        part = gaps.filter(pl.col("granularity") == granularity)
        budgets = sorted(part["budget_tokens"].unique().to_list())
        colourbar_inches = 1.25
        figure, axes = _panel_grid(len(methods), len(settings), sharex=False, hspace=0.9, right=colourbar_inches,
                                   legend_rows=0, panel=(0.55 * len(budgets) + 1.4, 0.35 * len(ratios) + 1.6))
        image = None
        for r, method in enumerate(methods):
            for c, setting in enumerate(settings):
                ax = axes[r][c]
                grid = np.full((len(ratios), len(budgets)), np.nan)
                labels = [["" for _ in budgets] for _ in ratios]
                rows = part.filter((pl.col("method") == method) & (pl.col("setting") == setting))
                for row in rows.iter_rows(named=True):
                    i, j = ratios.index(row["ratio"]), budgets.index(row["budget_tokens"])
                    grid[i, j] = row["benefit"]
                    labels[i][j] = row["verdict"][0].upper() if row["half"] is not None else "–"
                # pcolormesh stays vector in SVG (imshow would embed a raster image)
                image = ax.pcolormesh(np.ma.masked_invalid(grid), cmap=BENEFIT_CMAP, norm=norm, edgecolors="white",
                                      linewidth=0.5)
                for i in range(len(ratios)):
                    for j in range(len(budgets)):
                        if labels[i][j]:
                            dark = abs(grid[i, j]) > 0.6 * limit
                            ax.text(j + 0.5, i + 0.5, labels[i][j], ha="center", va="center", fontsize=7,
                                    color="white" if dark else "black")
                ax.set_xticks(np.arange(len(budgets)) + 0.5, [format_tokens(b) for b in budgets], fontsize=7,
                              rotation=45)
                ax.set_yticks(np.arange(len(ratios)) + 0.5, [f"{x:g}" for x in ratios], fontsize=7)
                _title(ax, f"{plain(method)}, setting {setting}", 9)
                ax.set_xlabel("budget B (tokens)", fontsize=8)
                ax.set_ylabel("pruning ratio", fontsize=8)
        width = figure.get_figwidth()
        colourbar = figure.colorbar(image, cax=figure.add_axes((1 - (colourbar_inches - 0.15) / width, 0.2,
                                                                0.14 / width, 0.6)))
        colourbar.ax.tick_params(labelsize=7)
        colourbar.set_label("benefit of pruning\n(+ pruned better)", fontsize=7.5)
        key = f"heatmap-{granularity}"
        sign = "−gap" if not analysis.higher_is_better else "gap"
        alt = (f"Gap heatmap for {granularity} pruning: ratio × budget for {len(methods)} method(s) and "
               f"{len(settings)} setting(s), coloured by the benefit of pruning, with verdict letters.")
        figures.append(Figure(
            key=key,
            title=f"Gap heatmap — {granularity}",
            caption=(f"Colour: the benefit of pruning ({sign} in {plain(analysis.metric)}); blue means pruning is "
                     "better, vermillion that scratch is. Letters: verdict (P prune, S scratch, E equivalent, I "
                     "inconclusive, – no interval: fewer than two seeds); empty squares have no finished pair."),
            alt=alt,
            svg=to_svg(figure, key, alt),
        ))
    return figures


def training_curve_figures(analysis: Analysis, colours: dict[str, str]) -> list[Figure]:
    """train_loss vs tokens per method × ratio at each group's largest finished budget, seed mean."""
    curves = analysis.curves
    figures = []
    if curves.height == 0:
        return figures
    for granularity in _by_granularity(curves):
        methods, ratios = _methods_and_ratios(curves, granularity)
        figure, axes = _panel_grid(len(methods), len(ratios), sharex=False)
        part = curves.filter(pl.col("granularity") == granularity)
        for r, method in enumerate(methods):
            for c, ratio in enumerate(ratios):
                ax = axes[r][c]
                panel = part.filter((pl.col("method") == method) & (pl.col("ratio") == ratio))
                # The pruned arm's run (and the embeddings control's) is listed once per setting; draw it once.
                for (init, setting), line in panel.group_by(["init", "setting"], maintain_order=True):
                    if init != "random" and setting != panel.filter(pl.col("init") == init)["setting"].min():
                        continue
                    if init == "pruned":
                        style = dict(color=colours[method], label="pruned init")
                    elif init == "embeddings":
                        style = EMBEDDINGS_STYLE
                    else:
                        style = dict(color=RANDOM_COLOURS.get(setting, "#000000"),
                                     linestyle="--" if setting == 2 else "-",
                                     label=f"random init, setting {setting}")
                    ax.plot(line["tokens"].to_numpy(), line["value"].to_numpy(), linewidth=1, **style)
                _log_x(ax)
                _title(ax, f"{plain(method)}, ratio {ratio:g}", 9)
                if r == len(methods) - 1:
                    ax.set_xlabel("training tokens", fontsize=8)
                if c == 0:
                    ax.set_ylabel("train_loss", fontsize=8)
        _figure_legend(figure, axes)
        key = f"curves-{granularity}"
        alt = (f"Training curves for {granularity} pruning: train_loss against tokens for {len(methods)} method(s) × "
               f"{len(ratios)} ratio(s), pruned init and random init in each setting.")
        figures.append(Figure(
            key=key,
            title=f"Training curves — {granularity}",
            caption=("Training loss against tokens trained, mean over seeds, at each arm's largest finished budget "
                     "(random init in setting 2 trains parent + B tokens)."),
            alt=alt,
            svg=to_svg(figure, key, alt),
        ))
    return figures


# ---------------------------------------------------------------------------------------------------------------
# All figures of a report


FIGURE_KINDS = ("answer", "trend", "crossover", "transfer", "heatmap", "curves")


def draw(analysis: Analysis, kinds=FIGURE_KINDS) -> dict[str, list[Figure]]:
    """The figures of the given kinds (a module-level function: a worker process can run it on a pickled Analysis;
    the colours depend only on the analysis, so figures drawn in two processes match)."""
    colours = method_colours(analysis.summary["method"].to_list() + analysis.curves["method"].to_list())
    makers = {
        "answer": lambda: [f for f in (verdict_map(analysis),) if f is not None],
        "trend": lambda: gap_trend_figures(analysis),
        "crossover": lambda: crossover_figures(analysis, colours),
        "transfer": lambda: [f for f in (transfer_figure(analysis),) if f is not None],
        "heatmap": lambda: gap_heatmaps(analysis),
        "curves": lambda: training_curve_figures(analysis, colours),
    }
    return {kind: makers[kind]() for kind in kinds}


def warm_up() -> None:
    """Import matplotlib and load its fonts (a worker process does this while the report is being analysed)."""
    figure = plt.figure(figsize=(1, 1))
    figure.text(0.5, 0.5, "warm-up")
    to_svg(figure, "warm-up", "warm-up")
