"""Analysis tables → SVG figures (matplotlib, Agg).

One figure per granularity (small multiples: rows = methods, columns = ratios), so the figure count grows with
granularities × settings and the panel count with methods × ratios, never with cells or seeds.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from gridlab.report.analyse import GRANULARITY_ORDER, Analysis, Crossover, format_tokens  # noqa: E402

# Okabe–Ito, without black (kept for the random-init arm) and yellow (too light on white).
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442"]
RANDOM_COLOURS = {1: "#000000", 2: "#777777"}


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    caption: str
    svg: str


def method_colours(methods: list[str]) -> dict[str, str]:
    """One fixed colour per method for every figure of a report (methods in sorted order)."""
    return {m: OKABE_ITO[i % len(OKABE_ITO)] for i, m in enumerate(sorted(set(methods)))}


def plain(text) -> str:
    """Text from the database shown literally by matplotlib (no mathtext)."""
    return str(text).replace("$", r"\$")


_SVG_HEAD = re.compile(r"^.*?(?=<svg)", re.S)
_SVG_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)


def to_svg(figure: plt.Figure, key: str) -> str:
    """Inline-ready SVG: no XML prolog, no metadata (it names external vocabularies), ids unique per figure."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": key, "svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(figure)
    svg = _SVG_METADATA.sub("", _SVG_HEAD.sub("", buffer.getvalue(), count=1))
    return svg.replace("<svg ", f'<svg class="figure" role="img" aria-label="{key}" ', 1)


LEGEND_ROW_INCHES = 0.22


def _panel_grid(n_rows: int, n_cols: int, panel=(3.0, 2.3), sharex: bool = True, hspace: float = 0.45,
                right: float = 0.15, legend_rows: int = 2):
    """Small multiples with fixed margins in inches (no constrained/tight layout: those redraw the figure several
    times); room below for a figure legend of `legend_rows` rows."""
    width = max(5.0, panel[0] * n_cols + 0.75 + right)
    bottom = 0.55 + LEGEND_ROW_INCHES * legend_rows
    height = panel[1] * n_rows + bottom + 0.35
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(width, height), squeeze=False, sharex=sharex)
    figure.subplots_adjust(left=0.75 / width, right=1 - right / width, bottom=bottom / height,
                           top=1 - 0.35 / height, wspace=0.35, hspace=hspace)
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


def _figure_legend(figure, axes) -> None:
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        columns = max(1, min(len(handles), int(figure.get_figwidth() / 2.4)))
        figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=columns, fontsize=7.5,
                      frameon=False, bbox_to_anchor=(0.5, 0.0))


def _by_granularity(frame: pl.DataFrame) -> list[str]:
    return sorted(frame["granularity"].unique().to_list(), key=lambda g: (GRANULARITY_ORDER.get(g, 9), g))


def _methods_and_ratios(frame: pl.DataFrame, granularity: str) -> tuple[list[str], list[float]]:
    part = frame.filter(pl.col("granularity") == granularity)
    return sorted(part["method"].unique().to_list()), sorted(part["ratio"].unique().to_list())


def crossover_figures(analysis: Analysis, colours: dict[str, str]) -> list[Figure]:
    """Per granularity, one panel per method × ratio: metric vs budget (log x) for pruned init and random init in
    each setting, seed-mean ± 95 % interval, fitted curves, and the crossover budgets marked."""
    figures = []
    summary = analysis.summary
    if summary.height == 0:
        return figures
    found: dict[tuple, list[Crossover]] = {}
    for c in analysis.crossovers:
        found.setdefault((c.granularity, c.method, c.ratio), []).append(c)
    parts = summary.partition_by(["granularity", "method", "ratio"], as_dict=True)
    for granularity in _by_granularity(summary):
        methods, ratios = _methods_and_ratios(summary, granularity)
        figure, axes = _panel_grid(len(methods), len(ratios))
        for r, method in enumerate(methods):
            for c, ratio in enumerate(ratios):
                ax = axes[r][c]
                panel = parts.get((granularity, method, ratio))
                _crossover_panel(ax, panel, found.get((granularity, method, ratio), []), colours[method])
                _title(ax, f"{plain(method)}, ratio {ratio:g}", 8.5)
                if r == len(methods) - 1:
                    ax.set_xlabel("budget B (tokens)", fontsize=8)
                if c == 0:
                    ax.set_ylabel(plain(analysis.metric), fontsize=8)
        _figure_legend(figure, axes)
        key = f"crossover-{granularity}"
        figures.append(Figure(
            key=key,
            title=f"Crossover plot — {granularity}",
            caption=("Seed mean (markers) with its 95 % t-interval (band) per budget B for pruned init "
                     "(method colour), "
                     "random init in setting 1 (black, B tokens) and in setting 2 (grey, parent + B tokens, drawn at "
                     "B). Lines: fitted L(D) = E + A·D^(−α) where the fit converged. Dotted vertical lines: "
                     "crossover budgets (1 and 2 name the setting)."),
            svg=to_svg(figure, key),
        ))
    return figures


