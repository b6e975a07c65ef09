"""Analysis + figures → index.html (self-contained), summary.md and report.pdf (headless Chromium, else WeasyPrint),
each written through gridlab.atomic."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import pickle
import time
import warnings
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import jinja2
from markupsafe import Markup

import gridlab
from gridlab import atomic
from gridlab.errors import UserError
from gridlab.report import plots
from gridlab.report.analyse import Analysis, analyse
from gridlab.report.chromium import DevTools, find_chromium
from gridlab.report.markdown import summary_markdown
from gridlab.report.plotworker import PlotWorker
from gridlab.report.read import Results, read_results
from gridlab.report.scaling import predictions_csv
from gridlab.report.stats import POOLING, REMOVED_POOLING
from gridlab.report.tables import (
    SETTING_NAMES,
    format_number,
    format_signed,
    format_tokens,
    setting2_text,
    slope_text,
    verdict_table,
)

TEMPLATES_ENV = "GRIDLAB_TEMPLATES"
TEMPLATE = "report.html.j2"
TEMPLATES_PACKAGE = "gridlab.templates"  # the top-level templates/ folder, shipped in the package (pyproject.toml)
PDF_ENGINES = ("auto", "chromium", "weasyprint")


def _checkout_templates() -> Path | None:
    """templates/ of the checkout this module runs from (src/gridlab/report/render.py → <checkout>/templates), so that
    a checkout run with PYTHONPATH=src uses its own templates, not those of another installed copy."""
    here = Path(__file__).resolve()
    checkout = here.parents[3]
    if here.parents[2].name == "src" and (checkout / "pyproject.toml").is_file() \
            and (checkout / "templates" / TEMPLATE).is_file():
        return checkout / "templates"
    return None


def _packaged_templates() -> Traversable | None:
    """The templates shipped inside the installed package (wheel, `pip install .`, `pip install -e .`)."""
    try:
        folder = resources.files(TEMPLATES_PACKAGE)
    except ModuleNotFoundError:
        return None
    return folder if folder.joinpath(TEMPLATE).is_file() else None


def templates_dir(override: Path | None = None) -> Traversable:
    """The templates folder: the argument, else $GRIDLAB_TEMPLATES, else the checkout's top-level templates/ when
    gridlab runs from a checkout, else the copy installed with the package (found with importlib.resources)."""
    given = ((override, "the templates argument"), (os.environ.get(TEMPLATES_ENV), f"${TEMPLATES_ENV}"))
    for candidate, origin in given:
        if candidate is None:
            continue
        folder = Path(candidate)
        if not (folder / TEMPLATE).is_file():
            raise UserError(f"{origin} points at {folder}, which has no {TEMPLATE}")
        return folder
    found = _checkout_templates() or _packaged_templates()
    if found is None:
        raise UserError(f"report templates not found: this gridlab installation has no {TEMPLATES_PACKAGE} "
                        f"(reinstall it) and no checkout templates/; or set {TEMPLATES_ENV} to a templates/ folder")
    return found


def _when(value) -> str:
    """A timestamp from the grid table (epoch seconds as the store writes it, or a datetime) in UTC."""
    if value is None:
        return "–"
    if isinstance(value, int | float):
        return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return str(value)


def environment(folder: Traversable) -> jinja2.Environment:
    def load(name: str):
        source = folder.joinpath(name)
        return (source.read_text(encoding="utf-8"), None, None) if source.is_file() else None

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(load), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(tokens=format_tokens, number=format_number, signed=format_signed, when=_when)
    return env


def _figure_markup(figure: plots.Figure, for_pdf: bool) -> Markup:
    """Inline SVG for the HTML file; for WeasyPrint an <img> of the same SVG as a data URI, which it draws as a
    vector image without running the page's CSS cascade over every SVG node (about twice as fast)."""
    if not for_pdf:
        return Markup(figure.svg)
    encoded = base64.b64encode(figure.svg.encode("utf-8")).decode("ascii")
    return Markup('<img class="figure" alt="{}" src="data:image/svg+xml;base64,{}">').format(figure.alt, encoded)


def render_html(analysis: Analysis, figures: dict[str, list[plots.Figure]], folder: Traversable, generated: str,
                for_pdf: bool = False) -> str:
    # Only the SVG that plots.py produced is marked safe; it escapes its own text (matplotlib's XML writer).
    figure_context = {
        section: [dict(key=f.key, title=f.title, caption=f.caption, alt=f.alt, svg=_figure_markup(f, for_pdf))
                  for f in items]
        for section, items in figures.items()
    }
    return environment(folder).get_template(TEMPLATE).render(
        a=analysis,
        grid=analysis.grid,
        generated=generated,
        gridlab_version=gridlab.__version__,
        figures=figure_context,
        spec_text=json.dumps(analysis.spec, indent=2, sort_keys=True) if analysis.spec else "",
        setting_names=SETTING_NAMES,
        setting2_text=setting2_text,
        slope_text=slope_text,
        total_cells=sum(analysis.counts.values()),
    )


# A second process draws the crossover plots and training curves while this one draws the rest, when the grid has
# at least this many method × ratio pairs (the default study has 24): matplotlib is single-threaded, and the report's
# other core is otherwise idle until Chromium prints.
PARALLEL_MIN_PAIRS = 12
REMOTE_KINDS = ("crossover", "curves")


def plot_worker(results: Results) -> PlotWorker | None:
    """A second process that imports matplotlib now (while this one analyses), or None for a small grid or a single
    core."""
    pairs = results.cells.select("method", "ratio").unique().height
    if pairs < PARALLEL_MIN_PAIRS or (os.cpu_count() or 1) < 2:
        return None
    return PlotWorker()


