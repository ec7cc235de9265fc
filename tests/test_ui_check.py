"""scripts/ui-check: a short sweep looked at in a real browser (headless Chromium on `mlflow ui`).

Runs where Chromium is installed (Debian: apt-get install chromium) and skips elsewhere, saying
why; the script's own checks (children's names, the Models page's test accuracy, sources, the
compare view) are what this test asserts, together with the screenshots it leaves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

from cdp import find_chromium  # noqa: E402

try:
    import websocket  # noqa: F401
except ImportError:  # pragma: no cover - the dev extras install it
    websocket = None


@pytest.mark.skipif(find_chromium() is None,
                    reason="no Chromium on this machine (apt-get install chromium)")
@pytest.mark.skipif(websocket is None, reason="websocket-client is not installed")
def test_ui_check_in_headless_chromium(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "scripts" / "ui-check"), "--out", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TFHARNESS_NO_SETUP": "1"})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert checks and all(c["ok"] for c in checks)
    names = {c["check"] for c in checks}
    assert "children's names differ" in names
    assert any(n.startswith("Models page shows the final test accuracy") for n in names)
    for shot in ("runs.png", "run_overview.png", "run_charts.png", "models.png", "compare.png"):
        assert (tmp_path / shot).stat().st_size > 10_000, shot