def _crossover_panel(ax, panel: pl.DataFrame | None, crossovers: list[Crossover], colour: str) -> None:
    _log_x(ax)
    if panel is None or panel.height == 0:
        ax.text(0.5, 0.5, "no finished cells", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        return
    by_setting = {c.setting: c for c in crossovers}
    random_settings = sorted(panel.filter(pl.col("init") == "random")["setting"].unique().to_list())
    arms = [("pruned", None, dict(color=colour, marker="o"), "pruned init", "-")]
    arms += [("random", s, dict(color=RANDOM_COLOURS.get(s, "#000000"), marker="s" if s == 1 else "D"),
              f"random init, setting {s}", "--" if s == 1 else ":") for s in random_settings]
    for init, setting, style, label, line_style in arms:
        arm = panel.filter(pl.col("init") == init)
        arm = arm.filter(pl.col("setting") == (setting if setting else arm["setting"].min())).sort("budget_tokens")
        if arm.height == 0:
            continue
        budgets = arm["budget_tokens"].to_numpy().astype(float)
        means = arm["mean"].to_numpy()
        # Intervals as a band (one path per arm): error bars cost several SVG nodes per point.
        if arm["half"].null_count() < arm.height:
            half = arm["half"].fill_null(0).to_numpy()
            # ax.fill (one Polygon) rather than fill_between (a PolyCollection, several times slower to build)
            ax.fill(np.concatenate([budgets, budgets[::-1]]), np.concatenate([means - half, (means + half)[::-1]]),
                    color=style["color"], alpha=0.18, linewidth=0)
        ax.plot(budgets, means, linestyle="none", markersize=3, label=label, **style)
        crossover = by_setting.get(setting) if setting else next(iter(by_setting.values()), None)
        fit = crossover.fits.get(init) if crossover else None
        if fit is not None and fit.converged:
            top = max([budgets.max()] + [c.budget for c in crossovers if c.budget])
            xs = np.geomspace(budgets.min(), top * 1.05, 60)
            offset = crossover.random_offset if init == "random" else 0.0
            ax.plot(xs, fit.predict(xs + offset), color=style["color"], linewidth=0.9, linestyle=line_style)
    for crossover in crossovers:
        if crossover.budget is not None:
            ax.axvline(crossover.budget, color="#CC79A7", linestyle=":", linewidth=1.1,
                       label=f"crossover ({crossover.kind})")
            ax.text(crossover.budget, 1.0, f" {crossover.setting}", transform=ax.get_xaxis_transform(),
                    fontsize=7, color="#CC79A7", va="top")


def gap_heatmaps(analysis: Analysis) -> list[Figure]:
    """Per granularity: ratio × budget panels (methods × settings), colour = gap, diverging and centred at 0."""
    gaps = analysis.gaps
    figures = []
    if gaps.height == 0:
        return figures
    limit = float(np.nanmax(np.abs(gaps["gap"].to_numpy()))) or 1.0
    # The prune-better side is blue in every report: negative gaps for losses, positive for accuracies.
    cmap = "RdBu_r" if analysis.lower_is_better else "RdBu"
    norm = TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit)
    settings = sorted(gaps["setting"].unique().to_list())
    for granularity in _by_granularity(gaps):
        methods, ratios = _methods_and_ratios(gaps, granularity)
        part = gaps.filter(pl.col("granularity") == granularity)
        budgets = sorted(part["budget_tokens"].unique().to_list())
        figure, axes = _panel_grid(len(methods), len(settings), sharex=False, hspace=0.9, right=1.1, legend_rows=0,
                                   panel=(0.55 * len(budgets) + 1.4, 0.35 * len(ratios) + 1.6))
        image = None
        for r, method in enumerate(methods):
            for c, setting in enumerate(settings):
                ax = axes[r][c]
                grid = np.full((len(ratios), len(budgets)), np.nan)
                labels = [["" for _ in budgets] for _ in ratios]
                rows = part.filter((pl.col("method") == method) & (pl.col("setting") == setting))
                for row in rows.iter_rows(named=True):
                    i, j = ratios.index(row["ratio"]), budgets.index(row["budget_tokens"])
                    grid[i, j] = row["gap"]
                    labels[i][j] = row["verdict"].split(" ")[0][0].upper()
                # pcolormesh stays vector in SVG (imshow would embed a raster image)
                image = ax.pcolormesh(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, edgecolors="white",
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
        colourbar = figure.colorbar(image, cax=figure.add_axes(
            (1 - 0.75 / figure.get_figwidth(), 0.25, 0.12 / figure.get_figwidth(), 0.5)))
        colourbar.set_label(f"gap: pruned − random ({plain(analysis.metric)})", fontsize=8)
        key = f"heatmap-{granularity}"
        better = "negative" if analysis.lower_is_better else "positive"
        figures.append(Figure(
            key=key,
            title=f"Gap heatmap — {granularity}",
            caption=(f"Colour: mean gap pruned − random; blue ({better}) means pruning is better. Letters: verdict "
                     "(P prune, S scratch, T tie); empty squares have no finished pair."),
            svg=to_svg(figure, key),
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
                # The pruned arm's run is listed once per setting; draw it once.
                for (init, setting), line in panel.group_by(["init", "setting"], maintain_order=True):
                    if init == "pruned" and setting != panel.filter(pl.col("init") == "pruned")["setting"].min():
                        continue
                    if init == "pruned":
                        style = dict(color=colours[method], label="pruned init")
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
        figures.append(Figure(
            key=key,
            title=f"Training curves — {granularity}",
            caption=("Training loss against tokens trained, mean over seeds, at each arm's largest finished budget "
                     "(random init in setting 2 trains parent + B tokens)."),
            svg=to_svg(figure, key),
        ))
    return figures