def make_figures(analysis: Analysis, worker: PlotWorker | None = None) -> dict[str, list[plots.Figure]]:
    """Every figure, by kind; with a worker, REMOTE_KINDS are drawn there in parallel (and here if it fails)."""
    if worker is not None:
        worker.draw(analysis, REMOTE_KINDS)
    figures = plots.draw(analysis, [k for k in plots.FIGURE_KINDS if worker is None or k not in REMOTE_KINDS])
    if worker is not None:
        try:
            figures.update(worker.result())
        except (RuntimeError, OSError, pickle.UnpicklingError, EOFError) as error:
            warnings.warn(f"the plotting process failed ({error}); drawing its figures here", stacklevel=2)
            figures.update(plots.draw(analysis, REMOTE_KINDS))
    return {kind: figures[kind] for kind in plots.FIGURE_KINDS}


def verdicts_csv(analysis: Analysis) -> str:
    """verdicts.csv (tables.VERDICT_COLUMNS): one row per cell, d_eff_tokens from the analysis' `transfer` frame
    when it has one."""
    return verdict_table(analysis.gaps, getattr(analysis, "transfer", None),
                         getattr(analysis, "comparisons", None)).write_csv(float_precision=6)


def check_options(pool: str, margin: float | None) -> None:
    """One line for a pooling or margin the report cannot use (a user error, before anything runs)."""
    if pool in REMOVED_POOLING:
        raise UserError(f"pooling {pool!r} was removed ({REMOVED_POOLING[pool]}, and under-covers); valid: "
                        f"{', '.join(POOLING)}")
    if pool not in POOLING:
        raise UserError(f"unknown pooling {pool!r}; valid: {', '.join(POOLING)}")
    if margin is not None and not (isinstance(margin, int | float) and 0 < margin < float("inf")):
        raise UserError(f"margin {margin!r} must be a positive number in the headline metric's units (e.g. 0.02 "
                        f"nats)")


def build_report(db_path: Path, out_dir: Path, metric: str = "val_loss", templates: Path | None = None,
                 timings: dict | None = None, pdf_engine: str = "auto", pool: str = "model",
                 margin: float | None = None) -> dict[str, Path]:
    """Write out_dir/index.html, out_dir/summary.md, out_dir/verdicts.csv, out_dir/predictions.csv and
    out_dir/report.pdf for a results database; returns {"html", "summary", "verdicts", "predictions", "pdf": path}.

    `pool` is the interval model (stats.POOLING: "model", the mixed model; "none", each cell's own paired t);
    `margin` the equivalence margin in the headline metric's units (None: the grid spec's `[report] margin`). The
    PDF is index.html
    printed by headless Chromium when it is installed (`pdf_engine="auto"` or "chromium"), else by WeasyPrint
    (`"weasyprint"`, or "auto" when Chromium is missing or fails, with a warning). Chromium starts before the
    analysis so that its start-up overlaps it; for a large grid a second process draws half of the figures
    (PARALLEL_MIN_PAIRS). `timings`, when given, receives the seconds spent in analysis,
    plotting, HTML rendering and PDF rendering, and the engine used.
    """
    if pdf_engine not in PDF_ENGINES:
        raise UserError(f"unknown PDF engine {pdf_engine!r}; valid: {', '.join(PDF_ENGINES)}")
    check_options(pool, margin)
    executable = find_chromium() if pdf_engine != "weasyprint" else None
    if pdf_engine == "chromium" and executable is None:
        raise UserError("PDF engine chromium requested but no chromium executable is on PATH "
                        "(Debian: apt-get install chromium), or use pdf_engine='weasyprint'")
    folder = templates_dir(templates)
    out_dir = Path(out_dir)
    clock = time.perf_counter()
    browser = DevTools(executable) if executable else None
    worker = None
    try:
        results = read_results(Path(db_path))
        worker = plot_worker(results)
        analysis = analyse(results, metric, pool, margin)
        after_analysis = time.perf_counter()
        figures = make_figures(analysis, worker)
        after_plots = time.perf_counter()
        generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        html = render_html(analysis, figures, folder, generated)
        paths = {"html": out_dir / "index.html", "summary": out_dir / "summary.md",
                 "verdicts": out_dir / "verdicts.csv", "predictions": out_dir / "predictions.csv",
                 "pdf": out_dir / "report.pdf"}
        atomic.write_text(paths["html"], html)
        atomic.write_text(paths["summary"], summary_markdown(analysis, generated))
        atomic.write_text(paths["verdicts"], verdicts_csv(analysis))
        atomic.write_text(paths["predictions"], predictions_csv(analysis.predictions))
        after_html = time.perf_counter()
        engine = "weasyprint"
        if browser is not None:
            try:
                atomic.write_bytes(paths["pdf"], browser.print_to_pdf(paths["html"]))
                engine = "chromium"
            except (TimeoutError, EOFError, RuntimeError, OSError) as error:
                if pdf_engine == "chromium":
                    raise RuntimeError(f"chromium could not print {paths['html']} to PDF: {error}") from error
                warnings.warn(f"chromium could not print the report to PDF ({error}); WeasyPrint prints it instead",
                              stacklevel=2)
        if engine == "weasyprint":
            import weasyprint  # imported here: it loads Pango, which only this route needs

            pdf_html = render_html(analysis, figures, folder, generated, for_pdf=True)
            atomic.write_bytes(paths["pdf"], weasyprint.HTML(string=pdf_html, base_url=str(out_dir)).write_pdf())
    finally:
        if worker is not None:
            worker.close()
        if browser is not None:
            browser.close()
    if timings is not None:
        timings.update(analysis=after_analysis - clock, plots=after_plots - after_analysis,
                       html=after_html - after_plots, pdf=time.perf_counter() - after_html, engine=engine)
    return paths
