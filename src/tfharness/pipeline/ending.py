"""How a run ends: the one place that decides FINISHED, FAILED or KILLED and cleans up."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator, Optional

from tfharness.errors import RunInterrupted

log = logging.getLogger("tfharness")


class Ending:
    """What the ending needs to know about the run: its checkpoints, once they are held."""

    def __init__(self) -> None:
        self.ckpt = None  # tfharness.artifacts.checkpoint.RunCheckpoints


# Set by the command line, which leaves through ``os._exit`` when a run fails while TensorFlow
# or MLflow still load on their threads (tfharness.cli.exit_now): a bad input then answers at
# once instead of after the imports it no longer needs.
LEAVE_IMPORTS_RUNNING = False


@contextlib.contextmanager
def run_ending(tracker, importer: Optional[threading.Thread], held=None) -> Iterator[Ending]:
    """Ends the run the block runs, however the block ends.

    - The block returns: the tracker delivers everything and ends the MLflow run FINISHED; the
      checkpoint folder is deleted. A delivery that fails turns this into a failure.
    - The block raises: a KeyboardInterrupt (Ctrl-C, or SIGTERM through
      :func:`~tfharness.artifacts.checkpoint.interrupt_on_signals`) ends the run KILLED, anything
      else FAILED with the reason in its ``error`` tag; the checkpoint folder is kept for
      ``resume``. Before the MLflow run opened, this only lets go of the tracker and of
      ``held``, the locked checkpoints of the run being resumed (still resumable).
    """
    ending = Ending()
    delivering = False
    try:
        yield ending
        delivering = True
        tracker.finish()
    except BaseException as error:
        status = "killed" if isinstance(error, KeyboardInterrupt) else "failed"
        if ending.ckpt is not None:
            ending.ckpt.end(status, f"{type(error).__name__}: {error}")
        elif held is not None:
            held.release()
        if not delivering:
            tracker.finish(error)
        if importer is not None and not LEAVE_IMPORTS_RUNNING:
            # Exiting while TensorFlow still loads on another thread can crash the
            # interpreter's shutdown: let the import end first (the CLI does not exit through
            # that shutdown, see LEAVE_IMPORTS_RUNNING).
            importer.join()
        if isinstance(error, RunInterrupted) and ending.ckpt is not None:
            log.warning("Run %s interrupted by %s: marked KILLED; its checkpoint is kept in %s; "
                        "continue it with resume=true", ending.ckpt.state.run_id,
                        error.signal_name, ending.ckpt.dir)
        raise
    ending.ckpt.end("finished")
