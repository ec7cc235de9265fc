"""Tracking against a real `mlflow server` process on 127.0.0.1, and the run tags."""

from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import mlflow
import numpy as np
import pytest
import yaml

import tfharness
from tfharness import tracking
from tfharness.tracking import store

from conftest import TINY_SYNTHETIC, free_port
import prewarmed


@pytest.mark.parametrize("process, backend", [("true", "harness"), ("true", "mlflow"),
                                              ("false", "harness"), ("false", "mlflow")])
def test_each_async_backend_records_the_whole_run_in_or_out_of_process(tmp_path, tracking_uri,
                                                                      process, backend):
    overrides = [*TINY_SYNTHETIC, "trainer.epochs=1", "finetune.epochs=2",
                 f"tracking.process={process}", f"tracking.async_backend={backend}",
                 f"output_dir={tmp_path / 'out'}",
                 f"checkpoint_root={tmp_path / 'ckpt'}", "tracking.register=tiny",
                 f"tracking.uri={tracking_uri}"]
    script = (f"import tfharness\n"
              f"result = tfharness.run(tfharness.compose({overrides!r}))\n"
              f"print(result.run_id, sorted(result.model_uris), result.registered_versions)\n")
    done = prewarmed.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # At exit the tracking process saw its socket close and left by itself.
    assert "tracking process did not exit" not in done.stderr
    run_id, *rest = done.stdout.split("\n")[-2].split(" ", 1)
    assert rest == ["['finetuned', 'pretrained'] {'tiny': '1'}"]
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tfharness.registered_model"] == "tiny/1"
    assert [m.step for m in client.get_metric_history(run_id, "finetune/loss")] == [0, 1]


