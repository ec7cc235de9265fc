"""Opening the tracking store: many runs started together on one store, and stores that cannot be
opened. Real processes, real stores (SQLite under tmp_path, `mlflow server`, PostgreSQL when its
binaries are installed), checked through MlflowClient by scripts/stress-store."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest

import tfharness
from tfharness.tracking import store
from tfharness.errors import TrackingError

from conftest import ROOT, TINY_SYNTHETIC, empty_store, free_port
import prewarmed

sys.path.insert(0, str(ROOT / "benchmarks"))
import stress_store  # noqa: E402

SRC = str(ROOT / "src")


def stress(*args: str, capsys) -> dict:
    """benchmarks/stress_store.py with ``args`` (what scripts/stress-store runs), its runs in
    prewarmed processes; returns its JSON summary after checking its exit status."""
    code = stress_store.main(list(args), launch=prewarmed.Popen)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_the_stress_script_runs_from_its_command():
    done = subprocess.run(["bash", str(ROOT / "scripts" / "stress-store"), "--help"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TFHARNESS_NO_SETUP": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--processes" in done.stdout and "--store" in done.stdout


def test_runs_started_together_on_a_fresh_sqlite_store_all_finish_while_another_client_opens_it(
        capsys):
    summary = stress("--processes", "3", "--rounds", "1", "--poll", capsys=capsys)
    assert (summary["runs"], summary["failures"], summary["problems"]) == (3, 0, 0)


@pytest.mark.skipif(stress_store.postgres_bin() is None, reason="PostgreSQL is not installed "
                    "(apt-get install postgresql): initdb and pg_ctl are needed")
@pytest.mark.skipif(importlib.util.find_spec("psycopg2") is None,
                    reason="psycopg2 (pip install psycopg2-binary) is not installed")
def test_runs_started_together_on_a_server_backed_by_postgresql_all_finish(capsys):
    summary = stress("--store", "postgres", "--processes", "3", "--rounds", "1", capsys=capsys)
    assert (summary["runs"], summary["failures"], summary["problems"]) == (3, 0, 0)


def test_runs_that_log_the_same_new_dataset_at_once_all_record_it(tmp_path):
    """MLflow's store looks a dataset up and then inserts it, so runs logging the same new
    dataset at the same moment race for the insert (CI saw this on PostgreSQL: UniqueViolation
    on dataset_pk, the run ended FAILED). The dataset job tries again after losing the race."""
    from mlflow import MlflowClient

    from tfharness.tracking.jobs import InputsJob

    uri = empty_store(tmp_path / "mlflow.db")
    client, experiment_id = store.open_experiment(uri, "e")
    run_ids = [client.create_run(experiment_id).info.run_id for _ in range(6)]
    errors: list = []
    for round_ in range(8):  # a round of 6 writers loses the race for most of them
        dataset = {"name": "train", "digest": f"digest{round_}", "source_type": "code",
                   "source": "{}", "context": "pretrain/train"}
        start = threading.Barrier(len(run_ids))

        def log(run_id: str) -> None:
            own_client = MlflowClient(uri)
            start.wait()
            try:
                InputsJob("datasets", [dataset]).deliver(own_client, run_id)
            except Exception as exc:  # what the run would end FAILED with
                errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")

        threads = [threading.Thread(target=log, args=(run_id,)) for run_id in run_ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    for run_id in run_ids:
        digests = sorted(d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs)
        assert digests == [f"digest{r}" for r in range(8)]


def test_a_run_whose_creation_got_no_answer_is_opened_once(mlflow_server_process, monkeypatch,
                                                           tmp_path):
    """The server stops answering (paused) while a run opens: the creation is tried again until
    it answers, and a creation the server carried out late is found by the run's own token
    instead of being made a second time."""
    import signal
    import time

    from mlflow import MlflowClient

    from tfharness.config import to_typed
    from tfharness.tracking import runs

    url, server = mlflow_server_process
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracking = to_typed(tfharness.compose([f"tracking.uri={url}", f"output_dir={tmp_path}"])).tracking
    opened = runs.connect(tracking, own_retries=True)
    os.killpg(server.pid, signal.SIGSTOP)
    try:
        got: dict = {}
        opening = threading.Thread(target=lambda: got.update(
            run_id=runs.open_run(opened, tracking, "paused", {}, None)))
        opening.start()
        time.sleep(6)  # tries time out after 2 s each
        assert opening.is_alive()
    finally:
        os.killpg(server.pid, signal.SIGCONT)
    opening.join(90)
    assert not opening.is_alive() and "run_id" in got
    found = MlflowClient(url).search_runs([opened.experiment_id])
    assert [r.info.run_id for r in found] == [got["run_id"]]
    assert found[0].data.tags[runs.OPEN_TOKEN_TAG]


def test_a_fresh_sqlite_store_is_created_once_under_a_lock_beside_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}"
    client, experiment_id = store.open_experiment(uri, "e")
    assert (tmp_path / "sub" / "mlflow.db.lock").exists()
    assert client.get_experiment_by_name("e").experiment_id == experiment_id
    assert store.open_experiment(uri, "e")[1] == experiment_id  # found, not created again


def _tables(db: Path) -> set:
    with closing(sqlite3.connect(db)) as conn:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_master "
                                                 "WHERE type = 'table'")}


def test_a_store_a_dead_migration_left_half_made_is_repaired_when_a_run_opens_it(tmp_path):
    """A migration killed after copying a table leaves ``_alembic_tmp_<table>`` behind (CI saw
    it when a client racing the runs on a fresh store died half-way): MLflow itself then cannot
    open the store again, since its migration of that table trips on the copy."""
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)")
        conn.commit()
    uri = f"sqlite:///{db}"
    with pytest.raises(Exception, match="_alembic_tmp_experiments already exists"):
        MlflowClient(uri).search_experiments()  # the trap, as MLflow alone meets it

    _, experiment_id = store.open_experiment(uri, "e")
    assert not {t for t in _tables(db) if t.startswith("_alembic_tmp_")}
    assert MlflowClient(uri).get_experiment_by_name("e").experiment_id == experiment_id


def test_a_complete_store_keeps_no_leftover_copy_that_would_trip_a_later_migration(tmp_path):
    uri = empty_store(tmp_path / "mlflow.db")
    with closing(sqlite3.connect(tmp_path / "mlflow.db")) as conn:
        conn.execute("CREATE TABLE _alembic_tmp_trace_info (request_id TEXT)")
        conn.commit()
    store.open_experiment(uri, "e")
    tables = _tables(tmp_path / "mlflow.db")
    assert "_alembic_tmp_trace_info" not in tables and {"experiments", "runs"} <= tables


def test_a_leftover_copy_that_may_hold_the_only_rows_of_its_table_is_kept(tmp_path):
    db = tmp_path / "mlflow.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE _alembic_tmp_runs (run_uuid TEXT)")  # no table 'runs'
        conn.execute("INSERT INTO _alembic_tmp_runs VALUES ('a run')")
        conn.execute("CREATE TABLE _alembic_tmp_params (key TEXT)")  # empty: nothing to lose
        conn.commit()
    assert store.drop_leftover_copies(db) == ["_alembic_tmp_params"]
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT run_uuid FROM _alembic_tmp_runs").fetchall() == [("a run",)]


@pytest.mark.parametrize("uri, why", [
    ("ftp://nowhere", "unsupported URI scheme"),
    ("sqlite:////proc/no/such.db", "cannot create the folder /proc/no"),
])
def test_a_store_that_cannot_be_opened_names_tracking_uri(uri, why):
    with pytest.raises(TrackingError) as raised:
        store.open_experiment(uri, "e")
    message = str(raised.value)
    assert f"'tracking.uri': got {uri!r}" in message and why in message
    assert "\n" not in message


def test_race_errors_are_told_from_real_ones():
    try:
        try:
            raise RuntimeError("(sqlite3.OperationalError) duplicate column name: step")
        except RuntimeError as inner:
            raise ValueError("migration failed") from inner
    except ValueError as outer:
        assert store.is_race(outer)
    assert not store.is_race(PermissionError("attempt to write a readonly database"))


@pytest.mark.parametrize("backend, process", [("harness", "false"), ("mlflow", "false"),
                                              ("harness", "true")])
def test_broken_tracking_uris_are_one_line_exit_1_and_no_run(tmp_path, backend, process):
    down = f"http://127.0.0.1:{free_port()}"
    for uri in ("ftp://nowhere", "sqlite:////proc/no/such.db", down):
        done = prewarmed.run(
            [sys.executable, "-m", "tfharness", *TINY_SYNTHETIC, f"tracking.uri={uri}",
             f"tracking.async_backend={backend}", f"tracking.process={process}",
             f"output_dir={tmp_path / 'out'}", f"checkpoint_root={tmp_path / 'ckpt'}",
             "print_report=false"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": SRC, "TF_CPP_MIN_LOG_LEVEL": "3",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        assert done.returncode == 1, (uri, done.stderr[-2000:])
        said = [line for line in done.stderr.splitlines() if line.startswith("tfharness:")]
        assert len(said) == 1 and f"'tracking.uri': got {uri!r}" in said[0], done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        # No run anywhere: nothing in the checkpoint folder, no models written.
        assert not list(Path(tmp_path / "ckpt").glob("*/state.json"))
        assert not (tmp_path / "out" / "models").exists() or not any(
            (tmp_path / "out" / "models").iterdir())


def test_a_run_that_fails_before_its_store_is_opened_never_creates_it(tmp_path):
    """The tracker lets go of a store its connect thread has not begun to open: that thread
    then creates nothing; one that began is waited for (the store is complete, never half
    made)."""
    from tfharness.config import TrackingConfig
    from tfharness.tracking.runs import ConnectAbandoned
    from tfharness.tracking.tracker import MlflowTracker

    db = tmp_path / "never.db"
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{db}"))
    tracker._gate.close()  # what finish() does when no run opened
    tracker.connect()
    assert isinstance(tracker._connect_error, ConnectAbandoned)
    assert not db.exists()

    opened = tmp_path / "opened.db"
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{opened}"))
    tracker.connect_meanwhile()
    thread = tracker._connecting
    tracker.finish(ValueError("bad data"))
    if tracker._gate.opening:  # it had begun: finish waited for the whole store
        assert not thread.is_alive()
        import mlflow

        assert mlflow.MlflowClient(f"sqlite:///{opened}").get_experiment_by_name("tfharness")
    else:
        thread.join(60)
        assert not opened.exists()
