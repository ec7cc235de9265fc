"""Whole runs through the Python API: real training, real MLflow in a SQLite store under tmp_path,
asserted through MlflowClient the way a user would look at them."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

import tfharness
from tfharness.errors import ConfigError, DataError, SaveError

from conftest import TINY_SYNTHETIC, empty_store, only_run

DIGITS_QUICK = ["trainer.epochs=3", "finetune.epochs=2", "model.units=[16]"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One default-story run on digits (few epochs), shared by the contract tests below."""
    tmp = tmp_path_factory.mktemp("digits")
    uri = empty_store(tmp / "mlflow.db")
    cfg = tfharness.compose([f"output_dir={tmp / 'out'}", f"tracking.uri={uri}",
                             f"checkpoint_root={tmp / 'checkpoints'}",
                             "print_report=false", *DIGITS_QUICK])
    result = tfharness.run(cfg, overrides=DIGITS_QUICK)
    client = mlflow.MlflowClient(uri)
    return result, client, client.get_run(result.run_id), tmp


def test_params_are_the_resolved_config_with_dotted_keys(digits_run):
    _, _, run, _ = digits_run
    params = run.data.params
    assert params["model.units"] == "[16]"
    assert params["trainer.epochs"] == "3"
    assert params["finetune.learning_rate"] == "0.01"
    assert params["finetune.head.num_classes"] == "5"
    assert params["data.name"] == "digits" and params["save_format.name"] == "savedmodel"


def test_one_metric_point_per_epoch_per_phase(digits_run):
    result, client, run, _ = digits_run
    for phase, epochs in (("pretrain", 3), ("finetune", 2)):
        for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
            history = client.get_metric_history(run.info.run_id, f"{phase}/{name}")
            assert [m.step for m in history] == list(range(epochs)), (phase, name)
    metrics = run.data.metrics
    for key in ("test/loss", "test/accuracy", "reload/finetuned/max_abs_diff",
                "reload/pretrained/max_abs_diff", "finetune/trainable_params", "finetune/frozen_params",
                "finetune/frozen_weight_change_max", "pretrain/test_accuracy"):
        assert key in metrics, key
    assert metrics["reload/finetuned/max_abs_diff"] == 0.0
    assert metrics["finetune/frozen_weight_change_max"] == 0.0
    # @base frozen: only the new head trains (16 inputs -> 5 classes).
    assert metrics["finetune/trainable_params"] == 16 * 5 + 5
    assert metrics["finetune/frozen_params"] == 64 * 16 + 16
    assert result.metrics["test/accuracy"] == pytest.approx(metrics["test/accuracy"])
    assert metrics["pretrain/test_accuracy"] > 0.5  # the pretrained base learned digits 0-4
    for phase in ("pretrain", "finetune"):
        assert metrics[f"{phase}/train_seconds"] > 0
        assert result.metrics[f"{phase}/samples_per_second"] > 0


def test_run_status_tags_and_config_artifacts(digits_run):
    _, client, run, _ = digits_run
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["data"] == "digits" and tags["model"] == "mlp" and "command" in tags
    # Named by what the overrides changed, short keys first (the UI cuts names short).
    assert run.info.run_name == "tr.epochs=3 ft.epochs=2 units=[16]"
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.yaml", "reports"} <= files
    config_text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    assert "units:\n  - 16" in config_text or "- 16" in config_text
    assert "${" not in config_text  # resolved
    overrides = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/overrides.yaml")
    assert "trainer.epochs=3" in overrides


def test_trainable_layer_report_is_a_table_and_markdown(digits_run):
    result, client, run, tmp = digits_run
    table = client.load_table(run.info.experiment_id, "reports/trainable_layers.json",
                              run_ids=[run.info.run_id])
    assert list(table["layer"]) == ["flatten", "dense_0", "head"]
    assert list(table["trainable"]) == [False, False, True]
    assert list(table["trainable_params"]) == [0, 0, 85]
    assert list(table["non_trainable_params"]) == [0, 1040, 0]
    assert table["relative_weight_change"].iloc[1] == 0.0
    assert table["relative_weight_change"].iloc[2] > 0.0
    assert set(table.columns) >= {"stage", "index", "class", "output_shape"}
    markdown = mlflow.artifacts.load_text(
        f"runs:/{run.info.run_id}/reports/trainable_layers.md")
    assert "| head | Dense | True | 85 | 0 |" in markdown
    assert result.artifacts["report"].read_text() == markdown