def test_a_fresh_process_tracks_from_a_tracking_process_and_never_loads_mlflow(tmp_path):
    """``tracking.process`` left null: a process without MLflow (a command-line run) logs from
    a tracking process of its own, and MLflow does not load in it, the pretrain cache's lookup
    included; a run that reuses a pretrained model downloads it with MLflow."""
    overrides = [*TINY_SYNTHETIC, "trainer.epochs=1", "finetune.epochs=1",
                 f"output_dir={tmp_path / 'out'}", f"checkpoint_root={tmp_path / 'ckpt'}",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    script = (f"import sys, tfharness\n"
              f"first = tfharness.run(tfharness.compose({overrides!r}))\n"
              f"loaded = 'mlflow' in sys.modules\n"
              f"again = tfharness.run(tfharness.compose({overrides!r}))\n"
              f"print(first.run_id, again.run_id, again.pretrain_reused_from, loaded)\n")
    # A fresh interpreter, not a prewarmed one: those have MLflow loaded already.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tracking process did not exit" not in done.stderr
    first, again, reused_from, loaded = done.stdout.split("\n")[-2].split(" ")
    assert loaded == "False"
    # The second run found the first one's pretraining through the tracking process.
    assert reused_from == first
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for run_id in (first, again):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert "test/accuracy" in run.data.metrics
    assert [m.step for m in client.get_metric_history(first, "pretrain/loss")] == [0]
    assert {m.name for m in client.search_logged_models(
        [client.get_run(first).info.experiment_id],
        filter_string=f"source_run_id = '{first}'")} == {"pretrained", "finetuned"}


def test_a_run_logs_to_a_tracking_server(make_cfg, mlflow_server, tmp_path):
    cfg = make_cfg([*TINY_SYNTHETIC, "tracking=server", f"tracking.uri={mlflow_server}",
                    "tracking.experiment=shared", "model.units=[4]", "trainer.epochs=2",
                    "finetune.epochs=1"])
    result = tfharness.run(cfg)
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # Where a run is recorded is in its config.yaml, not in its params (tracking/record.py).
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert "name: server" in config.read_text() and "tracking.name" not in run.data.params
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pretrain/loss")] == [0, 1]
    # Artifacts went through the server into its artifact destination.
    assert any((tmp_path / "server-artifacts").rglob("saved_model.pb"))
    model = mlflow.pyfunc.load_model(result.model_uris["finetuned"])
    assert model.predict(np.zeros((2, 12), np.float32)).shape == (2, 3)


def test_without_a_tracking_process_the_run_logs_from_a_thread(make_cfg, client, monkeypatch,
                                                               caplog):
    from tfharness.tracking import process as tracking_process

    monkeypatch.setattr(tracking_process, "_shared", None)
    monkeypatch.setattr(sys, "executable", "/no/such/python")  # nothing to start it with
    result = tfharness.run(make_cfg([*TINY_SYNTHETIC, "trainer.epochs=1", "finetune=none",
                                     "tracking.process=true"]))
    assert "Cannot start the tracking process" in caplog.text
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pretrain/loss")] == [0]


def test_each_run_logs_with_the_environment_it_was_started_in(make_cfg, client, monkeypatch):
    # Runs of one process (a sweep) each bring the environment they were started in, to the one
    # tracking process that serves them in turn.
    quick = [*TINY_SYNTHETIC, "trainer.epochs=1", "finetune=none", "tracking.log_models=false",
             "tracking.process=true"]
    monkeypatch.setenv("LOGNAME", "first-user")
    first = tfharness.run(make_cfg(quick))
    monkeypatch.setenv("LOGNAME", "second-user")  # MLflow's mlflow.user tag reads it
    second = tfharness.run(make_cfg(quick, out="second"))
    assert client.get_run(first.run_id).data.tags["mlflow.user"] == "first-user"
    assert client.get_run(second.run_id).data.tags["mlflow.user"] == "second-user"
    # Without fine-tuning the pretrained model is the final one: one test measurement, both names.
    metrics = client.get_run(first.run_id).data.metrics
    assert {k: metrics[k] for k in ("pretrain/test_loss", "pretrain/test_accuracy")} == {
        "pretrain/test_loss": metrics["test/loss"],
        "pretrain/test_accuracy": metrics["test/accuracy"]}


def test_tags_carry_the_git_commit_of_the_working_directory(tmp_path, monkeypatch):
    repo = tmp_path / "project"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()
    monkeypatch.chdir(repo)
    tags = tracking.run_tags("digits", "cnn", {"finetune": "staged"})
    assert tags["mlflow.source.git.commit"] == head
    assert (tags["data"], tags["model"], tags["finetune"]) == ("digits", "cnn", "staged")
    monkeypatch.chdir(tmp_path)
    assert "mlflow.source.git.commit" not in tracking.run_tags("d", "m", {})


def test_sqlite_artifacts_go_beside_the_database(tmp_path):
    root = store.sqlite_artifact_root(f"sqlite:///{tmp_path}/sub/mlflow.db")
    assert root == (tmp_path / "sub" / "mlartifacts").as_uri()
    assert store.sqlite_artifact_root("http://127.0.0.1:5000") is None


def test_an_unreachable_server_is_a_clear_error_before_training(make_cfg, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()  # nothing listens there
    cfg = make_cfg([*TINY_SYNTHETIC, "tracking=server", f"tracking.uri=http://127.0.0.1:{port}"])
    with pytest.raises(tfharness.HarnessError,
                       match=f"'tracking.uri': got 'http://127.0.0.1:{port}'; cannot open"):
        tfharness.run(cfg)


@pytest.mark.parametrize("backend", ["harness", "mlflow"])
def test_a_call_that_fails_in_the_background_fails_the_run(tracking_uri, client, backend):
    from tfharness.config import TrackingConfig
    from tfharness.errors import TrackingError
    from tfharness.tracking.backends import in_process_tracker

    tracker = in_process_tracker(TrackingConfig(uri=tracking_uri, experiment="bg",
                                                async_backend=backend))
    tracker.start("r", {"a": "1"}, {})
    tracker.log_metrics({"pretrain/loss": 0.5}, step=0)
    tracker.log_metrics({"no good?": 1.0}, step=0)  # MLflow rejects this metric name
    tracker.log_metrics({"pretrain/loss": 0.4}, step=1)  # later calls still go through
    with pytest.raises(TrackingError, match="incomplete.*metrics at step 0"):
        tracker.finish()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert "no good?" in run.data.tags["error"]
    assert [m.value for m in client.get_metric_history(tracker.run_id, "pretrain/loss")] == [
        0.5, 0.4]
