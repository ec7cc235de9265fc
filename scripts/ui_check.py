"""Looks at a short sweep in the MLflow UI through headless Chromium, as a user would.

Makes a 2-trial sweep on digits into a temporary store (or reads ``--store DIR`` made before),
starts ``mlflow ui`` on 127.0.0.1, takes screenshots of the run list, one run's charts and
overview, the Models page and the compare view, and checks what the pages say: the children's
names differ and say their swept values, the Models page shows each fine-tuned model's final
test accuracy, a run's source is the command the user ran. Prints one line per check; exits 1
when one fails, 2 when Chromium or websocket-client is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cdp import Browser, find_chromium  # noqa: E402

SWEEP = ["-m", "model.units=[32]", "trainer.epochs=4", "finetune.epochs=6",
         "finetune.learning_rate=0.03,0.01", "print_report=false"]
RUNS_VIEW = "#/experiments/{experiment}/runs?workflowType=machine_learning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_sweep(store: Path) -> None:
    """The sweep a user would start, in ``store`` (its database, artifacts and outputs)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-m", "tfharness", *SWEEP,
                          f"tracking.uri=sqlite:///{store / 'mlflow.db'}"],
                         cwd=store, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"ui-check: the sweep failed:\n{out.stderr[-3000:]}")


def start_ui(store: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
         f"sqlite:///{store / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
        # A throwaway UI: no MLflow job consumers (tfharness starts no jobs).
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ})
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                stop(process)
                raise SystemExit("ui-check: `mlflow ui` did not start")
            time.sleep(0.3)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


class Checks:
    """What the pages say, one line per check."""

    def __init__(self):
        self.results: List[Dict] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        return bool(ok)

    @property
    def failed(self) -> List[Dict]:
        return [r for r in self.results if not r["ok"]]


def close_assistant(browser: Browser) -> None:
    """Closes MLflow's assistant panel (it takes a third of the page)."""
    browser.evaluate("(() => { const b = [...document.querySelectorAll('button')].find("
                     "e => e.getAttribute('aria-label') === 'Close'); if (b) b.click(); })()")


def grid_column(browser: Browser, header: str) -> Dict[str, str]:
    """``{"<model name> | <source run>": cell}`` of the column ``header`` of the Models table.

    The table renders only the columns in view: it is read where it starts (model names, source
    runs), then scrolled until the column shows.
    """
    script = """(async () => {
      const want = %s;
      const rows = sel => [...document.querySelectorAll(sel + ' .ag-row')];
      const byIndex = (sel, f) => Object.fromEntries(
        rows(sel).map(r => [r.getAttribute('row-index'), f(r)]));
      const scroller = document.querySelector('.ag-body-horizontal-scroll-viewport');
      scroller.scrollLeft = 0;
      await new Promise(r => setTimeout(r, 300));
      const names = byIndex('.ag-pinned-left-cols-container', r => {
        const c = r.querySelector('[col-id="name"]'); return c ? c.innerText.trim() : ''; });
      // The cells of a metric column spell its id with &quot; where its header has quotes.
      const plain = id => (id || '').replaceAll('&quot;', '"');
      const runs = byIndex('.ag-center-cols-container', r => {
        const c = r.querySelector('[col-id="source_run_id"]'); return c ? c.innerText.trim() : ''; });
      for (let left = 0; left <= scroller.scrollWidth; left += 400) {
        scroller.scrollLeft = left;
        await new Promise(r => setTimeout(r, 300));
        const head = [...document.querySelectorAll('.ag-header-cell')]
          .find(h => h.innerText.trim() === want);
        if (!head) continue;
        const col = head.getAttribute('col-id');
        const cells = byIndex('.ag-center-cols-container', r => {
          const c = [...r.querySelectorAll('.ag-cell')]
            .find(e => plain(e.getAttribute('col-id')) === plain(col));
          return c ? c.innerText.trim() : ''; });
        return Object.fromEntries(Object.keys(cells).map(i => [names[i] + ' | ' + runs[i], cells[i]]));
      }
      return null;
    })()""" % json.dumps(header)
    return browser.evaluate(script) or {}


