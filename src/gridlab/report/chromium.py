"""Headless Chromium driven over the DevTools protocol on a pipe (no client package): prints the report's HTML to
PDF, and lets the browser test inspect the page. Chromium lays out the report's tables and SVG figures several
times faster than WeasyPrint."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--remote-debugging-pipe", "about:blank"]


def find_chromium() -> str | None:
    """The Chromium executable on PATH (Debian's `chromium`, or `chromium-browser`), or None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class DevTools:
    """Chromium started with --remote-debugging-pipe: commands on its fd 3, replies and events on its fd 4, each a
    JSON message terminated by a NUL byte. Starting it returns at once; the first command waits for the browser."""

    def __init__(self, executable: str, profile_dir: Path | None = None):
        self._profile = None if profile_dir else tempfile.TemporaryDirectory(
            prefix="gridlab-chromium-", ignore_cleanup_errors=True)
        profile = profile_dir or Path(self._profile.name)
        to_browser_read, self._write = os.pipe()
        self._read, from_browser_write = os.pipe()
        command = f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write}'
        self.process = subprocess.Popen(["bash", "-c", command, executable, f"--user-data-dir={profile}", *FLAGS],
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

    def open_page(self, domains=("Page",)) -> str:
        """A new tab with the given domains enabled; returns its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in domains:
            self.send(f"{domain}.enable", session=session)
        return session

    def print_to_pdf(self, html_path: Path, timeout: float = 120) -> bytes:
        """The page at html_path printed with its own CSS page size and margins, backgrounds included."""
        session = self.open_page()
        self.send("Page.navigate", {"url": Path(html_path).resolve().as_uri()}, session=session, timeout=timeout)
        self.wait_for("Page.loadEventFired", timeout=timeout)
        printed = self.send("Page.printToPDF", {"printBackground": True, "preferCSSPageSize": True,
                                                "displayHeaderFooter": False}, session=session, timeout=timeout)
        return base64.b64decode(printed["data"])

    def close(self) -> None:
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
        if self._profile is not None:
            self._profile.cleanup()
