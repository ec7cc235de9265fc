"""Test-only: make a save pause midway, so a test can kill the process at that exact point.

``pausing(fragment, marker, seconds)`` wraps the step of ``atomic_write`` that makes the
temporary copy durable: once a temporary whose name contains ``fragment`` is on disk (and before
it is renamed into place), it writes ``marker`` and sleeps. Once only: an existing marker file
disables it. In a test process, monkeypatch it in; for a child process, run this file:

    python tests/pause_in_save.py FRAGMENT MARKER [SECONDS] -m tfharness <overrides...>
    python tests/pause_in_save.py FRAGMENT MARKER [SECONDS] -c CODE
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path
from typing import Callable


def pausing(fragment: str, marker: Path, seconds: float = 60.0) -> Callable[[Path], None]:
    """A replacement for ``serialization._fsync_tree`` that pauses on ``fragment``."""
    from tfharness.artifacts import serialization

    original = serialization._fsync_tree

    def fsync_then_pause(path: Path) -> None:
        original(path)
        if fragment in Path(path).name and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            time.sleep(seconds)

    return fsync_then_pause


def command(fragment: str, marker: Path, seconds: float = 60.0) -> list:
    """The start of a command line that runs Python with the pause installed."""
    return [sys.executable, str(Path(__file__).resolve()), fragment, str(marker), str(seconds)]


def _main(argv: list) -> None:
    fragment, marker, seconds, mode, *rest = argv
    from tfharness.artifacts import serialization

    serialization._fsync_tree = pausing(fragment, Path(marker), float(seconds))
    if mode == "-m":
        sys.argv = [rest[0], *rest[1:]]
        runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
    elif mode == "-c":
        sys.argv = ["-c"]
        exec(compile(rest[0], "<pause_in_save>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(f"pause_in_save: expected -m MODULE or -c CODE, got {mode!r}")


if __name__ == "__main__":
    sys.path.pop(0)  # this folder: the child imports tfharness as a user's process would
    _main(sys.argv[1:])
