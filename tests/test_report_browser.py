"""The report's HTML in real headless Chromium, driven over the DevTools protocol on a pipe (report/chromium.py)."""

import base64
import json

import pytest
from report_synthetic import build_cells, finish, power_law, write_db

from gridlab.report import build_report
from gridlab.report.chromium import DevTools, find_chromium

CHROMIUM = find_chromium()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    budgets = [1_000_000 * 2**i for i in range(5)]
    cells = build_cells(["shortgpt", "minitron-width", "wanda"], [0.5, 0.7], budgets, [0, 1], 50_000_000)

    def loss(method, ratio, init, setting, tokens, seed):
        curve = power_law(2.0, 0.5, 0.3) if init == "pruned" else power_law(1.9, 2.0, 0.5)
        return curve(tokens) + 0.002 * (seed - 0.5)

    metrics = finish(cells, loss, done=lambda c: c["seed"] == 0 or c["budget_tokens"] < 16_000_000)
    return build_report(write_db(folder / "results.duckdb", cells, metrics), folder / "report")


def test_report_loads_cleanly_with_visible_figures_in_chromium(report, tmp_path):
    browser = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        session = browser.open_page(("Page", "Runtime", "Log", "Network"))
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": report["html"].resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        sizes = browser.send("Runtime.evaluate", {
            "expression": "JSON.stringify(Array.from(document.querySelectorAll('svg.figure')).map("
                          "e => { const r = e.getBoundingClientRect(); return [e.getAttribute('aria-label'), "
                          "r.width, r.height]; }))",
            "returnByValue": True,
        }, session=session)["result"]["value"]
        shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                            session=session)["data"]
        errors = [e for e in browser.events if e.get("method") in ("Runtime.exceptionThrown",)
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        requests = [e["params"]["request"]["url"] for e in browser.events
                    if e.get("method") == "Network.requestWillBeSent"]
    finally:
        browser.close()

    assert errors == []
    assert all(url.startswith(("file://", "data:")) for url in requests), requests
    figures = json.loads(sizes)
    assert len(figures) == 9  # crossover, heatmap, training curves × depth, width, sparse
    for name, width, height in figures:
        assert width > 100 and height > 100, (name, width, height)
    png = base64.b64decode(shot)
    screenshot = report["html"].parent / "screenshot.png"
    screenshot.write_bytes(png)
    assert png.startswith(b"\x89PNG") and len(png) > 50_000
