"""build_report end to end on synthetic databases: the files, self-contained HTML, alt text, escaping, summary.md,
partial and all-pending grids, template lookup, PDF engines."""

import os
import re

import pytest
from pypdf import PdfReader

from gridlab.errors import UserError
from gridlab.report import build_report, render
from gridlab.report.chromium import find_chromium
from gridlab.report.render import TEMPLATES_ENV, templates_dir

from report_synthetic import build_cells, finish, noise, parent_loss, power_law, write_db

BUDGETS = [1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000]
P = 50_000_000
HOSTILE = "<script>alert('x')</script>"
SECTION_HEADINGS = [
    "Methods", "Recommendation table — Setting 1 — same budget",
    "Recommendation table — Setting 2 — whole-pipeline budget", "Crossover budgets", "Effective data transferred",
    "Setting 2, judged by what it needs", "Gap heatmaps", "Training curves", "Cost of pruning",
    "Results per cell group", "What is missing", "Grid specification",
]


def _loss(method, ratio, init, setting, tokens, seed):
    if tokens == 0:
        return 8.0 + 0.01 * seed
    curve = power_law(2.0, 0.5, 0.3) if init == "pruned" else power_law(1.9, 2.0, 0.5)
    measured = noise(method, ratio, init, setting, tokens, seed).normal(0, 0.004)  # what a measurement adds
    return curve(tokens) + 0.002 * (seed - 0.5) + 0.05 * ratio + measured


@pytest.fixture(scope="module", params=["chromium", "weasyprint"])
def full_report(request, tmp_path_factory):
    if request.param == "chromium" and find_chromium() is None:
        pytest.skip("chromium is not installed")
    folder = tmp_path_factory.mktemp("full")
    cells = build_cells(["shortgpt", "wanda"], [0.5, 0.7], BUDGETS, [0, 1], P, references=True)
    metrics = finish(cells, _loss)
    db = write_db(folder / "results.duckdb", cells, metrics, name="full-grid", parent_tokens=P,
                  spec={"name": "full-grid", "methods": ["shortgpt", "wanda"]}, parent_metrics=parent_loss(2.3, P),
                  parent_params=2_500_000)
    return build_report(db, folder / "report", pdf_engine=request.param)


def _text(paths):
    html = paths["html"].read_text(encoding="utf-8")
    pdf = "\n".join(page.extract_text() for page in PdfReader(paths["pdf"]).pages)
    return html, re.sub(r"\s+", " ", pdf)


def test_four_files_written_whole_and_shareable(full_report):
    assert set(full_report) == {"html", "summary", "verdicts", "predictions", "pdf"}
    assert [full_report[k].name for k in ("html", "summary", "verdicts", "predictions", "pdf")] == [
        "index.html", "summary.md", "verdicts.csv", "predictions.csv", "report.pdf"]
    assert full_report["pdf"].read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in full_report["html"].parent.iterdir()) == [
        "index.html", "predictions.csv", "report.pdf", "summary.md", "verdicts.csv"]
    umask = os.umask(0)
    os.umask(umask)
    for path in full_report.values():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: a report is meant to be shared


def test_html_is_self_contained_and_every_figure_has_alt_text(full_report):
    html, _ = _text(full_report)
    assert "<script" not in html and "<link" not in html
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    assert not re.search(r"url\((?!#)", html)  # only in-document references such as clip paths
    svgs = re.findall(r'<svg class="figure" role="img" aria-label="([^"]+)"[^>]*>\s*<title>([^<]+)</title>', html)
    # the verdict map, a gap trend per setting, crossover + heatmap + training curves per granularity, D_eff
    assert len(svgs) == 1 + 2 + 3 * 2 + 1 == len(re.findall("<svg ", html))
    assert all(len(label) > 40 and label == title for label, title in svgs)
    assert svgs[0][0].startswith("Verdict map. Setting 1: 20 prune, 0 equivalent, 0 inconclusive, 0 scratch of 20 "
                                 "squares.")


def test_the_answer_comes_first(full_report):
    html, _ = _text(full_report)
    body = html.split("<body>", 1)[1]
    first = re.sub(r"<[^>]+>", " ", body.split('<table class="facts">', 1)[0])
    assert "gridlab report — full-grid" in first
    assert first.count("Setting 1 (random init trains the same B tokens)") == 1
    assert "Setting 2 favours pruning exactly when the pruned start is worth more than the parent" in first
    assert "the parent saw 20 tokens per parameter" in html  # the setting-2 section, after the answer
    assert body.index('id="verdict-map"') < body.index('<table class="facts">') < body.index('id="methods"')


