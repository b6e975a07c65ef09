"""The report's HTML in real headless Chromium, driven over the DevTools protocol on a pipe (report/chromium.py):
the answer on the first screen, no horizontal overflow at 1400 and 800 px, alt text, figures that fit a PDF page."""

import base64
import json
import re

import pytest
from pypdf import PdfReader

from gridlab.report import build_report
from gridlab.report.chromium import DevTools, find_chromium

from report_synthetic import build_cells, finish, parent_loss, write_db

CHROMIUM = find_chromium()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]
P = 150_000
SCREEN_HEIGHT = 900
# A4 landscape minus the @page margins (12 mm left and right, 14 mm top, 16 mm bottom), in CSS pixels.
PRINT_WIDTH, PRINT_HEIGHT = round(273 / 25.4 * 96), round(180 / 25.4 * 96)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A grid of the default study's shape (6 methods, 4 ratios, 4 budgets, 2 seeds, B = 0 references), some cells
    missing, so that every section has content."""
    folder = tmp_path_factory.mktemp("browser")
    methods = ["shortgpt", "minitron-depth", "minitron-width", "llm-pruner", "wanda", "sparsegpt"]
    budgets = [10_000 * 2**i for i in range(4)]
    cells = build_cells(methods, [0.5, 0.6, 0.7, 0.8], budgets, [0, 1], P, references=True)

    def loss(method, ratio, init, setting, tokens, seed):
        if tokens == 0:
            return 7.0 + 0.01 * seed
        scratch = 6.5 - 0.4 * (tokens / 1e4) ** 0.3
        shrink = 1.2 - 0.25 * (tokens / 1e4) ** 0.5
        return scratch - (shrink if init == "pruned" else 0) + 0.01 * (seed - 0.5) + 0.05 * ratio

    metrics = finish(cells, loss, done=lambda c: c["seed"] == 0 or c["budget_tokens"] < 80_000)
    # The default study's schedule: 1,024 tokens a step, so every budget is warned about on the first screen.
    db = write_db(folder / "results.duckdb", cells, metrics, parent_tokens=P, parent_metrics=parent_loss(5.9, P),
                  name="browser-grid", spec={"name": "browser-grid", "seq_len": 64, "schedule": {"batch_size": 16},
                                             "evaluation": {"max_sequences": 256}})
    return build_report(db, folder / "report")


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    """The smoke grid's shape (examples/smoke.toml): every method, 2 ratios, 2 budgets, one seed — no square has an
    interval, so none may show a verdict."""
    folder = tmp_path_factory.mktemp("smoke")
    methods = ["shortgpt", "minitron-depth", "minitron-width", "llm-pruner", "wanda", "sparsegpt"]
    cells = build_cells(methods, [0.5, 0.7], [4096, 8192], [0], P, references=True)
    metrics = finish(cells, lambda m, r, i, s, tokens, seed: 7.0 - (0.3 if i == "pruned" else 0.0) + 0.01 * r)
    db = write_db(folder / "results.duckdb", cells, metrics, parent_tokens=P, parent_metrics=parent_loss(5.9, P),
                  name="smoke", spec={"seq_len": 32, "schedule": {"batch_size": 8}})
    return build_report(db, folder / "report", pdf_engine="weasyprint")


def _evaluate(browser, session, expression):
    result = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
    return json.loads(result["result"]["value"])


LAYOUT = """JSON.stringify((() => {
  const width = document.documentElement.clientWidth;
  const scrolls = el => { for (let e = el.parentElement; e; e = e.parentElement) {
    if (getComputedStyle(e).overflowX === 'auto') return true; } return false; };
  const sticking = Array.from(document.body.querySelectorAll('*'))
    .filter(e => !scrolls(e) && e.getBoundingClientRect().right > width + 1)
    .map(e => e.tagName + (e.id ? '#' + e.id : '') + ' ' + Math.round(e.getBoundingClientRect().right));
  const map = document.querySelector('#verdict-map').getBoundingClientRect();
  const answer = Array.from(document.querySelectorAll('div.answer p')).map(p => p.textContent);
  const warnings = Array.from(document.querySelectorAll('div.regime p.warning')).map(p => p.textContent);
  const figures = Array.from(document.querySelectorAll('figure')).map(f => [f.id,
    !!f.querySelector('figcaption'), (f.querySelector('svg') || {getAttribute: () => ''}).getAttribute('aria-label'),
    f.getBoundingClientRect().width, f.getBoundingClientRect().height]);
  return {scrollWidth: document.documentElement.scrollWidth, width, sticking, mapTop: map.top,
          mapBottom: map.bottom, answer, warnings, figures};
})())"""

MAP_TEXT = """JSON.stringify((() => {
  const figure = document.querySelector('#verdict-map');
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const texts = Array.from(figure.querySelectorAll('svg text')).map(t => [t.textContent, box(t)]);
  const squares = {}, labels = {};
  figure.querySelectorAll('g[id^="vm-square-"]').forEach(g => { squares[g.id.slice(10)] = box(g); });
  figure.querySelectorAll('g[id^="vm-label-"]').forEach(g => {
    labels[g.id.slice(9)] = [Array.from(g.querySelectorAll('text')).map(t => t.textContent), box(g)]; });
  return {texts, squares, labels, figure: box(figure.querySelector('svg'))};
})())"""

PRINT_LAYOUT = """JSON.stringify(Array.from(document.querySelectorAll('figure')).map(f => [f.id,
  f.getBoundingClientRect().height, getComputedStyle(f).breakInside, f.getBoundingClientRect().bottom]))"""


@pytest.mark.parametrize("width", [1400, 800])
def test_the_answer_fills_the_first_screen_without_horizontal_overflow(report, tmp_path, width):
    browser = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        session = browser.open_page(("Page", "Runtime", "Log", "Network"))
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": SCREEN_HEIGHT, "deviceScaleFactor": 1, "mobile": False},
                     session=session)
        browser.send("Page.navigate", {"url": report["html"].resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        layout = _evaluate(browser, session, LAYOUT)
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        errors = [e for e in browser.events if e.get("method") in ("Runtime.exceptionThrown",)
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        requests = [e["params"]["request"]["url"] for e in browser.events
                    if e.get("method") == "Network.requestWillBeSent"]
    finally:
        browser.close()
    png = base64.b64decode(shot)
    (report["html"].parent / f"first-screen-{width}.png").write_bytes(png)  # to look at
    assert png.startswith(b"\x89PNG")
    assert errors == []
    assert all(url.startswith(("file://", "data:")) for url in requests), requests

    assert layout["scrollWidth"] <= layout["width"], layout["scrollWidth"]
    assert layout["sticking"] == []
    # Title, at most three sentences, the regime's warning and the verdict map, all on the first screen.
    assert 1 <= len(layout["answer"]) <= 3 and layout["answer"][0].startswith("Setting 1")
    assert layout["warnings"] and layout["warnings"][0].startswith("Warning. Every budget is under 100 optimizer")
    assert 0 < layout["mapTop"] and layout["mapBottom"] <= SCREEN_HEIGHT, layout
    figures = layout["figures"]
    # the map, a gap trend per setting, crossover/heatmap/curves × 3 granularities, effective data transferred
    assert len(figures) == 1 + 2 + 3 * 3 + 1
    for key, has_caption, alt, fig_width, fig_height in figures:
        assert has_caption and alt and len(alt) > 40, key
        assert 100 < fig_width <= layout["width"] and fig_height > 100, (key, fig_width, fig_height)


def test_every_figure_fits_a_pdf_page_with_its_caption(report, tmp_path):
    browser = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        session = browser.open_page(("Page", "Runtime"))
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": PRINT_WIDTH, "height": PRINT_HEIGHT, "deviceScaleFactor": 1, "mobile": False},
                     session=session)
        browser.send("Emulation.setEmulatedMedia", {"media": "print"}, session=session)
        browser.send("Page.navigate", {"url": report["html"].resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        figures = _evaluate(browser, session, PRINT_LAYOUT)
    finally:
        browser.close()
    assert len(figures) == 13
    for key, height, breaking, _ in figures:
        assert breaking == "avoid" and height <= PRINT_HEIGHT, (key, height, breaking)
    assert figures[0][0] == "verdict-map" and figures[0][3] <= PRINT_HEIGHT  # on the first page, under the title
    # In the printed PDF the title, the answer's sentences, the verdict map's caption and its squares are on page 1.
    pages = [re.sub(r"\s+", " ", page.extract_text()) for page in PdfReader(report["pdf"]).pages]
    first = pages[0]
    assert "gridlab report — browser-grid" in first and "The answer: prune or train from scratch." in first
    assert "B = 10k" in first and "depth 0.5" in first and "sparse 0.8" in first


def _overlap(a, b, slack=0.5):
    return min(a[2], b[2]) - max(a[0], b[0]) > slack and min(a[3], b[3]) - max(a[1], b[1]) > slack


@pytest.mark.parametrize("width", [1400, 800])
@pytest.mark.parametrize("grid", ["report", "smoke_report"])
def test_the_maps_text_fits_its_squares_and_no_two_texts_overlap(grid, width, request, tmp_path):
    """Every text of the verdict map (panel titles, budget and row labels, square labels, legend) has a box of its
    own, every square's label stays inside its square, and a square without an interval shows no verdict."""
    paths = request.getfixturevalue(grid)
    browser = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        session = browser.open_page(("Page", "Runtime"))
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": SCREEN_HEIGHT, "deviceScaleFactor": 1, "mobile": False},
                     session=session)
        browser.send("Page.navigate", {"url": paths["html"].resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        layout = _evaluate(browser, session, MAP_TEXT)
        left, top, right, bottom = layout["figure"]
        shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
            "x": left, "y": top, "width": right - left, "height": bottom - top, "scale": 1}}, session=session)
    finally:
        browser.close()
    (paths["html"].parent / f"verdict-map-{width}.png").write_bytes(base64.b64decode(shot["data"]))  # to look at
    texts = [(text, b) for text, b in layout["texts"] if text.strip()]
    assert len(texts) > 20
    clashes = [(a[0], b[0]) for i, a in enumerate(texts) for b in texts[i + 1:] if _overlap(a[1], b[1])]
    assert clashes == []
    assert set(layout["labels"]) == set(layout["squares"]) and layout["labels"]
    for key, (lines, b) in layout["labels"].items():
        square = layout["squares"][key]
        assert square[0] - 0.5 <= b[0] and b[2] <= square[2] + 0.5, (key, lines, b, square)
        assert square[1] - 0.5 <= b[1] and b[3] <= square[3] + 0.5, (key, lines, b, square)
    if grid == "smoke_report":  # one seed: no interval anywhere, so no verdict anywhere
        words = {line.split(" ")[0] for lines, _ in layout["labels"].values() for line in lines}
        assert not words & {"prune", "scratch", "equivalent", "inconclusive"}
        assert all(lines[-1] == "no interval" for lines, _ in layout["labels"].values())
