"""The report's HTML in real headless Chromium, driven over the DevTools protocol on a pipe (no client package)."""

import base64
import json
import os
import select
import shutil
import subprocess
import time

import pytest
from report_synthetic import build_cells, finish, power_law, write_db

from gridlab.report import build_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]


class DevTools:
    """Chromium started with --remote-debugging-pipe: commands on its fd 3, replies and events on its fd 4,
    each a JSON message terminated by a NUL byte."""

    def __init__(self, profile_dir):
        to_browser_read, self._write = os.pipe()
        self._read, from_browser_write = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile_dir}", "--remote-debugging-pipe", "about:blank"]
        command = f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write}'
        self.process = subprocess.Popen(["bash", "-c", command, CHROMIUM, *flags],
                                        pass_fds=(to_browser_read, from_browser_write),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._read], [], [], remaining)[0]:
                raise TimeoutError("no message from chromium")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for seen in self.events:
            if seen.get("method") == event:
                return seen
        while True:
            message = self._receive(deadline)
            self.events.append(message)
            if message.get("method") == event:
                return message

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except (TimeoutError, EOFError, RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._read)
        os.close(self._write)


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
    browser = DevTools(tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
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
