"""Crash safety with real processes: SIGKILL and SIGTERM of `python -m tfharness`, resume, atomic
artifacts, a NaN loss, a read-only folder, a tracking server stopped mid-run, the spool and its
replay. Kill points are made deterministic by a pause that the tests install in the middle of a
save (tests/pause_in_save.py); scripts/kill-resume-soak kills at random moments instead."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

import tfharness
from tfharness.artifacts import checkpoint, serialization
from tfharness.errors import ConfigError, NumericalError, SaveError

import pause_in_save
import prewarmed
from conftest import TINY_SYNTHETIC, empty_store, free_port, only_run, wait_for_server

SRC = str(Path(tfharness.__file__).resolve().parents[1])
RUN = [*TINY_SYNTHETIC, "model.units=[8]", "trainer.epochs=4", "finetune.epochs=3",
       "finetune.freeze=[]"]
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
# Same ops in the same order on the same CPU: resumed and uninterrupted runs agree exactly here;
# the tolerance only allows for a different CPU's kernels.
TOLERANCE = 1e-6


def harness(tmp: Path, *overrides: str, pause: str = "", env=None,
            own_group: bool = False) -> subprocess.Popen:
    """`python -m tfharness` in ``tmp`` (Hydra writes its folders there), tracking into tmp."""
    environment = {**os.environ, "PYTHONPATH": SRC, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    empty_store(tmp / "mlflow.db")
    python = [sys.executable]
    if pause:
        fragment, marker, *seconds = pause.split(":")
        python = pause_in_save.command(fragment, Path(marker), *map(float, seconds))
    return prewarmed.Popen(
        [*python, "-m", "tfharness", *RUN, f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
         f"checkpoint_root={tmp / 'checkpoints'}", "print_report=false", "resume=true",
         *overrides], cwd=tmp, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=own_group)


def logged_model_names(client, run) -> set:
    return {m.name for m in client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")}


# The command's tracking process as outside the suite: a fresh interpreter, its own child.
FRESH_TRACKING_PROCESS = {prewarmed.FRESH_TRACKING_PROCESS: "1"}


def tracking_processes_of(pid: int) -> list:
    """The pids of the tfharness tracking processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if parent == pid and "tfharness.tracking.process" in command:
            found.append(int(entry.name))
    return found


def gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited, waiting for its (dead) parent's reaper
            return True
        time.sleep(0.1)
    return False


def wait_for(marker: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"exited {process.returncode} before the pause: {process.stderr.read()}")
        assert time.time() < deadline, "the harness never reached the pause"
        time.sleep(0.05)


def kill_at(tmp: Path, fragment: str, *overrides: str) -> None:
    """Runs the harness until it pauses while saving ``fragment``, then SIGKILLs it."""
    marker = tmp / f"paused-{fragment}"
    process = harness(tmp, *overrides, pause=f"{fragment}:{marker}")
    wait_for(marker, process)
    process.kill()
    process.wait(timeout=30)


def state_of(tmp: Path) -> checkpoint.RunState:
    (state_file,) = (tmp / "checkpoints").glob(f"*/{checkpoint.STATE_FILE}")
    return checkpoint.RunState.read(state_file)


def histories(client, run_id: str):
    return {f"{phase}/{name}": [(m.step, m.value) for m in sorted(
        client.get_metric_history(run_id, f"{phase}/{name}"), key=lambda m: m.step)]
        for phase in ("pretrain", "finetune") for name in EPOCH_METRICS}


