"""Checkpoints and resume: what a run needs to continue after its process died.

Each run owns ``<checkpoint_root>/<run_id>/``, stable across invocations (``output_dir`` is a new
Hydra folder each time). It holds:

* ``state.json``: which milestones of the run are done (pretraining evaluated, a model saved and
  verified, a fine-tune stage reported...), how many epochs each phase completed, the newest
  checkpoint file, and a ledger of every metric point the run logged, so a resumed run can
  deliver what the dead process had queued but not sent, and skip what is done;
* ``<phase>-e<epochs>.npz``: every variable of the model after the last completed epoch of a
  phase (weights, BatchNormalization statistics, dropout seed state) and of its optimizer, so the
  resumed epochs take the same steps the lost ones would have. A resumed run rebuilds the same
  model and compiles it the same way, so the variables are stored by position, with their shapes
  checked on restore, as ``get_weights``/``set_weights`` do. Arrays are written far faster than
  a ``.keras`` archive (no config, no zip), and this is written at every epoch;
* ``stage-<i>-before.npz``: the weights at the start of a fine-tune stage, which the stage's
  report and its frozen-weights check compare against;
* ``lock``: held (``flock``) by the process running the run; a run whose lock is free while its
  state says "running" belongs to a dead process.

Every file is written to a temporary name, flushed and renamed (``serialization.atomic_write``):
the checkpoint first, then the state naming it, then older checkpoints are removed, so a kill at
any moment leaves a state that names a complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from tfharness.config import HarnessConfig, flatten
from tfharness.errors import ConfigError, HarnessError, NumericalError, RunInterrupted
from tfharness.artifacts.serialization import atomic_write, sweep_partial_writes

log = logging.getLogger("tfharness")

STATE_FORMAT = "tfharness-checkpoint/1"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
# Keys that say how to run, not what to compute: changing them keeps a run resumable.
UNHASHED_KEYS = ("resume", "output_dir", "print_report", "checkpoint_root", "tracking.run_name",
                 "tracking.on_unavailable", "tracking.spool_dir", "tracking.drain_timeout_s",
                 "trainer.verbose", "pretrain_cache", "pretrain_wait_s")


def config_hash(cfg: HarnessConfig) -> str:
    """A short digest of everything that decides the run's results (see ``UNHASHED_KEYS``)."""
    flat = {k: v for k, v in flatten(cfg).items() if k not in UNHASHED_KEYS}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: Path, payload: Dict) -> None:
    text = json.dumps(payload, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))


@dataclass
class RunState:
    """The part of a run that survives its process (``state.json``)."""

    run_id: str
    config_hash: str
    output_dir: str
    status: str = "running"  # running | killed | failed | finished
    tracking_uri: str = ""
    experiment: str = ""
    milestones: List[str] = field(default_factory=list)
    # Completed epochs per phase: "pretrain", "finetune/0", "finetune/1", ...
    epochs: Dict[str, int] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    # Every metric point logged so far: [key, value, step].
    metrics: List[list] = field(default_factory=list)
    # Milestone results a resumed run needs again (saved model paths, stage reports, timings).
    values: Dict[str, Any] = field(default_factory=dict)
    reason: Optional[str] = None
    resumes: int = 0
    pid: int = 0
    host: str = ""
    updated: float = 0.0

    @classmethod
    def read(cls, path: Path) -> "RunState":
        payload = json.loads(path.read_text())
        if payload.pop("format", None) != STATE_FORMAT:
            raise HarnessError(f"{path} was written by an unknown checkpoint format; this "
                               f"version reads {STATE_FORMAT}.")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in known})

    def phase_epochs(self, phase: str) -> int:
        return int(self.epochs.get(phase, 0))