def test_both_models_are_logged_loadable_and_carry_the_savedmodel(digits_run):
    result, client, run, tmp = digits_run
    exp_id = run.info.experiment_id
    logged = client.search_logged_models([exp_id],
                                         filter_string=f"source_run_id='{run.info.run_id}'")
    assert sorted(m.name for m in logged) == ["finetuned", "pretrained"]
    locations = {m.name: m.artifact_location for m in logged}
    x = np.zeros((3, 8, 8, 1), np.float32)
    for name, classes in (("pretrained", 5), ("finetuned", 5)):
        uri = result.model_uris[name]
        model = mlflow.pyfunc.load_model(uri)
        assert model.predict(x).shape == (3, classes)
        assert model.metadata.signature is not None
        assert model.metadata.saved_input_example_info is not None
        files = mlflow.artifacts.download_artifacts(f"{locations[name]}/artifacts/{name}",
                                                    dst_path=str(tmp / f"dl-{name}"))
        assert (tmp / f"dl-{name}" / name / "saved_model.pb").is_file()
        assert (tmp / f"dl-{name}" / name / "variables").is_dir()
        # The downloaded SavedModel reloads into a full Keras model with the run's outputs.
        reloaded = tfharness.serialization.load_model(files)
        np.testing.assert_array_equal(np.asarray(reloaded(x)), model.predict(x))


def test_same_seed_same_metrics(make_cfg):
    overrides = ["tracking=off", *TINY_SYNTHETIC, "trainer.epochs=2", "finetune.epochs=2"]
    first = tfharness.run(make_cfg(overrides, out="a"))
    second = tfharness.run(make_cfg(overrides, out="b"))
    # Everything but wall-clock timings and artifact byte sizes (the SavedModel records its
    # folder name) must repeat exactly.
    keys = [k for k in first.metrics
            if not any(part in k for part in ("seconds", "per_second", "size_bytes"))]
    assert "test/loss" in keys and "reload/finetuned/max_abs_diff" in keys
    assert {k: first.metrics[k] for k in keys} == {k: second.metrics[k] for k in keys}
    other = tfharness.run(make_cfg([*overrides, "trainer.seed=3"], out="c"))
    assert other.metrics["test/loss"] != first.metrics["test/loss"]


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_other_formats_round_trip_in_a_run(make_cfg, client, fmt):
    result = tfharness.run(make_cfg([*TINY_SYNTHETIC, f"save_format={fmt}", "model.units=[8]",
                                     "trainer.epochs=1", "finetune.epochs=1"]))
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert result.artifacts["finetuned"].suffix == f".{fmt}"
    assert run.data.metrics["reload/finetuned/max_abs_diff"] == 0.0
    x = np.zeros((2, 12), np.float32)
    assert mlflow.pyfunc.load_model(result.model_uris["finetuned"]).predict(x).shape == (2, 3)


def test_staged_cnn_run_with_batchnorm_frozen_then_unfrozen(make_cfg, client):
    result = tfharness.run(make_cfg([
        "model=cnn", "model.filters=[4]", "model.dense_units=8", "finetune=staged",
        "trainer.epochs=1", "finetune.stages.0.epochs=2", "finetune.stages.1.epochs=1",
        "data.finetune_fraction=0.5"]))
    run = only_run(client)
    stages = [row["stage"] for row in result.report]
    assert stages.count("head") == stages.count("all") == len(result.report) // 2
    head_rows = {r["layer"]: r for r in result.report if r["stage"] == "head"}
    assert head_rows["bn_0"]["trainable"] is False
    assert head_rows["bn_0"]["relative_weight_change"] == 0.0
    all_rows = {r["layer"]: r for r in result.report if r["stage"] == "all"}
    assert all_rows["conv_0"]["trainable"] is True and all_rows["conv_0"]["relative_weight_change"] > 0
    # Steps continue across stages: 2 + 1 epochs of finetune metrics; each stage's one-off
    # figures are one point under the stage's name, never a curve over the stages.
    history = client.get_metric_history(run.info.run_id, "finetune/loss")
    assert [m.step for m in history] == [0, 1, 2]
    for stage in ("head", "all"):
        counts = client.get_metric_history(run.info.run_id, f"finetune/{stage}/frozen_params")
        assert [m.step for m in counts] == [0], stage
    # Only BatchNormalization's moving statistics stay non-trainable once all is unfrozen.
    assert run.data.metrics["finetune/all/frozen_params"] < \
        run.data.metrics["finetune/head/frozen_params"]
    assert run.data.metrics["finetune/frozen_weight_change_max"] == 0.0
    assert "finetune/frozen_params" not in run.data.metrics


