"""Tracking from a process of its own, so MLflow never loads in the training process.

MLflow's import and the store's opening (the SQL store's schema check) are seconds of Python
that hold the GIL, as TensorFlow's import does: in the training process they delay the first
epoch, and the figures are in benchmarks/results.md ("Tracking variants"). Here a child process
holds the :class:`~tfharness.tracking.MlflowTracker` and the training process holds a
:class:`ProcessTracker` that forwards every call over a socket:

* calls that only record (metrics, texts, tables, figures, models, tags, registration) are one
  pickled message each and never wait; the child's tracker queues them for its delivery thread
  exactly as it does in-process (order, retries, spooling: see :mod:`tfharness.tracking.tracker`);
* calls that answer (opening the run, what a resumed run misses, store queries such as the
  pretrain cache's, ending the run) wait for the child's answer, and its errors are raised in
  the training process.

The child is started when a run's tracker is made, before TensorFlow is imported, and opens the
store (imports MLflow, checks the schema, finds the experiment) on the other core while the
training process imports TensorFlow and loads the data. One child serves every run of a process,
in turn, so the runs of a sweep in one process pay for it once. Model logging needs the model's
output for the signature: the training process computes it and sends arrays, never the model.

Crashes: when the training process dies (SIGKILL, OOM), the child's socket closes and it exits
at once, leaving the run RUNNING exactly as a killed logging thread would; the next run marks it
KILLED, and ``resume`` delivers what was queued but not sent. The child ignores SIGINT and
SIGTERM (Ctrl-C reaches the whole process group; a batch system signals every process of a job):
the training process ends the run KILLED through it, then the child exits when its socket closes.
Its log lines (outages, spooling) are forwarded to the training process's ``tfharness`` logger,
so they land in the run's log with everything else.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import uuid
from multiprocessing.connection import Connection
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np

from tfharness import heap
from tfharness.config import TrackingConfig
from tfharness.errors import TrackingError
from tfharness.tracking import store
from tfharness.tracking.backends import in_process_tracker
from tfharness.tracking.base import Tracker, ending_of
from tfharness.tracking.models import model_output_and_requirements

log = logging.getLogger("tfharness")

# How long the end of a process waits for the tracking process to exit after its pipe closed.
EXIT_WAIT_S = 10.0


class TrackingProcess:
    """The child process and the pipe to it, as seen from the training process."""

    def __init__(self):
        ours, theirs = socket.socketpair()
        # Not ``-m tfharness.tracking.process``: the package imports this module first, and
        # runpy would then run a second copy of it as __main__.
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from tfharness.tracking.process import serve; "
             "serve(int(sys.argv[1]))", str(theirs.fileno())],
            pass_fds=[theirs.fileno()])
        theirs.close()
        self._socket = ours
        self._conn = Connection(os.dup(ours.fileno()))
        self._send_lock = threading.Lock()
        self._seq = itertools.count()
        # seq -> [answered, ok, value] of the calls waiting for an answer.
        self._waiting: Dict[int, list] = {}
        self.dead: Optional[str] = None
        self._reader = threading.Thread(target=self._read, name="tfharness-tracking-reader",
                                        daemon=True)
        self._reader.start()

    def send(self, key: str, method: str, *args, answer: bool = False, **kwargs) -> Optional[list]:
        seq = next(self._seq)
        waiter = [threading.Event(), False, None] if answer else None
        if waiter is not None:
            self._waiting[seq] = waiter
        if self.dead is None:
            try:
                with self._send_lock:
                    self._conn.send((seq, key, method, args, kwargs, answer))
            except (OSError, ValueError) as exc:
                self._died(f"{type(exc).__name__}: {exc}")
        if self.dead is not None:
            self._waiting.pop(seq, None)
            raise TrackingError(f"The tracking process is gone ({self.dead}); {method} was not "
                                f"delivered")
        return waiter

    def call(self, key: str, method: str, *args, **kwargs):
        """Sends a call and returns its answer; raises what the call raised in the child."""
        answered, _, _ = waiter = self.send(key, method, *args, answer=True, **kwargs)
        answered.wait()
        if not waiter[1]:
            raise waiter[2]
        return waiter[2]

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._died(f"it exited ({type(exc).__name__})")
                return
            if message[0] == "answer":
                _, seq, ok, value = message
                waiter = self._waiting.pop(seq, None)
                if waiter is not None:
                    waiter[1], waiter[2] = ok, value
                    waiter[0].set()
            elif message[0] == "log":
                _, name, level, text = message
                logging.getLogger(name).log(level, "%s", text)

    def _died(self, why: str) -> None:
        if self.dead is None:
            code = self.process.poll()
            self.dead = why + (f", exit status {code}" if code is not None else "")
        for waiter in list(self._waiting.values()):
            waiter[1], waiter[2] = False, TrackingError(
                f"The tracking process is gone ({self.dead})")
            waiter[0].set()
        self._waiting.clear()

    def close(self) -> None:
        """Closes the pipe (the child exits when it sees that) and waits for the child."""
        try:
            # A shutdown, not only a close: the reader thread is blocked reading this socket,
            # which keeps it open, so the child would not see the end of the pipe.
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for closeable in (self._conn, self._socket):
            try:
                closeable.close()
            except OSError:
                pass
        try:
            self.process.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            sys.stderr.write(f"tfharness: the tracking process did not exit {EXIT_WAIT_S:.0f} s "
                             f"after its pipe closed; killed\n")
            self.process.kill()
            self.process.wait()


_shared: Optional[TrackingProcess] = None
_shared_lock = threading.Lock()


def shared_process() -> TrackingProcess:
    """The tracking process of this process, started on first use (or again if it died)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.dead is not None or _shared.process.poll() is not None:
            if _shared is None:
                atexit.register(_close_shared)
            _shared = TrackingProcess()
        return _shared