def lock_is_held(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (a free lock means its process is gone)."""
    lock_path = run_dir / LOCK_FILE
    if not lock_path.exists():
        return False
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return True
            raise
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def process_alive(state: RunState) -> bool:
    """Whether the process that last wrote ``state`` still runs; one on another host, which
    this process cannot see, counts as alive."""
    if state.host != socket.gethostname() or state.pid <= 0:
        return True
    return pid_alive(state.pid)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _states(root: Path) -> List[RunState]:
    states = []
    if not root.is_dir():
        return states
    for state_file in root.glob(f"*/{STATE_FILE}"):
        try:
            states.append(RunState.read(state_file))
        except (OSError, ValueError, TypeError, HarnessError) as exc:
            log.warning("Ignoring unreadable checkpoint state %s: %s", state_file, exc)
    return states


def abandoned_runs(root: str | os.PathLike) -> List[RunState]:
    """Runs whose state says "running" while no process holds their lock: their process died."""
    root = Path(root)
    return [s for s in _states(root)
            if s.status == "running" and not lock_is_held(root / s.run_id)]


def find_resumable(root: str | os.PathLike, resume, cfg_hash: str) -> Optional[RunState]:
    """The run ``resume`` asks to continue, or None for a new run.

    ``resume=true`` picks the most recently updated interrupted run (killed, or running with its
    process gone) with the same config hash; none is not an error (a new run starts).
    ``resume=<run_id>`` must name such a run, with the same config.
    """
    if resume is False or resume is None:
        return None
    root = Path(root)
    if resume is True:
        interrupted = [s for s in _states(root)
                       if s.config_hash == cfg_hash and s.status in ("running", "killed")]
        held = {s.run_id for s in interrupted if lock_is_held(root / s.run_id)}
        candidates = [s for s in interrupted if s.run_id not in held]
        newest = max(interrupted, key=lambda s: s.updated, default=None)
        # Held, and its own process is gone (or it was resumed before): a resuming process holds
        # it, possibly one that has taken the lock and not yet written its state.
        if newest is not None and newest.run_id in held and (
                newest.status == "killed" or newest.resumes > 0 or not process_alive(newest)):
            # The run this command would continue is being continued by another process now.
            raise ConfigError("resume", resume, f"an interrupted run no other process is "
                              f"resuming; run {newest.run_id} is being resumed elsewhere "
                              f"(process {newest.pid} on {newest.host})")
        return max(candidates, key=lambda s: s.updated, default=None)
    state_file = root / str(resume) / STATE_FILE
    if not state_file.is_file():
        known = sorted(s.run_id for s in _states(root) if s.status != "finished")
        raise ConfigError("resume", resume, "true, false, or the id of an interrupted run with a "
                          f"checkpoint in {root}: " + (", ".join(known) or "there is none"))
    state = RunState.read(state_file)
    if state.config_hash != cfg_hash:
        raise ConfigError("resume", resume, f"a run with the same config; run {resume} was "
                          f"started with a different one (config hash {state.config_hash}, "
                          f"this one {cfg_hash}): repeat its command with resume={resume}")
    if state.status in ("finished", "failed"):
        raise ConfigError("resume", resume, f"an interrupted run; run {resume} is {state.status}"
                          + (f" ({state.reason})" if state.reason else ""))
    if lock_is_held(root / state.run_id):
        raise ConfigError("resume", resume, f"a run no live process is running; run {resume} "
                          f"is running in process {state.pid} on {state.host}")
    return state


class RunCheckpoints:
    """The checkpoint folder of one run, locked by this process while the run goes on."""

    def __init__(self, root: str | os.PathLike, state: RunState):
        self.state = state
        self.dir = Path(root) / state.run_id
        self._lock = None

    def acquire(self, resuming: bool = False) -> None:
        """Takes the run's lock and records this process; cleans partial writes of a dead one.

        Raises:
            ConfigError: ``resuming`` and another process holds the lock (it resumes the run).
            HarnessError: another process holds the lock of this new run.
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            sweep_partial_writes(self.dir)
            self._lock = open(self.dir / LOCK_FILE, "a")
        except OSError as exc:
            raise ConfigError("checkpoint_root", str(self.dir.parent),
                              f"a writable folder ({exc.strerror})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            if resuming:
                raise ConfigError("resume", self.state.run_id,
                                  "a run no other process is resuming; this one is being "
                                  f"resumed elsewhere (lock {self.dir / LOCK_FILE} is held): "
                                  "nothing was changed here") from None
            raise HarnessError(f"Run {self.state.run_id} is already running in another "
                               f"process (lock {self.dir / LOCK_FILE}).") from None
        self.state.pid, self.state.host = os.getpid(), socket.gethostname()
        self.save_state()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def save_state(self) -> None:
        self.state.updated = time.time()
        _write_json(self.dir / STATE_FILE,
                    {"format": STATE_FORMAT, **dataclasses.asdict(self.state)})

    # ------------------------------------------------------------------ milestones and ledger
    def done(self, milestone: str) -> bool:
        return milestone in self.state.milestones

    def complete(self, milestone: str, metrics: Optional[Dict[str, float]] = None,
                 step: int = 0, **values) -> None:
        """Records a milestone with the metrics it logs, before they are logged.

        Logged after the state is written, a metric point is either in the ledger (a resumed
        run delivers it if MLflow lacks it) or not yet computed (the milestone runs again).
        """
        for key, value in (metrics or {}).items():
            self.state.metrics.append([key, float(value), int(step)])
        self.state.values.update(values)
        if milestone not in self.state.milestones:
            self.state.milestones.append(milestone)
        self.save_state()

    # -------------------------------------------------------------------------- checkpoints
    def save_epoch(self, model, phase: str, epochs_done: int, metrics: Dict[str, float],
                   step: int, values: Optional[List[List[np.ndarray]]] = None) -> None:
        """Writes the phase's checkpoint after ``epochs_done`` epochs, then the state naming it.

        ``values``: :func:`state_arrays` of ``model``, when the caller already read them.
        """
        name = f"{phase.replace('/', '-')}-e{epochs_done:04d}"
        self.save_arrays(name, values if values is not None else state_arrays(model))
        previous = self.state.checkpoint
        self.state.checkpoint = f"{name}.npz"
        self.state.epochs[phase] = epochs_done
        for key, value in metrics.items():
            self.state.metrics.append([key, float(value), int(step)])
        self.save_state()
        if previous and previous != self.state.checkpoint:
            (self.dir / previous).unlink(missing_ok=True)

    def restore(self, model, phase: str) -> int:
        """Loads the newest checkpoint of ``phase`` into ``model``, optimizer included.

        ``model`` must be compiled as it was when the checkpoint was written. Returns the
        number of epochs of ``phase`` already done (0: nothing restored).
        """
        done = self.state.phase_epochs(phase)
        if done == 0:
            return 0
        # The optimizer's variables exist only once it is built; then they can be filled.
        model.optimizer.build(model.trainable_variables)
        self._assign_newest(model, optimizer=True)
        log.info("%s: restored epoch %d from %s", phase, done, self.dir / self.state.checkpoint)
        return done

    def load_newest_weights(self, model) -> bool:
        """Copies the newest checkpoint's model variables (not its optimizer's) into ``model``."""
        if not self.state.checkpoint:
            return False
        self._assign_newest(model, optimizer=False)
        return True

    def _assign_newest(self, model, optimizer: bool) -> None:
        """Assigns the newest checkpoint's arrays to ``model``'s variables (and its
        optimizer's); raises HarnessError, assigning nothing, when they do not fit."""
        name = self.state.checkpoint
        saved = self.load_arrays(name[:-len(".npz")]) if name.endswith(".npz") else None
        if saved is None or len(saved) != 2:
            saved = [[], []]  # not a checkpoint this version writes: refused below
        model_part, optimizer_part = state_variables(model)
        targets = model_part + (optimizer_part if optimizer else [])
        arrays = saved[0] + (saved[1] if optimizer else [])
        if [tuple(v.shape) for v in targets] != [a.shape for a in arrays]:
            raise HarnessError(f"The checkpoint {self.dir / name} does not fit this model: it "
                               f"was written by another config (or another tfharness).")
        for variable, value in zip(targets, arrays):
            variable.assign(value)

    def save_arrays(self, name: str, layers: List[List[np.ndarray]]) -> None:
        arrays = {f"l{i}_w{j}": w for i, layer in enumerate(layers) for j, w in enumerate(layer)}
        counts = np.array([len(layer) for layer in layers])

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, __counts__=counts, **arrays)

        atomic_write(self.dir / f"{name}.npz", write)

    def load_arrays(self, name: str) -> Optional[List[List[np.ndarray]]]:
        path = self.dir / f"{name}.npz"
        if not path.is_file():
            return None
        with np.load(path) as archive:
            return [[archive[f"l{i}_w{j}"] for j in range(int(n))]
                    for i, n in enumerate(archive["__counts__"])]

    def end(self, status: str, reason: Optional[str] = None) -> None:
        """Records how the run ended; a finished run's checkpoints are no longer needed."""
        self.state.status, self.state.reason = status, reason
        try:
            if status == "finished":
                import shutil

                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                self.save_state()
        finally:
            self.release()


def state_variables(model) -> tuple:
    """The variables a resumed phase needs, in a fixed order: the model's (``model.variables``:
    weights, BatchNormalization statistics, dropout seed state), and its optimizer's."""
    optimizer = getattr(model, "optimizer", None)
    return list(model.variables), list(optimizer.variables) if optimizer is not None else []


def state_arrays(model) -> List[List[np.ndarray]]:
    """The values of :func:`state_variables`: ``[model arrays, optimizer arrays]``."""
    return [[np.asarray(v.numpy()) for v in part] for part in state_variables(model)]


def _all_finite(values: List[np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in values if np.issubdtype(v.dtype, np.floating))


def epoch_checkpointer(checkpoints: RunCheckpoints, tracker, phase: str, prefix: str,
                       step_offset: int = 0, label: Optional[str] = None,
                       end_epoch: Optional[int] = None):
    """A Keras callback that, at the end of each epoch: stops on a non-finite loss, writes the
    checkpoint and the state, then queues the epoch's metrics (in that order, see
    :meth:`RunCheckpoints.complete`).

    When a callback before it (EarlyStopping) stopped training, the epoch is recorded as the
    phase's last: the metric ``<prefix>/stopped_epoch`` (epochs trained) goes with the epoch's
    metrics and the state counts the phase as done up to ``end_epoch``, so a resumed run does
    not train on past the stop.
    """
    import keras

    class EpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()
                    if np.isscalar(v) or np.ndim(v) == 0}
            loss = logs.get("loss")
            values = state_arrays(self.model)
            fault = None
            if loss is not None and not np.isfinite(loss):
                fault = f"The training loss became {loss}"
            elif not _all_finite(values[0]):
                # Keras clips probabilities before the log, so NaN outputs can leave the
                # reported loss finite while the weights are already NaN.
                fault = f"The weights became NaN or infinite (reported loss {loss})"
            if fault:
                # Before any checkpoint or metric of this epoch: the last good one stays.
                raise NumericalError(f"{fault} in {label or phase}, epoch {epoch + 1}; the "
                                     f"phase stopped, the last good checkpoint "
                                     f"({checkpoints.state.checkpoint or 'none'}) is kept.")
            metrics = {f"{prefix}/{k}": v for k, v in logs.items()}
            done = epoch + 1
            if self.model.stop_training and end_epoch is not None and done < end_epoch:
                metrics[f"{prefix}/stopped_epoch"] = float(done)
                done = end_epoch
            checkpoints.save_epoch(self.model, phase, done, metrics, step_offset + epoch,
                                   values)
            tracker.log_metrics(metrics, step=step_offset + epoch)

    return EpochCheckpoint()


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Turns SIGINT and SIGTERM into :class:`RunInterrupted`, raised where the run is.

    Training stops at once (the last completed epoch's checkpoint stays), and the runner ends
    the run KILLED. Further signals while it cleans up are ignored, so the cleanup finishes.
    The previous handlers come back on exit. Only the main thread can install handlers; elsewhere
    (a launcher's worker thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def handle(signum, frame):
        if raised:
            return
        raised.append(signum)
        raise RunInterrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