def test_sigkill_in_pretraining_and_in_finetuning_then_resume_matches_an_uninterrupted_run(
        tmp_path, make_cfg):
    # With dropout: the checkpoint keeps the dropout seed state, so even the masks match.
    dropout = "model.dropout=0.25"
    baseline_uri = empty_store(tmp_path / "baseline.db")
    baseline = tfharness.run(make_cfg([*RUN, dropout, f"tracking.uri={baseline_uri}"],
                                      out="baseline"))
    base_client = mlflow.MlflowClient(baseline_uri)
    expected = histories(base_client, baseline.run_id)

    # Killed while writing the checkpoint of pretraining epoch 2: epoch 1 is the last complete.
    kill_at(tmp_path, "pretrain-e0002", dropout)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    killed = only_run(client)
    assert killed.info.status == "RUNNING"  # what SIGKILL leaves behind
    assert state_of(tmp_path).epochs == {"pretrain": 1}

    # Resumed, then killed again in the second epoch of fine-tuning.
    kill_at(tmp_path, "finetune-0-e0002", dropout)
    assert only_run(client).info.run_id == killed.info.run_id
    assert state_of(tmp_path).epochs == {"pretrain": 4, "finetune/0": 1}

    result = tfharness.run(make_cfg([*RUN, dropout, "resume=true"], out="ignored"))
    run = only_run(client)
    assert result.run_id == run.info.run_id == killed.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["tfharness.resumes"] == "2"
    resumed = histories(client, run.info.run_id)
    for key, points in expected.items():
        epochs = 4 if key.startswith("pretrain") else 3
        assert [step for step, _ in resumed[key]] == list(range(epochs)), key  # each once
        np.testing.assert_allclose([v for _, v in resumed[key]], [v for _, v in points],
                                   rtol=0, atol=TOLERANCE, err_msg=key)
    for key in ("test/loss", "test/accuracy", "pretrain/test_loss"):
        assert abs(run.data.metrics[key] - base_client.get_run(baseline.run_id).data.metrics[
            key]) <= TOLERANCE, key
    # The run kept its first output folder; no partial write anywhere; checkpoints cleaned up.
    models = Path(state_of_output(run)) / "models"
    assert sorted(p.name for p in models.iterdir()) == [
        "finetuned", "finetuned.sha256.json", "pretrained", "pretrained.sha256.json"]
    assert not any((tmp_path / "checkpoints").iterdir())
    assert logged_model_names(client, run) == {"pretrained", "finetuned"}


def test_a_run_that_reused_a_pretraining_resumes_after_sigkill_and_still_reuses_it(
        tmp_path, make_cfg):
    producer = harness(tmp_path)  # an empty store: this run pretrains
    assert producer.wait(timeout=600) == 0, producer.stderr.read()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    made = only_run(client)
    assert made.data.tags["tfharness.pretrain"] == "trained"

    # Other fine-tune settings, the same pretraining: reused, then killed in fine-tuning.
    tuned = "finetune.learning_rate=0.003"
    kill_at(tmp_path, "finetune-0-e0002", tuned)
    (killed,) = [r for r in client.search_runs([made.info.experiment_id])
                 if r.info.run_id != made.info.run_id]
    assert killed.info.status == "RUNNING"
    assert killed.data.tags["tfharness.pretrain_reused_from"] == made.info.run_id
    assert state_of(tmp_path).epochs == {"finetune/0": 1}

    resumed = harness(tmp_path, tuned)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tfharness.resumes"] == "1"
    assert run.data.tags["tfharness.pretrain"] == "reused"
    assert run.data.tags["tfharness.pretrain_reused_from"] == made.info.run_id
    assert not [key for key in run.data.metrics if key.startswith("pretrain/")]
    assert logged_model_names(client, run) == {"finetuned"}

    # The same run uninterrupted (it reuses the same pretraining): the same numbers.
    baseline = tfharness.run(make_cfg([*RUN, tuned, "pretrain_cache=auto"], out="baseline"))
    base = client.get_run(baseline.run_id)
    assert base.data.tags["tfharness.pretrain_reused_from"] == made.info.run_id
    expected, got = histories(client, baseline.run_id), histories(client, run.info.run_id)
    for key in (k for k in expected if k.startswith("finetune/")):
        assert [step for step, _ in got[key]] == [0, 1, 2], key  # each epoch once
        np.testing.assert_allclose([v for _, v in got[key]], [v for _, v in expected[key]],
                                   rtol=0, atol=TOLERANCE, err_msg=key)
    for key in ("test/loss", "test/accuracy"):
        assert abs(run.data.metrics[key] - base.data.metrics[key]) <= TOLERANCE, key


def state_of_output(run) -> str:
    return run.data.tags["output_dir"]