def _close_shared() -> None:
    if _shared is not None:
        _shared.close()


class ProcessTracker(Tracker):
    """A :class:`~tfharness.tracking.MlflowTracker` in the tracking process, used from here.

    Same behaviour and errors as the in-process tracker; ``tracking.process=false`` uses that
    one instead.
    """

    def __init__(self, cfg: TrackingConfig):
        super().__init__()
        self.cfg = cfg
        self.uri = cfg.uri
        self.spooled_run = False
        self._key = uuid.uuid4().hex
        self._warned = False
        self._process = shared_process()
        # The child opens the store now, while this process goes on to load data and
        # TensorFlow; a store that cannot be used is reported by start().
        self._process.send(self._key, "open", cfg, os.getcwd(), dict(os.environ))

    def connect_meanwhile(self, after=None) -> None:
        """The child began opening the store when this tracker was made."""

    def start(self, run_name: str, params: Dict[str, str], tags: Dict[str, str],
              resume_run_id: Optional[str] = None) -> None:
        state = self._process.call(self._key, "start", run_name, params, tags,
                                   resume_run_id=resume_run_id)
        self.run_id, self.uri, self.spooled_run = (state["run_id"], state["uri"],
                                                   state["spooled_run"])
        # As with the in-process tracker, MLflow calls made here after the run (loading its
        # models by URI) go to the run's store. Setting the variable MLflow reads on import
        # keeps MLflow out of this process; where it is loaded already, it is told directly.
        if "mlflow" in sys.modules:
            sys.modules["mlflow"].set_tracking_uri(self.uri)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = self.uri

    def mark_abandoned(self, run_id: str, reason: str) -> None:
        self._process.send(self._key, "mark_abandoned", run_id, reason)

    def missing_points(self, points: List[list]) -> List[list]:
        return self._process.call(self._key, "missing_points", points)

    def missing_artifacts(self, files: Iterable[str]) -> List[str]:
        return self._process.call(self._key, "missing_artifacts", list(files))

    def logged_model_names(self) -> List[str]:
        return self._process.call(self._key, "logged_model_names")

    def query(self, function: Callable, *args):
        return self._process.call(self._key, "query", function, *args)

    def _record(self, method: str, *args, **kwargs) -> None:
        try:
            self._process.send(self._key, method, *args, **kwargs)
        except TrackingError as error:
            # Like a failed call of the logging thread: training goes on; finish() says it.
            if not self._warned:
                self._warned = True
                log.warning("%s; training goes on, and the run will end FAILED", error)

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None:
        self._record("log_metrics", {k: float(v) for k, v in metrics.items()}, step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._record("log_text", text, artifact_file)

    def log_model(self, model, name: str, example: np.ndarray, artifact,
                  tags: Optional[Dict[str, str]] = None,
                  extra_artifacts: Optional[Dict] = None, step: int = 0) -> None:
        output, requirements = model_output_and_requirements(model, example)
        self._record("log_model_output", name, np.asarray(example), output, str(artifact),
                     requirements, dict(tags or {}),
                     {k: str(v) for k, v in (extra_artifacts or {}).items()}, step=step)

    def link_model_metrics(self, name: str, keys: List[str]) -> None:
        self._record("link_model_metrics", name, list(keys))

    def log_figure(self, kind: str, data: Dict, artifact_file: str) -> None:
        self._record("log_figure", kind, data, artifact_file)

    def set_tags(self, tags: Dict[str, str]) -> None:
        self._record("set_tags", dict(tags))

    def log_table(self, rows: List[Dict], artifact_file: str) -> None:
        self._record("log_table", rows, artifact_file)

    def log_inputs(self, datasets: List[Dict]) -> None:
        self._record("log_inputs", [dict(d) for d in datasets])

    def register_model(self, name: str, registered_name: str,
                       alias: Optional[str] = None) -> None:
        self._record("register_model", name, registered_name, alias=alias)

    def log_model_input(self, model_id: str) -> None:
        self._record("log_model_input", model_id)

    def finish(self, error: Optional[BaseException] = None) -> None:
        if self.run_id is None:
            try:
                self._process.send(self._key, "close")
            except TrackingError:  # gone already: nothing to let go of, and the caller's
                pass               # own error (a bad config, say) is the one to report
            return
        status, message = ending_of(error)
        try:
            state = self._process.call(self._key, "finish_as", status, message)
        except TrackingError:
            if self._process.dead is None:
                raise
            self._end_here(status, message)
            raise
        self.model_uris.update(state["model_uris"])
        self.registered_versions.update(state["registered_versions"])

    def _end_here(self, status: str, message: Optional[str]) -> None:
        """Ends the run from this process when the tracking process died: never RUNNING."""
        import mlflow

        why = f"the tracking process is gone ({self._process.dead}); logging calls may be lost"
        try:
            client = mlflow.MlflowClient(self.uri)
            client.set_tag(self.run_id, "error", f"{message or ''} {why}".strip()[:5000])
            client.set_terminated(self.run_id, status="FAILED" if status == "FINISHED"
                                  else status)
        except Exception as exc:  # the store is down too: the error below says what happened
            log.warning("Could not end run %s: %s", self.run_id, exc)


# ----------------------------------------------------------------------- the child process
class _ForwardingHandler(logging.Handler):
    def __init__(self, send):
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(("log", record.name, record.levelno, record.getMessage()))
        except Exception:  # the training process is gone: nobody to tell
            pass


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a TrackingError saying the same."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return TrackingError(f"{type(error).__name__}: {error}")


def _answer_of(tracker, method: str, value):
    if method == "start":
        return {"run_id": tracker.run_id, "uri": tracker.uri, "spooled_run": tracker.spooled_run}
    if method == "finish_as":
        return {"model_uris": dict(tracker.model_uris),
                "registered_versions": dict(tracker.registered_versions)}
    return value


class _Server:
    """The child's side: one tracker per run of the training process, by key."""

    def __init__(self, fd: int):
        self._conn = Connection(fd)
        self._send_lock = threading.Lock()
        self.trackers: Dict[str, Tracker] = {}

    def send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    def serve(self) -> None:
        """One call at a time, in the order the training process made them."""
        while True:
            try:
                seq, key, method, args, kwargs, answer = self._conn.recv()
            except (EOFError, OSError):
                # The training process is gone (or done): so is everything it did not wait for.
                os._exit(0)
            ok, value = self.handle(key, method, args, kwargs, answer)
            if answer:
                try:
                    self.send(("answer", seq, ok, value))
                except (OSError, ValueError):
                    os._exit(0)

    def handle(self, key: str, method: str, args: tuple, kwargs: dict, answer: bool) -> tuple:
        """Performs one call; returns ``(ok, answer or error)``."""
        try:
            if method == "open":
                self.open(key, *args)
                return True, None
            if method == "close":
                self.trackers.pop(key, None)
                return True, None
            tracker = self.trackers[key]
            value = _answer_of(tracker, method, getattr(tracker, method)(*args, **kwargs))
            if method == "finish_as":
                self.trackers.pop(key, None)
            return True, value
        except BaseException as error:  # noqa: BLE001 - every error goes back to the caller
            if method == "finish_as":
                self.trackers.pop(key, None)
            elif not answer and key in self.trackers:
                # A recording call that failed before it was queued: the run is incomplete.
                self.trackers[key].record_failure(method, error)
            return False, _portable(error)

    def open(self, key: str, cfg: TrackingConfig, cwd: str, environment: Dict[str, str]) -> None:
        os.chdir(cwd)  # a relative SQLite URI means the training process's folder
        # The environment of the training process now, not when this process started:
        # credentials (MLFLOW_TRACKING_TOKEN, cloud keys), the user name MLflow tags runs
        # with, and what hydra.job.env_set gave this job of a sweep.
        os.environ.clear()
        os.environ.update(environment)
        self.trackers[key] = tracker = in_process_tracker(cfg)
        database = store.sqlite_path(cfg.uri)
        if database is not None and not database.exists():
            # Opening would create the store: that waits for start(), so a run that fails
            # before it opens leaves no store behind (as in-process); the imports, the slow
            # part, are done now, as runs.connect does them.
            heap.import_frozen("mlflow", "mlflow.store.tracking.sqlalchemy_store")
            return
        tracker.connect()


def serve(fd: int) -> None:
    """The child's main: serves the training process until its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    server = _Server(fd)
    tfharness_log = logging.getLogger("tfharness")
    tfharness_log.addHandler(_ForwardingHandler(server.send))
    tfharness_log.setLevel(logging.INFO)
    tfharness_log.propagate = False
    server.serve()

