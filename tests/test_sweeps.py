"""Sweeps as users run them: `tfharness -m ...` in a real process, read back through MLflow.

Each sweep here is one subprocess (TensorFlow imported once per process, as in real use) with
tiny data; the assertions are what a user sees in the MLflow UI: one parent run, its children
nested under it, every metric point of every child, the trial table, the plots, the best trial.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import TINY_SYNTHETIC, empty_store
import prewarmed

TINY = [*TINY_SYNTHETIC, "print_report=false"]


def sweep(*args, cwd: Path, uri: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return prewarmed.run(
        [sys.executable, "-m", "tfharness", "-m", *TINY, f"tracking.uri={uri}", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def parent_and_children(client, experiment: str = "tfharness"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("tfharness.sweep") == "parent"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) + 1 == len(runs), "every run of the sweep is nested under its parent"
    return parent, children


def steps(client, run_id: str, key: str):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def trials_table(client, parent_id: str, tmp_path: Path):
    path = client.download_artifacts(parent_id, "sweep/trials.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def test_parallel_grid_on_a_fresh_sqlite_store_loses_no_run_and_no_point(tmp_path):
    """Four jobs at once (joblib) on a store that does not exist yet: the parent creates the
    database and the experiment before any job starts, so no job races on the schema."""
    db = tmp_path / "fresh.db"
    uri = f"sqlite:///{db}"
    # pretrain_cache=off: every job pretrains, so every child has every pretraining point.
    out = sweep("hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "model.units=[4]",
                "trainer.epochs=3", "finetune.epochs=2", "pretrain_cache=off",
                "trainer.learning_rate=1e-2,1e-3", "finetune.learning_rate=1e-1,1e-2",
                cwd=tmp_path, uri=uri)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not db.with_name("fresh.db-journal").exists()
    client = mlflow.MlflowClient(uri)
    parent, children = parent_and_children(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["launcher"] == "JoblibLauncher"
    assert parent.data.params["sweep.space.trainer.learning_rate"] == "1e-2,1e-3"
    assert len(children) == 4
    combos = {(c.data.params["trainer.learning_rate"], c.data.params["finetune.learning_rate"])
              for c in children}
    assert combos == {("0.01", "0.1"), ("0.01", "0.01"), ("0.001", "0.1"), ("0.001", "0.01")}
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        run_id = child.info.run_id
        for key in ("pretrain/loss", "pretrain/accuracy", "pretrain/val_loss"):
            assert steps(client, run_id, key) == [0, 1, 2], key
        for key in ("finetune/loss", "finetune/val_accuracy"):
            assert steps(client, run_id, key) == [0, 1], key
        for stem in ("pretrained", "finetuned"):
            assert steps(client, run_id, f"reload/{stem}/max_abs_diff") == [0]
        assert child.data.metrics["objective"] == child.data.metrics["finetune/val_accuracy"]
    best = max(children, key=lambda c: c.data.metrics["finetune/val_accuracy"])
    assert parent.data.metrics["best/finetune/val_accuracy"] == \
        best.data.metrics["finetune/val_accuracy"]
    rows = trials_table(client, parent.info.run_id, tmp_path)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"FINISHED"}
    objectives = [r["finetune/val_accuracy"] for r in rows]
    assert objectives == sorted(objectives, reverse=True)
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/objective_per_trial.png",
                     "plots/objective_vs_trainer.learning_rate.png",
                     "plots/objective_vs_finetune.learning_rate.png"}


def test_a_failing_trial_is_failed_in_mlflow_and_the_others_finish(tmp_path):
    uri = empty_store(tmp_path / "mlflow.db")
    # A CNN cannot take the flat synthetic samples: two of the four jobs fail on their config.
    out = sweep("trainer.epochs=1", "finetune.epochs=1", "model=mlp,cnn",
                "finetune.learning_rate=1e-2,1e-3", cwd=tmp_path, uri=uri)
    assert out.returncode != 0
    client = mlflow.MlflowClient(uri)
    parent, children = parent_and_children(client)
    by_model = {}
    for child in children:
        by_model.setdefault(child.data.params["model.name"], []).append(child)
    assert [c.info.status for c in by_model["mlp"]] == ["FINISHED", "FINISHED"]
    assert [c.info.status for c in by_model["cnn"]] == ["FAILED", "FAILED"]
    for child in by_model["cnn"]:
        assert "image-shaped data" in child.data.tags["error"]
    assert parent.data.metrics["failed_trials"] == 2
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in by_model["mlp"]}
    assert "2 of 4 trials failed" in parent.data.tags["error"]
    # The command line prints the same table, best first, failures last.
    printed = out.stdout
    assert "4 trials by finetune/val_accuracy (maximize)" in printed
    assert printed.index("FINISHED") < printed.index("FAILED")
    rows = trials_table(client, parent.info.run_id, tmp_path)
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "FAILED", "FAILED"]
    # Each job wrote its models into its own folder of the sweep.
    assert len(list((tmp_path / "multirun").glob("*/*/*/models/finetuned"))) == 2


def test_optuna_search_against_a_mlflow_server_names_and_registers_the_best(
        tmp_path, mlflow_server):
    # Four trials keep the suite quick; the 10-trial search of the issue is the same command.
    out = sweep("hparams_search=optuna", "hydra.sweeper.n_trials=4", "tracking=server",
                "trainer.epochs=1", "finetune.epochs=1", "model.units=[4]",
                "finetune.freeze=[]", "sweep.register_best=digits-champion",
                cwd=tmp_path, uri=mlflow_server)
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient(mlflow_server)
    parent, children = parent_and_children(client)
    assert parent.data.tags["sweeper"] == "OptunaSweeper"
    assert parent.data.params["sweep.space.finetune.learning_rate"] == \
        "tag(log, interval(1e-4, 1e-1))"
    assert len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    # The fixed values from the command line are not searched; the others are.
    assert {c.data.params["model.units"] for c in children} == {"[4]"}
    assert len({c.data.params["finetune.learning_rate"] for c in children}) == 4
    best_value = max(c.data.metrics["objective"] for c in children)
    best = client.get_run(parent.data.tags["best_run_id"])
    assert best.data.metrics["objective"] == best_value
    assert f"finetune/val_accuracy={best_value:.6g}" in out.stdout
    champion = client.get_model_version_by_alias("digits-champion", "champion")
    assert champion.run_id == best.info.run_id
    assert champion.source == best.data.tags["tfharness.model_uri.finetuned"]
    assert parent.data.tags["champion"] == f"digits-champion/{champion.version}"


def test_launcher_presets_compose_for_ray_and_slurm():
    import tfharness

    slurm = tfharness.compose(["launcher=slurm"], return_hydra_config=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.launcher.tasks_per_node == 1
    ray = tfharness.compose(["launcher=ray"], return_hydra_config=True)
    assert ray.hydra.launcher._target_.endswith("RayLauncher")


def test_ray_launcher_runs_a_sweep_on_a_local_ray(tmp_path):
    """The launcher=ray preset with Ray started here (address null): the jobs run in Ray
    worker processes, and still nest under the parent run through hydra.job.env_set. Without
    Ray's dashboard (a dozen processes of its own that nothing here looks at)."""
    uri = empty_store(tmp_path / "mlflow.db")
    out = sweep("launcher=ray", "+hydra.launcher.ray.init.include_dashboard=false",
                "model.units=[4]", "trainer.epochs=1", "finetune.epochs=1",
                "finetune.learning_rate=1e-2,1e-3", cwd=tmp_path, uri=uri)
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    parent, children = parent_and_children(client)
    assert parent.data.tags["launcher"] == "RayLauncher"
    assert sorted(c.data.params["finetune.learning_rate"] for c in children) == ["0.001", "0.01"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(steps(client, c.info.run_id, "finetune/loss") == [0] for c in children)


def test_a_nan_or_missing_objective_fails_the_trial(make_cfg):
    from tfharness.config import to_typed
    from tfharness.errors import ConfigError, HarnessError
    from tfharness.pipeline.record import objective as _objective

    cfg = to_typed(make_cfg(TINY))
    assert _objective(cfg, {"finetune/val_accuracy": 0.5}) == 0.5
    with pytest.raises(HarnessError, match="finetune/val_accuracy of this trial is nan"):
        _objective(cfg, {"finetune/val_accuracy": float("nan")})
    with pytest.raises(ConfigError, match="sweep.objective.*test/accuracy"):
        _objective(cfg, {"test/accuracy": 0.5})


def test_a_sweep_run_in_python_is_nested_and_returns_its_objective(make_cfg, client,
                                                                    tracking_uri):
    """The core called from Python the way a sweep job calls it."""
    import tfharness
    from tfharness.tracking.store import sqlite_artifact_root

    experiment = client.create_experiment("tfharness",
                                          artifact_location=sqlite_artifact_root(tracking_uri))
    parent = client.create_run(experiment).info.run_id
    result = tfharness.run(make_cfg([*TINY, "model.units=[4]", "trainer.epochs=1",
                                     "finetune.epochs=2", "sweep.objective=test/accuracy"]),
                           parent_run_id=parent, require_objective=True)
    run = client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert result.objective == result.metrics["test/accuracy"] == run.data.metrics["objective"]
    assert result.metrics["finetune/val_accuracy"] == client.get_metric_history(
        result.run_id, "finetune/val_accuracy")[-1].value
