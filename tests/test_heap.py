"""tfharness.heap: imports without full collections, frozen afterwards, and an earlier run's
objects collectable again (fast, no TensorFlow; each case in a fresh interpreter, since freezing
is process-wide)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def run_python(tmp_path: Path, code: str) -> str:
    """Runs ``code`` in a fresh interpreter that imports from ``tmp_path``; returns its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).parents[1] / 'src'}",
                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_import_runs_without_full_collections_and_is_frozen_after(tmp_path):
    (tmp_path / "big_module.py").write_text(textwrap.dedent("""
        import gc
        THRESHOLD_WHILE_IMPORTING = gc.get_threshold()
        TABLE = [[i] for i in range(50_000)]  # lists are tracked by the collector
    """))
    out = run_python(tmp_path, """
        import gc, sys
        from tfharness import heap
        before = gc.get_threshold()
        heap.import_frozen("big_module", "json")
        import big_module
        assert "json" in sys.modules
        assert big_module.THRESHOLD_WHILE_IMPORTING[:2] == before[:2]
        assert big_module.THRESHOLD_WHILE_IMPORTING[2] > 10**6, big_module.THRESHOLD_WHILE_IMPORTING
        assert gc.get_threshold() == before, gc.get_threshold()
        assert gc.get_freeze_count() >= 50_000, gc.get_freeze_count()
        frozen = gc.get_freeze_count()
        heap.import_frozen("big_module")  # imported already: nothing to do
        assert gc.get_freeze_count() == frozen
        print("ok")
    """)
    assert out.strip() == "ok"


def test_a_failed_import_raises_and_restores_the_collector(tmp_path):
    (tmp_path / "broken_module.py").write_text("raise RuntimeError('broken on purpose')\n")
    out = run_python(tmp_path, """
        import gc
        from tfharness import heap
        before = gc.get_threshold()
        try:
            heap.import_frozen("broken_module")
        except RuntimeError as error:
            print("raised", error)
        assert gc.get_threshold() == before, gc.get_threshold()
    """)
    assert out.strip() == "raised broken on purpose"


def test_an_earlier_runs_frozen_garbage_is_collected_before_the_next_run(tmp_path):
    (tmp_path / "small_module.py").write_text("VALUE = 1\n")
    out = run_python(tmp_path, """
        import gc, weakref
        from tfharness import heap

        class Model:  # a run's object in a reference cycle, alive while the imports ran
            pass

        model = Model()
        model.self = model
        alive = weakref.ref(model)
        heap.import_frozen("small_module")
        del model
        gc.collect()
        print("frozen, kept:", alive() is not None)
        heap.collect_frozen_run()
        print("after collect_frozen_run, kept:", alive() is not None)
        frozen = gc.get_freeze_count()
        heap.collect_frozen_run()  # nothing frozen with a run since: no second full pass
        assert gc.get_freeze_count() == frozen
    """)
    assert out.splitlines() == ["frozen, kept: True", "after collect_frozen_run, kept: False"]
