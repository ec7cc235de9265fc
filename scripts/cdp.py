"""A small Chrome DevTools Protocol client: headless Chromium, pages, screenshots, page text.

Used by ``scripts/ui-check`` to look at the MLflow UI as a user does. Needs ``chromium`` (Debian:
``apt-get install chromium``) and the ``websocket-client`` package.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> Optional[str]:
    """The Chromium executable: ``$CHROMIUM``, else the first of the usual names on PATH."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, executable: str, port: int, width: int = 1400, height: int = 900):
        import websocket

        self._profile = tempfile.mkdtemp(prefix="ui-check-chromium-")
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars",
             f"--remote-debugging-port={port}", f"--user-data-dir={self._profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        target = self._page_target(port)
        self._ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=60,
                                               suppress_origin=True)
        self._ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.resize(width, height)

    def _page_target(self, port: int, timeout: float = 30) -> dict:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list",
                                            timeout=2) as answer:
                    pages = [t for t in json.load(answer) if t.get("type") == "page"]
                if pages:
                    return pages[0]
            except OSError:
                pass
            if self.process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Chromium did not open its DevTools port {port}")
            time.sleep(0.2)

    def call(self, method: str, **params) -> dict:
        """Sends one DevTools command and returns its result (events in between are dropped)."""
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 60) -> str:
        """The page's text once it holds every one of ``needles``; raises on timeout."""
        deadline = time.time() + timeout
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if time.time() > deadline:
                missing = [n for n in needles if n not in text]
                raise TimeoutError(f"{self.url()}: no {missing} after {timeout:.0f} s; the page "
                                   f"says: {text[:1500]!r}")
            time.sleep(0.5)

    def click_text(self, text: str) -> bool:
        """Clicks the innermost visible element whose own text is ``text``."""
        return bool(self.evaluate(
            "(() => { const want = %s; const all = [...document.querySelectorAll('*')]"
            ".filter(e => e.offsetParent !== null && e.innerText && e.innerText.trim() === want);"
            " const el = all[all.length - 1]; if (!el) return false; el.click(); return true;"
            " })()" % json.dumps(text)))

    def url(self) -> str:
        return self.evaluate("location.href")

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def screenshot(self, path: Path, clip: Optional[tuple] = None) -> Path:
        """A PNG of the page; ``clip``: ``(x, y, width, height)`` of the part to keep."""
        extra = ({"clip": dict(zip(("x", "y", "width", "height"), clip), scale=1)}
                 if clip else {})
        data = self.call("Page.captureScreenshot", format="png", **extra)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            self._ws.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            shutil.rmtree(self._profile, ignore_errors=True)
