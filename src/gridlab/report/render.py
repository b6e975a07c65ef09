"""Analysis + figures → index.html (self-contained) and report.pdf (headless Chromium, else WeasyPrint), written
atomically."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import jinja2
from markupsafe import Markup

import gridlab
from gridlab.errors import UserError
from gridlab.report import plots
from gridlab.report.analyse import Analysis, analyse, format_tokens, read_results
from gridlab.report.chromium import DevTools, find_chromium

TEMPLATES_ENV = "GRIDLAB_TEMPLATES"
TEMPLATE = "report.html.j2"
# src/gridlab/report/render.py → the checkout's top-level templates/ (an editable install runs from the checkout).
CHECKOUT_TEMPLATES = Path(__file__).resolve().parents[3] / "templates"


def templates_dir(override: Path | None = None) -> Path:
    """The templates folder: the argument, else $GRIDLAB_TEMPLATES, else the checkout's top-level templates/."""
    for candidate, origin in ((override, "the templates argument"),
                              (os.environ.get(TEMPLATES_ENV), f"${TEMPLATES_ENV}"),
                              (CHECKOUT_TEMPLATES, "the gridlab checkout")):
        if candidate is None:
            continue
        folder = Path(candidate)
        if (folder / TEMPLATE).is_file():
            return folder
        if origin != "the gridlab checkout":
            raise UserError(f"{origin} points at {folder}, which has no {TEMPLATE}")
    raise UserError(
        f"report templates not found: install gridlab editable from its checkout (pip install -e .) "
        f"or set {TEMPLATES_ENV} to the checkout's templates/ folder"
    )


def _number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}"


def _signed(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}g}"


def _when(value) -> str:
    """A timestamp from the grid table (epoch seconds as the store writes it, or a datetime) in UTC."""
    if value is None:
        return "–"
    if isinstance(value, int | float):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return str(value)


def environment(folder: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(tokens=format_tokens, number=_number, signed=_signed, when=_when)
    return env


def _figure_markup(figure: plots.Figure, for_pdf: bool) -> Markup:
    """Inline SVG for the HTML file; for WeasyPrint an <img> of the same SVG as a data URI, which it draws as a
    vector image without running the page's CSS cascade over every SVG node (about twice as fast)."""
    if not for_pdf:
        return Markup(figure.svg)
    encoded = base64.b64encode(figure.svg.encode("utf-8")).decode("ascii")
    return Markup('<img class="figure" alt="{}" src="data:image/svg+xml;base64,{}">').format(figure.title, encoded)


def render_html(analysis: Analysis, figures: dict[str, list[plots.Figure]], folder: Path, generated: str,
                for_pdf: bool = False) -> str:
    # Only the SVG that plots.py produced is marked safe; it escapes its own text (matplotlib's XML writer).
    figure_context = {
        section: [dict(key=f.key, title=f.title, caption=f.caption, svg=_figure_markup(f, for_pdf)) for f in items]
        for section, items in figures.items()
    }
    grid = analysis.grid
    return environment(folder).get_template(TEMPLATE).render(
        a=analysis,
        grid=grid,
        generated=generated,
        gridlab_version=gridlab.__version__,
        figures=figure_context,
        spec_text=json.dumps(analysis.spec, indent=2, sort_keys=True) if analysis.spec else "",
        setting_names={1: "Setting 1 — same budget", 2: "Setting 2 — whole-pipeline budget"},
        total_cells=sum(analysis.counts.values()),
    )


def _write_atomically(path: Path, write) -> None:
    descriptor, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)  # mkstemp creates 0600; a report is meant to be shared
    try:
        write(Path(temp))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


PDF_ENGINES = ("auto", "chromium", "weasyprint")


def build_report(db_path: Path, out_dir: Path, metric: str = "val_loss", templates: Path | None = None,
                 timings: dict | None = None, pdf_engine: str = "auto") -> dict[str, Path]:
    """Write out_dir/index.html and out_dir/report.pdf for a results database; returns {"html": ..., "pdf": ...}.

    The PDF is index.html printed by headless Chromium when it is installed (`pdf_engine="auto"` or "chromium"),
    else by WeasyPrint (`"weasyprint"`, or "auto" when Chromium is missing or fails, with a warning). Chromium starts
    before the analysis so that its start-up overlaps it. `timings`, when given, receives the seconds spent in analysis, plotting, HTML rendering
    and PDF rendering, and the engine used.
    """
    if pdf_engine not in PDF_ENGINES:
        raise UserError(f"unknown PDF engine {pdf_engine!r}; valid: {', '.join(PDF_ENGINES)}")
    executable = find_chromium() if pdf_engine != "weasyprint" else None
    if pdf_engine == "chromium" and executable is None:
        raise UserError("PDF engine chromium requested but no chromium executable is on PATH "
                         "(Debian: apt-get install chromium), or use pdf_engine='weasyprint'")
    folder = templates_dir(templates)
    out_dir = Path(out_dir)
    clock = time.perf_counter()
    browser = DevTools(executable) if executable else None
    try:
        analysis = analyse(read_results(Path(db_path)), metric)
        after_analysis = time.perf_counter()
        colours = plots.method_colours(analysis.summary["method"].to_list() + analysis.curves["method"].to_list())
        figures = {
            "crossover": plots.crossover_figures(analysis, colours),
            "heatmap": plots.gap_heatmaps(analysis),
            "curves": plots.training_curve_figures(analysis, colours),
        }
        after_plots = time.perf_counter()
        generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        html = render_html(analysis, figures, folder, generated)
        out_dir.mkdir(parents=True, exist_ok=True)
        html_path, pdf_path = out_dir / "index.html", out_dir / "report.pdf"
        _write_atomically(html_path, lambda temp: temp.write_text(html, encoding="utf-8"))
        after_html = time.perf_counter()
        engine = "weasyprint"
        if browser is not None:
            try:
                pdf = browser.print_to_pdf(html_path)
                _write_atomically(pdf_path, lambda temp: temp.write_bytes(pdf))
                engine = "chromium"
            except (TimeoutError, EOFError, RuntimeError, OSError) as error:
                if pdf_engine == "chromium":
                    raise RuntimeError(f"chromium could not print {html_path} to PDF: {error}") from error
                warnings.warn(f"chromium could not print the report to PDF ({error}); WeasyPrint prints it instead",
                              stacklevel=2)
        if engine == "weasyprint":
            import weasyprint  # imported here: it loads Pango, which only this route needs

            pdf_html = render_html(analysis, figures, folder, generated, for_pdf=True)
            _write_atomically(pdf_path, lambda temp: weasyprint.HTML(string=pdf_html, base_url=str(out_dir))
                              .write_pdf(temp))
    finally:
        if browser is not None:
            browser.close()
    if timings is not None:
        timings.update(analysis=after_analysis - clock, plots=after_plots - after_analysis,
                       html=after_html - after_plots, pdf=time.perf_counter() - after_html, engine=engine)
    return {"html": html_path, "pdf": pdf_path}