def test_pdf_has_every_section_heading_and_the_answers(full_report):
    html, pdf = _text(full_report)
    for heading in SECTION_HEADINGS:
        assert heading in pdf, heading
        assert heading.split(" — ")[0] in html
    assert "gridlab report — full-grid" in pdf
    assert "2025-11-24 16:00 UTC" in pdf  # grid.submitted_at, epoch seconds as the store writes it
    assert "The answer: prune or train from scratch" in pdf
    assert "extrapolation" in pdf
    assert "Hold-out check: fitted without the largest budget (16M tokens)" in pdf


def test_summary_markdown_has_the_verdict_tables_and_sentences(full_report):
    summary = full_report["summary"].read_text(encoding="utf-8")
    assert summary.startswith("# gridlab report — full-grid: summary\n")
    assert "## The answer — Setting 1 — same budget" in summary
    assert "## Verdicts per method — Setting 2 — whole-pipeline budget" in summary
    assert "| granularity | method | ratio | B = 1M | B = 2M | B = 4M | B = 8M | B = 16M |" in summary
    assert re.search(r"\| depth \| shortgpt \| 0\.5 \| -[0-9.]+ ± [0-9.e-]+ prune \(n=2\) \|", summary)
    assert "Sensitivity check (each cell's own paired t): 0 of 20 verdicts change." in summary
    assert "## Setting 2, judged by what it needs" in summary and "## Crossovers" in summary
    assert "## Effective data transferred" in summary and "- Hold-out check: fitted without" in summary
    assert re.search(r"\| depth \| shortgpt \| 0\.5 \| \+[0-9.]+[kM] \[", summary)  # D_eff with its interval
    assert "−" not in summary.split("## The answer", 1)[1].split("## Crossovers")[0]  # ASCII signs in the tables


def test_partial_grid_with_hostile_names_is_escaped_and_lists_what_is_missing(tmp_path):
    cells = build_cells([HOSTILE, "wanda"], [0.5], BUDGETS, [0, 1], P, granularity={HOSTILE: "depth"})
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
    assert "tokens per parameter are unknown" in html  # no parent_params in this database
    assert "| grid <script>" not in paths["summary"].read_text()  # pipes are escaped, text stays literal


def test_all_pending_grid_renders(tmp_path):
    cells = build_cells(["shortgpt"], [0.5], BUDGETS[:2], [0], P)
    db = write_db(tmp_path / "results.duckdb", cells, [])
    html, pdf = _text(build_report(db, tmp_path / "report"))
    assert "pending 8" in re.sub(r"<[^>]+>", "", html)
    assert "No pruned/random pair has finished yet" in html
    assert "Results per cell group" in pdf


def test_templates_are_found_from_the_checkout_and_overridable(tmp_path, monkeypatch):
    found = templates_dir()
    assert found.joinpath("report.html.j2").is_file()
    assert str(found) == str(render._checkout_templates())  # this checkout's own templates/, not another install's
    monkeypatch.setenv(TEMPLATES_ENV, str(tmp_path))
    with pytest.raises(UserError, match=r"\$GRIDLAB_TEMPLATES points at .* which has no report.html.j2"):
        templates_dir()
    with pytest.raises(UserError, match="the templates argument points at"):
        templates_dir(tmp_path / "nowhere")


def test_unknown_pdf_engine_pooling_and_margin_are_refused(tmp_path):
    db = write_db(tmp_path / "results.duckdb", build_cells(["shortgpt"], [0.5], BUDGETS[:1], [0], P), [])
    with pytest.raises(UserError, match="unknown PDF engine 'latex'; valid: auto, chromium, weasyprint"):
        build_report(db, tmp_path / "report", pdf_engine="latex")
    with pytest.raises(UserError, match="unknown pooling 'all'; valid: model, none"):
        build_report(db, tmp_path / "report", pool="all")
    with pytest.raises(UserError, match="pooling 'seeds' was removed .*under-covers.*; valid: model, none"):
        build_report(db, tmp_path / "report", pool="seeds")
    with pytest.raises(UserError, match="margin -0.1 must be a positive number"):
        build_report(db, tmp_path / "report", margin=-0.1)


def test_auto_engine_falls_back_to_weasyprint_when_chromium_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "find_chromium", lambda: "/bin/false")  # exits at once: the DevTools pipe closes
    db = write_db(tmp_path / "results.duckdb", build_cells(["shortgpt"], [0.5], BUDGETS[:1], [0], P), [])
    timings = {}
    with pytest.warns(UserWarning, match="chromium could not print the report to PDF"):
        paths = build_report(db, tmp_path / "report", timings=timings)
    assert timings["engine"] == "weasyprint"
    assert "Results per cell group" in _text(paths)[1]
    with pytest.raises(RuntimeError, match="chromium could not print .*index.html to PDF"):
        build_report(db, tmp_path / "again", pdf_engine="chromium")


