"""What the MLflow UI shows of a sweep, asserted through MlflowClient on a fresh small sweep.

One `tfharness -m` sweep (a real process, real training on tiny data, a SQLite store under
tmp_path) is read back the way the UI reads it: logged models and their metrics, run names,
sources, descriptions, params, tags, artifacts, tables. Then one child is re-run from its record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import mlflow
import pytest

from conftest import TINY_SYNTHETIC, empty_store
import prewarmed

SWEPT = "finetune.learning_rate=0.01,0.001"
# pretrain_cache=off: each child pretrains, so both have both models (tests/test_pretrain_cache.py
# tests reuse).
ARGS = ["-m", *TINY_SYNTHETIC, "print_report=false", "model.units=[4]", "trainer.epochs=2",
        "finetune.epochs=3", "pretrain_cache=off", SWEPT]
# Metrics drawn as curves: one point per epoch. Everything else is a one-off figure.
CURVES = {f"{phase}/{name}" for phase in ("pretrain", "finetune")
          for name in ("loss", "accuracy", "val_loss", "val_accuracy")}
OPERATIONAL = ("output_dir", "checkpoint_root", "print_report", "resume", "tracking.")


def tfharness(*args, cwd: Path) -> subprocess.CompletedProcess:
    return prewarmed.run([sys.executable, "-m", "tfharness", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("record")
    uri = empty_store(tmp / "mlflow.db")
    out = tfharness(*ARGS, f"tracking.uri={uri}", cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tfharness").experiment_id
    runs = client.search_runs([experiment])
    [parent] = [r for r in runs if r.data.tags.get("tfharness.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    return {"tmp": tmp, "uri": uri, "client": client, "experiment": experiment,
            "parent": parent, "children": children, "stderr": out.stderr}


def models_of(client, experiment: str, run_id: str) -> dict:
    models = client.search_logged_models([experiment],
                                         filter_string=f"source_run_id = '{run_id}'")
    return {m.name: m for m in models}


def test_each_logged_model_carries_its_own_final_figures(swept):
    client = swept["client"]
    for child in swept["children"]:
        run_metrics = child.data.metrics
        models = models_of(client, swept["experiment"], child.info.run_id)
        assert set(models) == {"pretrained", "finetuned"}
        for name, model in models.items():
            keys = [m.key for m in model.metrics]
            assert len(keys) == len(set(keys)), f"{name}: one value per figure, got {keys}"
            for metric in model.metrics:
                # The run's final value, not the value at some step.
                assert metric.value == run_metrics[metric.key], (name, metric.key)
        pretrained = {m.key for m in models["pretrained"].metrics}
        finetuned = {m.key for m in models["finetuned"].metrics}
        assert {"pretrain/val_accuracy", "pretrain/val_loss", "pretrain/test_accuracy",
                "pretrain/test_loss", "reload/pretrained/max_abs_diff",
                "reload/pretrained/size_bytes"} <= pretrained
        assert not any(k.startswith(("finetune/", "test/", "reload/finetuned/"))
                       for k in pretrained)
        assert {"test/accuracy", "test/loss", "finetune/accuracy", "finetune/val_accuracy",
                "finetune/frozen_weight_change_max", "reload/finetuned/max_abs_diff",
                "reload/finetuned/size_bytes"} <= finetuned
        assert not any(k.startswith(("pretrain/", "reload/pretrained/")) for k in finetuned)
        # The model page lists the test figures first.
        assert [m.key for m in models["finetuned"].metrics][:2] == ["test/accuracy", "test/loss"]


def test_names_tell_the_runs_apart(swept):
    children, parent = swept["children"], swept["parent"]
    names = sorted(c.info.run_name for c in children)
    assert names == ["lr=0.001", "lr=0.01"]
    # The UI cuts names to about 20 characters: they differ within them.
    assert len({n[:20] for n in names}) == len(names)
    for child in children:
        short = child.info.run_name.split("=", 1)[1]
        assert child.data.tags["tfharness.swept"] == f"finetune.learning_rate={short}"
        assert child.data.params["finetune.learning_rate"] == short
    assert parent.info.run_name == "sweep lr"


def test_source_is_the_command_the_user_ran(swept):
    client = swept["client"]
    command = "python -m tfharness " + " ".join(
        f"'{a}'" if "[" in a else a for a in ARGS) + f" tracking.uri={swept['uri']}"
    for run in (swept["parent"], *swept["children"]):
        tags = run.data.tags
        assert tags["command"] == command
        assert tags["mlflow.source.type"] == "LOCAL"
        # The UI shows what follows the last "/" of a source: the store's path is in the
        # command, so the source names the program and the sweep.
        assert tags["mlflow.source.name"] == "python -m tfharness -m"
        assert json.loads(tags["tfharness.argv"]) == [*ARGS, f"tracking.uri={swept['uri']}"]
    for child in swept["children"]:
        for model in models_of(client, swept["experiment"], child.info.run_id).values():
            assert model.tags["mlflow.source.name"] == "python -m tfharness -m"


def test_one_off_figures_are_single_points_named_for_what_they_are(swept):
    client = swept["client"]
    for child in swept["children"]:
        run_id = child.info.run_id
        for key in child.data.metrics:
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            if key in CURVES:
                epochs = 2 if key.startswith("pretrain/") else 3
                assert steps == list(range(epochs)), key
            else:
                assert steps == [0], key
        assert "reload/max_abs_diff" not in child.data.metrics
        for stem in ("pretrained", "finetuned"):
            assert child.data.metrics[f"reload/{stem}/max_abs_diff"] == 0.0


def test_learning_curves_and_sweep_plots_are_logged(swept, tmp_path):
    import matplotlib.image

    client = swept["client"]
    for child in swept["children"]:
        path = client.download_artifacts(child.info.run_id, "plots/learning_curves.png",
                                         str(tmp_path / child.info.run_id))
        height, width = matplotlib.image.imread(path).shape[:2]
        assert width > 2 * height  # two panels side by side: loss, accuracy
    plots = {a.path for a in client.list_artifacts(swept["parent"].info.run_id, "plots")}
    assert "plots/objective_per_trial.png" in plots


def test_table_columns_render_in_the_ui(swept, tmp_path):
    client = swept["client"]
    parent = swept["parent"].info.run_id
    table = json.loads(Path(client.download_artifacts(parent, "sweep/trials.json",
                                                      str(tmp_path))).read_text())
    assert "finetune_learning_rate" in table["columns"]
    assert not any("." in column for column in table["columns"])
    column = table["columns"].index("finetune_learning_rate")
    assert sorted(row[column] for row in table["data"]) == ["0.001", "0.01"]
    child = swept["children"][0].info.run_id
    report = json.loads(Path(client.download_artifacts(
        child, "reports/trainable_layers.json", str(tmp_path))).read_text())
    assert not any("." in column for column in report["columns"])


def test_params_hold_what_defines_the_model_and_its_training(swept, tmp_path):
    for run in (swept["parent"], *swept["children"]):
        params = run.data.params
        assert not [k for k in params if k.startswith(OPERATIONAL)], run.info.run_name
        assert params["model.units"] == "[4]" and params["trainer.epochs"] == "2"
    for child in swept["children"]:
        # The folders stay findable, as tags; everything is in config.yaml.
        assert Path(child.data.tags["output_dir"]).is_dir()
        config = Path(swept["client"].download_artifacts(
            child.info.run_id, "config.yaml", str(tmp_path / child.info.run_id))).read_text()
        assert "output_dir:" in config and "checkpoint_root:" in config


def test_each_run_has_a_one_line_description_with_its_test_accuracy(swept):
    for child in swept["children"]:
        note = child.data.tags["mlflow.note.content"]
        assert "\n" not in note
        assert note.startswith("mlp on synthetic, pretrained 2 epochs, fine-tuned 3 epochs")
        assert note.endswith(f"test accuracy {child.data.metrics['test/accuracy']:.4f}.")
    note = swept["parent"].data.tags["mlflow.note.content"]
    best = swept["parent"].data.tags["best_trial"]
    assert note.startswith("Sweep over finetune.learning_rate: 2 trials, 0 failed; "
                           f"best trial {best} (lr=")


def test_runs_record_package_versions(swept):
    for run in (swept["parent"], *swept["children"]):
        for package in ("tensorflow", "keras", "mlflow", "hydra-core", "tfharness"):
            assert run.data.tags[f"version.{package}"] == metadata.version(package), package


def test_models_are_logged_as_the_readme_says(swept):
    # MLflow checks each model's input example against its signature (a log line per model);
    # it never loads the model to serve the example.
    trials = len(swept["children"])
    assert swept["stderr"].count("Validating input example against model signature") == \
        2 * trials
    child = swept["children"][0]
    model = models_of(swept["client"], swept["experiment"], child.info.run_id)["finetuned"]
    info = mlflow.models.Model.load(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model.artifact_location}/MLmodel"))
    assert info.signature is not None and info.saved_input_example_info is not None


def test_a_run_is_re_created_from_its_record(swept):
    child = min(swept["children"], key=lambda c: c.info.start_time)
    out = tfharness("--rerun", child.info.run_id, f"tracking.uri={swept['uri']}",
                    cwd=swept["tmp"])
    assert out.returncode == 0, out.stderr[-3000:]
    client = swept["client"]
    [again] = client.search_runs(
        [swept["experiment"]], filter_string=f"tags.`tfharness.rerun_of` = '{child.info.run_id}'")
    assert again.info.status == "FINISHED"
    assert again.data.params == child.data.params
    # Same config, same seed: the same numbers.
    for key in ("test/accuracy", "test/loss", "finetune/val_loss"):
        assert again.data.metrics[key] == child.data.metrics[key], key


def test_rerun_of_an_unknown_run_is_one_clear_line(swept):
    out = tfharness("--rerun", "0123456789abcdef", f"tracking.uri={swept['uri']}",
                    cwd=swept["tmp"])
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(
        "tfharness: Invalid value for '--rerun': got '0123456789abcdef'")
    assert "Traceback" not in out.stderr
