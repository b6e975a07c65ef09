"""build_report end to end on synthetic databases: both files, self-contained HTML, escaping, partial grids."""

import re

import pytest
from pypdf import PdfReader
from report_synthetic import build_cells, finish, power_law, write_db

from gridlab.report import build_report
from gridlab.report import render
from gridlab.report.chromium import find_chromium
from gridlab.report.render import TEMPLATES_ENV, templates_dir

BUDGETS = [1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000]
HOSTILE = "<script>alert('x')</script>"
SECTION_HEADINGS = [
    "Methods", "Summary", "Recommendation table — Setting 1 — same budget",
    "Recommendation table — Setting 2 — whole-pipeline budget", "Crossover budgets", "Gap heatmaps",
    "Training curves", "Cost of pruning", "Results per cell group", "What is missing", "Grid specification",
]


def _loss(method, ratio, init, setting, tokens, seed):
    curve = power_law(2.0, 0.5, 0.3) if init == "pruned" else power_law(1.9, 2.0, 0.5)
    return curve(tokens) + 0.002 * (seed - 0.5) + 0.05 * ratio


@pytest.fixture(scope="module", params=["chromium", "weasyprint"])
def full_report(request, tmp_path_factory):
    if request.param == "chromium" and find_chromium() is None:
        pytest.skip("chromium is not installed")
    folder = tmp_path_factory.mktemp("full")
    cells = build_cells(["shortgpt", "wanda"], [0.5, 0.7], BUDGETS, [0, 1], 50_000_000)
    metrics = finish(cells, _loss)
    db = write_db(folder / "results.duckdb", cells, metrics, name="full-grid",
                  spec={"name": "full-grid", "methods": ["shortgpt", "wanda"]})
    return build_report(db, folder / "report", pdf_engine=request.param)


def _text(paths):
    html = paths["html"].read_text(encoding="utf-8")
    pdf = "\n".join(page.extract_text() for page in PdfReader(paths["pdf"]).pages)
    return html, pdf


def test_both_files_written_atomically(full_report):
    assert set(full_report) == {"html", "pdf"}
    assert full_report["html"].name == "index.html" and full_report["pdf"].name == "report.pdf"
    assert full_report["pdf"].read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in full_report["html"].parent.iterdir()) == ["index.html", "report.pdf"]


def test_html_is_self_contained(full_report):
    html, _ = _text(full_report)
    assert "<script" not in html and "<link" not in html
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    assert not re.search(r"url\((?!#)", html)  # only in-document references such as clip paths
    svgs = re.findall(r"<svg class=\"figure\"", html)
    # crossover + heatmap + training curves, one each per granularity (depth, sparse)
    assert len(svgs) == 6


def test_pdf_has_every_section_heading_and_the_answers(full_report):
    html, pdf = _text(full_report)
    flat = re.sub(r"\s+", " ", pdf)
    for heading in SECTION_HEADINGS:
        assert heading in flat, heading
        assert heading.split(" — ")[0] in html
    assert "gridlab report — full-grid" in flat
    assert "2025-11-24 16:00 UTC" in flat  # grid.submitted_at, epoch seconds as the store writes it
    assert "prune (shortgpt)" in flat and "prune (wanda)" in flat
    assert "extrapolated" in flat


def test_partial_grid_with_hostile_names_is_escaped_and_lists_what_is_missing(tmp_path):
    cells = build_cells([HOSTILE, "wanda"], [0.5], BUDGETS, [0, 1], 50_000_000,
                        granularity={HOSTILE: "depth"})
    metrics = finish(cells, _loss, done=lambda c: c["budget_tokens"] <= 4_000_000)
    failed = next(c for c in cells if c["status"] == "pending" and c["method"] == "wanda")
    failed["status"], failed["error"] = "failed", f"RuntimeError: {HOSTILE}"
    db = write_db(tmp_path / "results.duckdb", cells, metrics, name=f"grid {HOSTILE}", parent=HOSTILE)
    paths = build_report(db, tmp_path / "report")
    html, pdf = _text(paths)
    assert "<script" not in html
    assert "&lt;script&gt;" in html  # escaped by Jinja2 in tables and headers
    assert "&lt;script&gt;alert" in html.split("<svg", 1)[1]  # escaped by matplotlib inside the figures
    missing = html.split('id="missing"', 1)[1].split("</section>", 1)[0]
    assert "pending" in missing and "failed" in missing and "RuntimeError: &lt;script&gt;" in missing
    assert "8M, 16M" in missing
    assert "What is missing" in pdf and "pending" in pdf


def test_all_pending_grid_renders(tmp_path):
    cells = build_cells(["shortgpt"], [0.5], BUDGETS[:2], [0], 50_000_000)
    db = write_db(tmp_path / "results.duckdb", cells, [])
    html, pdf = _text(build_report(db, tmp_path / "report"))
    assert "pending 8" in re.sub(r"<[^>]+>", "", html)
    assert "No pruned/random pair has finished yet" in html
    assert "Results per cell group" in pdf


def test_templates_are_found_from_the_checkout_and_overridable(tmp_path, monkeypatch):
    assert (templates_dir() / "report.html.j2").is_file()
    monkeypatch.setenv(TEMPLATES_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=r"\$GRIDLAB_TEMPLATES points at .* which has no report.html.j2"):
        templates_dir()
    with pytest.raises(ValueError, match="the templates argument points at"):
        templates_dir(tmp_path / "nowhere")


def test_unknown_pdf_engine_is_refused(tmp_path):
    db = write_db(tmp_path / "results.duckdb", build_cells(["shortgpt"], [0.5], BUDGETS[:1], [0], 50_000_000), [])
    with pytest.raises(ValueError, match="unknown PDF engine 'latex'; valid: auto, chromium, weasyprint"):
        build_report(db, tmp_path / "report", pdf_engine="latex")


def test_auto_engine_falls_back_to_weasyprint_when_chromium_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "find_chromium", lambda: "/bin/false")  # exits at once: the DevTools pipe closes
    db = write_db(tmp_path / "results.duckdb", build_cells(["shortgpt"], [0.5], BUDGETS[:1], [0], 50_000_000), [])
    timings = {}
    with pytest.warns(UserWarning, match="chromium could not print the report to PDF"):
        paths = build_report(db, tmp_path / "report", timings=timings)
    assert timings["engine"] == "weasyprint"
    assert "Results per cell group" in _text(paths)[1]
    with pytest.raises(RuntimeError, match="chromium could not print .*index.html to PDF"):
        build_report(db, tmp_path / "again", pdf_engine="chromium")