def test_a_second_process_draws_the_same_figures_and_a_failing_one_is_replaced(tmp_path, monkeypatch):
    cells = build_cells(["shortgpt", "wanda"], [0.5, 0.7], BUDGETS[:4], [0, 1], P)
    db = write_db(tmp_path / "results.duckdb", cells, finish(cells, _loss), parent_tokens=P)
    from gridlab.report.analyse import analyse
    from gridlab.report.plotworker import PlotWorker
    from gridlab.report.read import read_results

    analysis = analyse(read_results(db))
    here = render.make_figures(analysis)
    worker = PlotWorker()
    try:
        there = render.make_figures(analysis, worker)
    finally:
        worker.close()
    assert {k: [f.svg for f in v] for k, v in there.items()} == {k: [f.svg for f in v] for k, v in here.items()}
    broken = PlotWorker()
    broken.process.kill()
    try:
        with pytest.warns(UserWarning, match="the plotting process failed"):
            again = render.make_figures(analysis, broken)
    finally:
        broken.close()
    assert [f.key for f in again["crossover"]] == [f.key for f in here["crossover"]]
    assert render.plot_worker(read_results(db)) is None  # 4 method × ratio pairs: not worth a process


def test_verdicts_csv_has_every_cell_and_the_regime_warns_on_the_first_screen(tmp_path):
    """verdicts.csv: one row per cell with the documented columns (d_eff_tokens empty without a transfer analysis);
    a grid of 10–40 optimizer steps per budget is warned about right under the answer, and the margin comes from the
    grid's [report] table unless --margin overrides it."""
    import polars as pl

    cells = build_cells(["shortgpt", "wanda"], [0.5, 0.7], BUDGETS[:3], [0, 1, 2], P)
    rng = __import__("numpy").random.default_rng(0)
    metrics = finish(cells, lambda m, r, i, s, tok, seed: _loss(m, r, i, s, tok, seed) + rng.normal(0, 0.01))
    spec = {"name": "steps", "seq_len": 1000, "schedule": {"batch_size": 100}, "evaluation": {"max_sequences": 64},
            "report": {"margin": 0.05, "margins": {}}}
    db = write_db(tmp_path / "results.duckdb", cells, metrics, name="steps", parent_tokens=P, spec=spec)
    paths = build_report(db, tmp_path / "report", pdf_engine="weasyprint")
    table = pl.read_csv(paths["verdicts"])
    assert table.columns == ["setting", "method", "granularity", "ratio", "budget_tokens", "n_seeds", "gap", "lo95",
                             "hi95", "verdict", "d_eff_tokens", "d_eff_low", "d_eff_high", "d_eff_bound",
                             "lr_pruned", "lr_random", "lr_embeddings", "gap_embeddings", "lo95_embeddings",
                             "hi95_embeddings", "verdict_embeddings", "embeddings_share", "embeddings_share_low",
                             "embeddings_share_high"]
    assert table["lr_pruned"].null_count() == table.height   # a database without lr: unknown, not invented
    assert table.height == 2 * 2 * 3 * 2  # methods × ratios × budgets × settings
    assert set(table["verdict"]) <= {"prune", "scratch", "equivalent", "inconclusive"}
    assert set(table["n_seeds"]) == {3}
    assert (table["lo95"] <= table["gap"]).all() and (table["gap"] <= table["hi95"]).all()
    html = paths["html"].read_text(encoding="utf-8")
    first = re.sub(r"<[^>]+>", " ", html.split('<table class="facts">', 1)[0])
    assert "Every budget is under 100 optimizer steps of 100k tokens — B (steps): 1M (10), 2M (20), 4M (40)" in first
    assert first.index("Warning.") < html.index('id="verdict-map"')
    assert "64 sequences × 1000 tokens = 64k tokens" in first and "margin ±0.05" in first
    again = build_report(db, tmp_path / "again", pdf_engine="weasyprint", margin=0.2)
    assert "margin ±0.2" in again["html"].read_text(encoding="utf-8")


def test_predictions_csv_has_every_budget_and_two_extrapolations_per_group(full_report):
    import polars as pl

    table = pl.read_csv(full_report["predictions"])
    assert table.columns[:7] == ["setting", "method", "ratio", "budget_tokens", "predicted_gap", "lo90", "hi90"]
    # 2 methods × 2 ratios × 2 settings, each at the 5 budgets and at 2× and 4× the largest
    assert table.height == 8 * 7
    assert sorted(table["budget_tokens"].unique()) == [*BUDGETS, 2 * BUDGETS[-1], 4 * BUDGETS[-1]]
    known = table.drop_nulls("predicted_gap")
    assert known.height
    assert ((known["lo90"] <= known["predicted_gap"]) & (known["predicted_gap"] <= known["hi90"])).all()
    assert set(table.filter(pl.col("budget_tokens") > BUDGETS[-1])["extrapolated"]) == {True}