def look(base: str, store: Path, shots: Path, chromium: str, checks: Checks) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tfharness").experiment_id
    runs = client.search_runs([experiment])
    parent = next(r for r in runs if r.data.tags.get("tfharness.sweep") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = [c.info.run_name for c in children]
    checks.check("children's names differ", len(set(names)) == len(names) > 1, str(names))
    # The default pretrain_cache=auto pretrains once per sweep: one child trains, the others
    # reuse its pretrained model and say so.
    trained = [c for c in children if c.data.tags.get("tfharness.pretrain") == "trained"]
    reused = [c for c in children if c.data.tags.get("tfharness.pretrain") == "reused"]
    checks.check("one child pretrained, the others reused it",
                 len(trained) == 1 and len(reused) == len(children) - 1,
                 f"trained {[c.info.run_name for c in trained]}, "
                 f"reused {[c.info.run_name for c in reused]}")
    browser = Browser(chromium, free_port(), width=1600, height=1000)
    try:
        for step in (lambda: runs_page(browser, base, experiment, parent, names, shots, checks),
                     lambda: run_pages(browser, base, experiment, (trained or children)[0],
                                       shots, checks),
                     lambda: reuse_page(browser, base, experiment, reused, trained, shots,
                                        checks),
                     lambda: models_page(browser, base, experiment, children, shots, checks),
                     lambda: compare_page(browser, base, experiment, children, names, shots,
                                          checks)):
            attempt(step, checks)
    finally:
        browser.close()


def attempt(step: Callable, checks: Checks) -> None:
    try:
        step()
    except Exception as error:  # a page that never showed what it should: a failed check
        checks.check(getattr(step, "__name__", "page"), False, f"{type(error).__name__}: "
                                                               f"{str(error)[:800]}")


def runs_page(browser, base, experiment, parent, names, shots, checks) -> None:
    browser.open(base + RUNS_VIEW.format(experiment=experiment))
    browser.wait_for_text(parent.info.run_name)
    close_assistant(browser)
    # Children are folded under their parent: unfold them (the button beside its name).
    browser.evaluate("(() => { const a = [...document.querySelectorAll('a')].find(e => "
                     "e.innerText.trim() === %s); const b = a && a.closest('.ag-cell')"
                     ".querySelector('button'); if (b) b.click(); })()"
                     % json.dumps(parent.info.run_name))
    text = browser.wait_for_text(*names)
    browser.screenshot(shots / "runs.png")
    checks.check("run list shows the sweep parent by what it sweeps",
                 parent.info.run_name in text, parent.info.run_name)
    checks.check("run list shows every child by its swept values",
                 all(n in text for n in names), ", ".join(names))


def run_pages(browser, base, experiment, child, shots, checks) -> None:
    run_id = child.info.run_id
    browser.open(base + f"#/experiments/{experiment}/runs/{run_id}")
    text = browser.wait_for_text("Source", "Created by")
    time.sleep(1)
    close_assistant(browser)
    browser.screenshot(shots / "run_overview.png")
    source = child.data.tags["mlflow.source.name"]
    checks.check("run page names the command as its source",
                 source in text and "tracking_process" not in text, source)
    note = child.data.tags.get("mlflow.note.content", "")
    checks.check("run page shows the one-line description", note and note in text, note)
    browser.open(base + f"#/experiments/{experiment}/runs/{run_id}/model-metrics")
    browser.wait_for_text("finetune", "pretrain")
    close_assistant(browser)
    time.sleep(8)  # the charts draw after their titles
    browser.screenshot(shots / "run_charts.png")
    browser.open(base + f"#/experiments/{experiment}/runs/{run_id}/artifacts")
    browser.wait_for_text("plots")
    checks.check("run artifacts hold plots/", True)


def reuse_page(browser, base, experiment, reused, trained, shots, checks) -> None:
    """A child that reused a pretraining names the run it came from on its overview page."""
    if not reused or not trained:
        raise AssertionError("no child reused a pretraining")
    producer = trained[0].info.run_id
    browser.open(base + f"#/experiments/{experiment}/runs/{reused[0].info.run_id}")
    text = browser.wait_for_text("tfharness.pretrain_reused_from")
    close_assistant(browser)
    browser.screenshot(shots / "run_reused.png")
    checks.check("a reusing child's page names the run whose pretraining it reused",
                 producer in text, producer)


def models_page(browser, base, experiment, children, shots, checks) -> None:
    # Wide enough for the first metric columns beside the model attributes.
    browser.resize(2000, 700)
    browser.open(base + f"#/experiments/{experiment}/models?workflowType=machine_learning")
    browser.wait_for_text("finetuned", "pretrained")
    close_assistant(browser)
    time.sleep(1)
    # The table and its header: the README shows this one.
    browser.screenshot(shots / "models.png", clip=(0, 0, 2000, 380))
    column = grid_column(browser, "test/accuracy")
    browser.resize(1600, 1000)
    for child in children:
        want = child.data.metrics["test/accuracy"]
        # Keys: "<colour>\n<model name> | <source run>".
        shown = [v for k, v in column.items()
                 if k.split(" | ")[0].split("\n")[-1] == "finetuned"
                 and k.split(" | ")[-1] == child.info.run_name]
        ok = len(shown) == 1 and shown[0] != "" and abs(float(shown[0]) - want) < 1e-9
        checks.check(f"Models page shows the final test accuracy of {child.info.run_name}'s "
                     f"fine-tuned model", ok, f"shown {shown}, run {want}" + ("" if ok else f"; table column: {column}"))


def compare_page(browser, base, experiment, children, names, shots, checks) -> None:
    ids = json.dumps([c.info.run_id for c in children])
    browser.open(base + f"#/compare-runs?runs={ids}&experiments={json.dumps([experiment])}")
    text = browser.wait_for_text(*names, "Parameters:")
    time.sleep(3)
    close_assistant(browser)
    browser.screenshot(shots / "compare.png")
    checks.check("compare view tells the runs apart", all(n in text for n in names))
    # The parallel-coordinates plot's default axes: the params that differ between the runs.
    axes = text.split("Parameters:", 1)[1].split("Metrics:", 1)[0].split()
    checks.check("compare view plots the swept param, no operational setting",
                 axes == ["finetune.learning_rate"], str(axes))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="ui-check", help="folder for the screenshots")
    parser.add_argument("--store", help="a folder holding mlflow.db from an earlier sweep")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("ui-check: no Chromium (apt-get install chromium, or set CHROMIUM)")
        return 2
    try:
        import websocket  # noqa: F401
    except ImportError:
        print("ui-check: needs the websocket-client package (pip install websocket-client)")
        return 2
    shots = Path(args.out).resolve()
    shots.mkdir(parents=True, exist_ok=True)
    store = Path(args.store).resolve() if args.store else Path(tempfile.mkdtemp(prefix="ui-check-"))
    try:
        if not args.store:
            make_sweep(store)
        port = free_port()
        ui = start_ui(store, port)
        checks = Checks()
        try:
            look(f"http://127.0.0.1:{port}/", store, shots, chromium, checks)
        finally:
            stop(ui)
    finally:
        if not args.store:
            shutil.rmtree(store, ignore_errors=True)
    (shots / "checks.json").write_text(json.dumps(checks.results, indent=1))
    print(f"ui-check: {len(checks.results) - len(checks.failed)} of {len(checks.results)} "
          f"checks passed; screenshots in {shots}")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
