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
    db = write_db(folder / "results.duckdb", cells, metrics, parent_tokens=P, parent_metrics=parent_loss(5.9, P),
                  name="browser-grid")
    return build_report(db, folder / "report")


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
  const figures = Array.from(document.querySelectorAll('figure')).map(f => [f.id,
    !!f.querySelector('figcaption'), (f.querySelector('svg') || {getAttribute: () => ''}).getAttribute('aria-label'),
    f.getBoundingClientRect().width, f.getBoundingClientRect().height]);
  return {scrollWidth: document.documentElement.scrollWidth, width, sticking, mapTop: map.top,
          mapBottom: map.bottom, answer, figures};
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
    # Title, at most three sentences and the verdict map, all on the first screen.
    assert 1 <= len(layout["answer"]) <= 3 and layout["answer"][0].startswith("Setting 1")
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