@pytest.mark.parametrize("preset", ["seed_example1", "seed_example2", "seed_example3"])
def test_seed_presets_do_what_the_seed_describes(make_cfg, client, preset):
    # The seed's data is 100 random samples; shrink the 784 features' model to keep this quick.
    result = tfharness.run(make_cfg([f"experiment={preset}"]))
    run = only_run(client)
    assert run.info.status == "FINISHED"
    # What tfharness.run returns (and prints) is named and valued as the MLflow run has it.
    assert {k: run.data.metrics.get(k) for k in result.metrics} == pytest.approx(result.metrics)
    assert result.metrics["reload/pretrained/max_abs_diff"] == 0.0
    assert (result.artifacts["pretrained"] / "saved_model.pb").is_file()
    if preset == "seed_example1":
        assert "finetuned" not in result.artifacts and not result.report
        return
    assert result.metrics["reload/finetuned/max_abs_diff"] == 0.0
    rows = {r["layer"]: r for r in result.report}
    assert list(rows) == ["dense_0", "head"]
    assert rows["head"]["trainable_params"] == 10 * 5 + 5
    assert rows["dense_0"]["trainable"] is (preset == "seed_example2")
    if preset == "seed_example3":
        assert rows["dense_0"]["relative_weight_change"] == 0.0
    history = client.get_metric_history(run.info.run_id, "finetune/loss")
    assert len(history) == 5


def test_npz_data_from_the_users_file(make_cfg, client, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, feats=rng.random((50, 6), dtype=np.float32), labels=rng.integers(0, 3, 50))
    base = ["data=npz", f"data.path={path}", "model.units=[4]", "trainer.epochs=1",
            "finetune.epochs=1", "finetune.head.num_classes=3", "tracking=off"]
    with pytest.raises(DataError, match="'data.x_key': got 'x'; allowed: an array stored in "
                                        ".*feats, labels"):
        tfharness.run(make_cfg(base))
    result = tfharness.run(make_cfg([*base, "data.x_key=feats", "data.y_key=labels"]))
    assert "test/accuracy" in result.metrics


def test_bad_input_before_the_run_leaves_no_run(make_cfg, client, tmp_path):
    with pytest.raises(ConfigError, match="finetune.freeze\\[0\\].*0:flatten, 1:dense_0"):
        tfharness.run(make_cfg(["finetune.freeze=[conv_*]"]))
    with pytest.raises(ConfigError, match="'finetune.head.num_classes': got 2; allowed: an "
                                          "integer >= 5"):
        tfharness.run(make_cfg(["finetune.head.num_classes=2"]))
    with pytest.raises(DataError, match="data.path"):
        tfharness.run(make_cfg(["data=npz", f"data.path={tmp_path / 'none.npz'}"]))
    exp = client.get_experiment_by_name("tfharness")
    assert exp is None or client.search_runs([exp.experiment_id]) == []


def test_an_error_during_the_run_marks_it_failed_with_the_message(make_cfg, client, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "models").write_text("a file where the models folder should go")
    # A clear error naming the path, not a bare OSError from deep inside Keras.
    with pytest.raises(SaveError, match="Cannot write .*models/pretrained"):
        tfharness.run(make_cfg([*TINY_SYNTHETIC, "trainer.epochs=1"]))
    run = only_run(client)
    assert run.info.status == "FAILED"
    assert "Error" in run.data.tags["error"]
    assert len(client.get_metric_history(run.info.run_id, "pretrain/loss")) == 1


def test_continue_trains_the_reloaded_model_further_with_a_layer_frozen(make_cfg):
    no_head = [o for o in TINY_SYNTHETIC if not o.startswith("finetune.head")]
    result = tfharness.run(make_cfg([*no_head, "tracking=off", "finetune=continue",
                                     "finetune.freeze=[dense_0]", "trainer.epochs=1",
                                     "finetune.epochs=2"]))
    rows = {r["layer"]: r for r in result.report}
    assert list(rows) == ["dense_0", "output"]  # no head swap: the pretrained output stays
    assert rows["dense_0"]["trainable"] is False
    assert rows["dense_0"]["relative_weight_change"] == 0.0
    assert rows["output"]["relative_weight_change"] > 0.0
    assert result.metrics["reload/finetuned/max_abs_diff"] == 0.0