def test_two_resumes_of_one_run_at_once_one_resumes_the_other_says_so(tmp_path):
    kill_at(tmp_path, "pretrain-e0002")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    killed = only_run(client)
    first, second = harness(tmp_path), harness(tmp_path)  # both resume=true, started together
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    assert sorted(code for code, _ in outcomes) == [0, 1], [(c, e[-1500:]) for c, e in outcomes]
    (refused,) = [stderr for code, stderr in outcomes if code == 1]
    said = [line for line in refused.splitlines() if line.startswith("tfharness:")]
    assert len(said) == 1 and "being resumed elsewhere" in said[0] and "'resume'" in said[0]
    assert "Traceback" not in refused
    run = only_run(client)  # no second run was opened
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["tfharness.resumes"] == "1"
    for key, points in histories(client, run.info.run_id).items():
        epochs = 4 if key.startswith("pretrain") else 3
        assert [step for step, _ in points] == list(range(epochs)), key  # each epoch once


def test_a_resumer_that_has_the_lock_but_has_not_written_its_state_is_seen(tmp_path):
    """The moment between a resuming process taking the lock and writing its state: the state
    still names the killed process, as running and never resumed."""
    import fcntl
    import socket

    gone = subprocess.Popen(["true"])
    gone.wait()
    held = checkpoint.RunCheckpoints(tmp_path, checkpoint.RunState(
        run_id="r1", config_hash="h", output_dir=str(tmp_path), pid=gone.pid,
        host=socket.gethostname()))
    held.dir.mkdir()
    held.save_state()
    with open(held.dir / checkpoint.LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the resumer's lock
        with pytest.raises(ConfigError, match="'resume'.*being resumed elsewhere"):
            checkpoint.find_resumable(tmp_path, True, "h")
        # Its own process alive and holding the lock: a run still going, not one to resume.
        held.state.pid = os.getpid()
        held.save_state()
        assert checkpoint.find_resumable(tmp_path, True, "h") is None
    assert checkpoint.find_resumable(tmp_path, True, "h").run_id == "r1"  # lock free: resumable


def test_sigkill_takes_the_tracking_process_with_it_and_leaves_the_run_running(tmp_path):
    marker = tmp_path / "paused"
    process = harness(tmp_path, "tracking.process=true", pause=f"pretrain-e0002:{marker}",
                      env=FRESH_TRACKING_PROCESS)
    wait_for(marker, process)
    (tracker,) = tracking_processes_of(process.pid)
    process.kill()
    process.wait(timeout=30)
    assert gone(tracker), "the tracking process outlived the killed training process"
    run = only_run(mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert run.info.status == "RUNNING"  # as a killed process leaves it; the next run marks it


def test_ctrl_c_to_the_process_group_ends_the_run_killed_through_the_tracking_process(tmp_path):
    marker = tmp_path / "paused"
    process = harness(tmp_path, "tracking.process=true", pause=f"pretrain-e0002:{marker}",
                      own_group=True, env=FRESH_TRACKING_PROCESS)
    wait_for(marker, process)
    (tracker,) = tracking_processes_of(process.pid)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, stderr
    run = only_run(mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert run.info.status == "KILLED"
    assert "SIGINT" in run.data.tags["error"]
    assert gone(tracker)


def test_a_dead_tracking_process_fails_the_run_clearly(tmp_path, make_cfg, monkeypatch, client):
    from tfharness.tracking import process as tracking_process
    from tfharness.errors import TrackingError

    marker = tmp_path / "paused"
    monkeypatch.setattr(serialization, "_fsync_tree",
                        pause_in_save.pausing("pretrain-e0002", marker, 2))

    def kill_tracking_process_at_the_pause() -> None:
        deadline = time.time() + 90
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
        tracking_process.shared_process().process.kill()

    killer = threading.Thread(target=kill_tracking_process_at_the_pause)
    killer.start()
    with pytest.raises(TrackingError, match="tracking process is gone"):
        tfharness.run(make_cfg([*RUN, "tracking.process=true"]))
    killer.join()
    run = only_run(client)
    assert run.info.status == "FAILED"  # never left RUNNING, never FINISHED with holes
    assert "tracking process is gone" in run.data.tags["error"]
    # The next run starts a new tracking process (the marker exists: no pause this time).
    result = tfharness.run(make_cfg([*RUN, "trainer.epochs=1", "finetune=none",
                                     "tracking.process=true"], out="again"))
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_sigkill_during_a_model_save_leaves_the_old_state_and_resumes(tmp_path, make_cfg):
    kill_at(tmp_path, "pretrained")
    (out,) = (tmp_path / "outputs").glob("*/*")
    models = out / "models"
    names = [p.name for p in models.iterdir()]
    assert "pretrained" not in names  # never a half-written artifact under the real name
    assert any(n.startswith(".pretrained.tmp-") for n in names)  # what a SIGKILL leaves

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    dead = only_run(client)
    # A later run with another config finds the run whose process died: KILLED, not RUNNING.
    tfharness.run(make_cfg([*TINY_SYNTHETIC, "trainer.epochs=1", "finetune=none",
                            "tracking.experiment=other"], out="other"))
    dead = client.get_run(dead.info.run_id)
    assert dead.info.status == "KILLED"
    assert "process died" in dead.data.tags["tfharness.interrupted"]

    result = tfharness.run(make_cfg([*RUN, "resume=true"]))
    assert result.run_id == dead.info.run_id
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert sorted(p.name for p in models.iterdir()) == [
        "finetuned", "finetuned.sha256.json", "pretrained", "pretrained.sha256.json"]
    probe = np.zeros((2, 12), np.float32)
    assert serialization.load_model(models / "pretrained")(probe).shape == (2, 4)


def test_sigterm_stops_promptly_marks_the_run_killed_and_keeps_the_checkpoint(tmp_path):
    marker = tmp_path / "paused"
    # Paused far longer than the test waits: only a prompt stop lets communicate() return.
    process = harness(tmp_path, pause=f"pretrain-e0003:{marker}:3600")
    wait_for(marker, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted by SIGTERM" in stderr and "resume=true" in stderr
    run = only_run(mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert run.info.status == "KILLED"
    assert "SIGTERM" in run.data.tags["error"]
    state = state_of(tmp_path)
    assert (state.status, state.epochs, state.checkpoint) == (
        "killed", {"pretrain": 2}, "pretrain-e0002.npz")
    run_dir = tmp_path / "checkpoints" / state.run_id
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "lock", "pretrain-e0002.npz", "state.json"]  # the temporary was removed
    model_arrays, optimizer_arrays = checkpoint.RunCheckpoints(
        tmp_path / "checkpoints", state).load_arrays("pretrain-e0002")  # complete and readable
    assert model_arrays and optimizer_arrays


def test_a_nan_loss_fails_the_run_at_that_epoch_and_keeps_the_last_good_checkpoint(
        make_cfg, client, tmp_path):
    with pytest.raises(NumericalError, match="loss became nan in fine-tune stage .* epoch 2"):
        tfharness.run(make_cfg([*RUN, "finetune.learning_rate=1e35"]))
    run = only_run(client)
    assert run.info.status == "FAILED"
    assert "NumericalError" in run.data.tags["error"] and "epoch 2" in run.data.tags["error"]
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "finetune/loss")]
    assert len(losses) == 1 and np.isfinite(losses[0])  # the NaN epoch was never logged
    state = checkpoint.RunState.read(tmp_path / "checkpoints" / run.info.run_id / "state.json")
    assert state.status == "failed" and state.checkpoint == "finetune-0-e0001.npz"
    weights, _ = checkpoint.RunCheckpoints(tmp_path / "checkpoints", state).load_arrays(
        "finetune-0-e0001")
    assert weights and all(np.isfinite(w).all() for w in weights if w.dtype.kind == "f")
    with pytest.raises(ConfigError, match="an interrupted run; run .* is failed"):
        tfharness.run(make_cfg([*RUN, "finetune.learning_rate=1e35",
                                f"resume={run.info.run_id}"]))


@pytest.fixture
def read_only(tmp_path):
    """Makes a folder read-only even for root (a read-only bind mount); undone afterwards."""
    mounted = []

    def make(folder: Path) -> None:
        if os.geteuid() != 0:
            folder.chmod(0o555)
            return
        done = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot make a read-only folder here: {done.stderr.strip()}")
        mounted.append(folder)

    yield make
    for folder in reversed(mounted):  # inner mounts are hidden by outer ones: last first
        subprocess.run(["umount", str(folder)], check=False)


def test_a_read_only_output_folder_is_a_clear_error_and_earlier_models_stay_loadable(
        make_cfg, client, tmp_path, read_only):
    quick = [*TINY_SYNTHETIC, "trainer.epochs=1", "finetune=none", "model.units=[4]"]
    tfharness.run(make_cfg(quick))
    models = tmp_path / "out" / "models"
    before = serialization.load_model(models / "pretrained").get_weights()
    read_only(models)
    with pytest.raises(SaveError, match="Cannot write .*pretrained: Read-only file system; "
                                        "the previous version is kept"):
        tfharness.run(make_cfg([*quick, "trainer.seed=7"]))
    runs = client.search_runs([client.get_experiment_by_name("tfharness").experiment_id],
                              order_by=["start_time DESC"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    after = serialization.load_model(models / "pretrained").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after))

    read_only(tmp_path / "out")  # the whole folder: refused before any training
    with pytest.raises(ConfigError, match="'output_dir'.*a folder this process can write"):
        tfharness.run(make_cfg(quick))
    assert len(client.search_runs([runs[0].info.experiment_id])) == 2


def test_atomic_write_killed_mid_replace_keeps_the_old_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    marker = tmp_path / "paused"
    code = ("from pathlib import Path; from tfharness.serialization import atomic_write\n"
            "def write(tmp):\n    tmp.mkdir(); (tmp / 'weights').write_text('new')\n"
            f"atomic_write(Path({str(target)!r}), write)\n")
    process = prewarmed.Popen([*pause_in_save.command("model", marker), "-c", code],
                              env={**os.environ, "PYTHONPATH": SRC})
    wait_for(marker, process, timeout=30)
    process.kill()
    process.wait()
    assert (target / "weights").read_text() == "old"
    serialization.sweep_partial_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "paused"]
    # Killed between the two renames of a directory swap: the old copy is put back.
    (tmp_path / "model").rename(tmp_path / ".model.old-0123abcd")
    serialization.sweep_partial_writes(tmp_path)
    assert (target / "weights").read_text() == "old"


def test_resume_rejects_an_unknown_run_id_with_the_key_named(make_cfg):
    with pytest.raises(ConfigError, match="'resume': got 'abc'.*interrupted run"):
        tfharness.run(make_cfg([*RUN, "resume=abc"]))
    with pytest.raises(ConfigError, match="'resume'"):
        tfharness.run(make_cfg([*RUN, "resume=a/b"]))


# ------------------------------------------------------------------------ tracking outages
class Server:
    """A real `mlflow server` on 127.0.0.1 that a test can stop and start again (same port,
    same stores)."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> None:
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        self.process = prewarmed.Popen(  # its uvicorn worker is a fresh interpreter still
            [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", empty_store(self.folder / "server.db"),
             "--artifacts-destination", str(self.folder / "server-artifacts"),
             "--workers", "1"], cwd=self.folder, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_server(self.url, self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its workers
            self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    instance = Server(tmp_path)
    instance.start()
    yield instance
    instance.stop()


def assert_every_epoch_once(client, run_id: str, pretrain: int = 4, finetune: int = 3) -> None:
    for phase, epochs in (("pretrain", pretrain), ("finetune", finetune)):
        for name in EPOCH_METRICS:
            steps = [m.step for m in client.get_metric_history(run_id, f"{phase}/{name}")]
            assert sorted(steps) == list(range(epochs)), (phase, name, steps)


def test_a_server_stopped_and_restarted_mid_run_receives_every_metric_point(tmp_path, server):
    # Through a tracking process: its tracker retries there, and its log lines reach the
    # command's log (the two outage tests below log from the training process).
    marker = tmp_path / "paused"
    process = harness(tmp_path, "tracking=server", f"tracking.uri={server.url}",
                      "tracking.drain_timeout_s=120", "tracking.process=true",
                      pause=f"pretrain-e0002:{marker}:0.5")
    wait_for(marker, process)
    server.stop()  # down while the rest of pretraining and fine-tuning run
    time.sleep(1)
    server.start()
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    assert "unreachable; training goes on" in stdout  # Hydra logs to stdout
    client = mlflow.MlflowClient(server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("tfharness").experiment_id])
    assert run.info.status == "FINISHED"
    assert_every_epoch_once(client, run.info.run_id)
    assert "all delivered late, none lost" in run.data.tags["tfharness.tracking_outage"]
    assert logged_model_names(client, run) == {"pretrained", "finetuned"}


# Two more server starts (about 40 s of a worker here): outside a developer's quick run of
# scripts/test, opt in with TFHARNESS_SLOW_TESTS=1; .ci/run sets it, so CI runs it.
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TFHARNESS_SLOW_TESTS"),
                    reason="slow (two mlflow server starts): set TFHARNESS_SLOW_TESTS=1")
def test_a_server_still_down_at_the_end_gets_the_rest_from_the_spool(tmp_path, server):
    from tfharness import sync

    marker = tmp_path / "paused"
    process = harness(tmp_path, "tracking=server", f"tracking.uri={server.url}",
                      "tracking.drain_timeout_s=1", "tracking.spool_dir=spool",
                      pause=f"pretrain-e0002:{marker}:0.5")
    wait_for(marker, process)
    server.stop()
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr  # never a run killed by a logging call
    assert "python -m tfharness.sync" in stdout
    server.start()
    client = mlflow.MlflowClient(server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("tfharness").experiment_id])
    assert run.info.status == "RUNNING"  # its end is in the spool until the sync
    done = prewarmed.run([sys.executable, "-m", "tfharness.sync", str(tmp_path / "spool")],
                          env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 run(s) delivered" in done.stdout
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert_every_epoch_once(client, run.info.run_id)
    assert "spooled" in run.data.tags["tfharness.tracking_outage"]
    assert logged_model_names(client, run) == {"pretrained", "finetuned"}
    assert sync.sync(str(tmp_path / "spool")) == {}  # replayed once only


def test_an_unreachable_server_at_start_spools_the_whole_run_and_sync_replays_it(
        make_cfg, tmp_path):
    from tfharness import sync

    dead = f"http://127.0.0.1:{free_port()}"
    quick = [*RUN, "trainer.epochs=2", "finetune.epochs=1", "tracking=server",
             f"tracking.uri={dead}", f"tracking.spool_dir={tmp_path / 'spool'}"]
    with pytest.raises(tfharness.HarnessError,
                       match=re.escape(f"'tracking.uri': got {dead!r}; cannot open the MLflow")):
        tfharness.run(make_cfg(quick))
    result = tfharness.run(make_cfg([*quick, "tracking.on_unavailable=spool"]))
    target = empty_store(tmp_path / "server-later.db")
    mapping = sync.sync(str(tmp_path / "spool"), target_uri=target)
    assert list(mapping) == [result.run_id]
    client = mlflow.MlflowClient(target)
    run = client.get_run(mapping[result.run_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.epochs"] == "2"
    assert run.data.tags["tfharness.spooled_from"] == result.run_id
    assert_every_epoch_once(client, run.info.run_id, pretrain=2, finetune=1)
    spooled = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'spool' / 'spool.db'}")
    assert run.data.metrics == spooled.get_run(result.run_id).data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "config.yaml", "overrides.yaml", "reports"}
    (model,) = [m for m in client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
        if m.name == "finetuned"]
    assert mlflow.pyfunc.load_model(model.model_uri).predict(
        np.zeros((2, 12), np.float32)).shape == (2, 3)
    assert json.loads((tmp_path / "spool" / "synced.json").read_text()) == mapping
    assert (tmp_path / "mlartifacts").is_dir() and not Path("mlruns").exists()
