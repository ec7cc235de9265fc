"""Transfer learning on the models people really use, end to end: a functional residual model and
the Keras guide's nested base given as files, a keras.applications backbone built by
model=keras_application, and models logged by MLflow's own flavors. Each goes through load,
save, reload, head swap, a staged fine-tune and the report, checked through MlflowClient."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

import tfharness
from tfharness import serialization, sources
from tfharness.errors import ConfigError

from conftest import empty_store
import models_users_bring as users
import prewarmed

FEATURES = users.FEATURES
VECTORS = ["data=synthetic", f"data.shape=[{FEATURES}]", "data.num_samples=40",
           "data.finetune_num_samples=40", "data.num_classes=4", "data.finetune_num_classes=3",
           "finetune.head.num_classes=3"]
IMAGES = ["data=synthetic", "data.shape=[8,8,3]", "data.num_samples=40",
          "data.finetune_num_samples=40", "data.num_classes=4", "data.finetune_num_classes=3",
          "finetune.head.num_classes=3"]


def _stages(*stages) -> str:
    """A finetune.stages override: (name, [selectors], learning rate) with one epoch each."""
    items = [f"{{name: {n}, freeze: {json.dumps(f)}, learning_rate: {lr}, epochs: 1}}"
             for n, f, lr in stages]
    return f"finetune.stages=[{', '.join(items)}]"


def _report(client, run) -> dict:
    path = client.download_artifacts(run.info.run_id, "reports/trainable_layers.json")
    table = json.loads(Path(path).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def _check_run(client, result, stages):
    """What every staged fine-tune from a real model must show in MLflow."""
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["reload/finetuned/max_abs_diff"] == 0.0
    assert metrics["reload/pretrained/max_abs_diff"] == 0.0
    assert result.metrics["reload/pretrained/max_abs_diff"] == 0.0
    assert result.metrics["reload/finetuned/max_abs_diff"] == 0.0
    assert metrics["finetune/frozen_weight_change_max"] == 0.0
    rows = _report(client, run)
    assert sorted({r["stage"] for r in rows}) == sorted(stages)
    tuned = serialization.load_model(result.artifacts["finetuned"])
    assert tuned.output_shape == (None, 3)
    return run, rows


def test_functional_residual_model_with_transfer_gain(make_cfg, client, tmp_path):
    path = tmp_path / "residual.keras"
    users.residual().save(path)
    result = tfharness.run(make_cfg([
        *VECTORS, "source=path", f"source.path={path}", "finetune=staged",
        "finetune.head.pop=1", "finetune.head.dropout=0.3", "finetune.transfer_gain=true",
        _stages(("head", ["@base"], 0.05), ("top", ["stem"], 0.01))]))
    run, rows = _check_run(client, result, ["head", "top"])
    by = {(r["stage"], r["layer"]): r for r in rows}
    assert by[("head", "add")]["trainable"] is False
    assert by[("top", "branch")]["trainable"] is True
    assert by[("top", "branch")]["relative_weight_change"] > 0
    assert by[("top", "stem")]["relative_weight_change"] == 0.0
    assert by[("top", "head_dropout")]["class"] == "Dropout"
    # The from-scratch baseline, beside the fine-tuned metrics.
    metrics = run.data.metrics
    assert metrics["transfer/gain"] == pytest.approx(
        metrics["test/accuracy"] - metrics["scratch/test_accuracy"])
    assert len(client.get_metric_history(run.info.run_id, "scratch/loss")) == 2
    assert result.metrics["transfer/gain"] == metrics["transfer/gain"]
    assert run.data.tags["tfharness.source_kind"] == "keras"


def test_guide_nested_base_two_stage_recipe(make_cfg, client, tmp_path):
    import keras

    keras.utils.set_random_seed(3)
    model = users.guide_nested()
    users.stir_statistics(model)
    path = tmp_path / "guide.keras"
    model.save(path)
    result = tfharness.run(make_cfg([
        *IMAGES, "source=path", f"source.path={path}", "finetune=staged",
        "finetune.head.cut=base", "finetune.head.pooling=avg", "finetune.freeze_batchnorm=true",
        _stages(("head", ["@base"], 0.05), ("top", ["base/0:3"], 0.001))]))
    run, rows = _check_run(client, result, ["head", "top"])
    by = {(r["stage"], r["layer"]): r for r in rows}
    # One row per inner layer, named by its path.
    assert [r["layer"] for r in rows if r["stage"] == "top"] == [
        "base/conv_a", "base/bn", "base/relu_a", "base/conv_b", "base/bn_b", "base/relu_b",
        "head_pool", "head"]
    for layer in ("base/conv_a", "base/bn", "base/conv_b", "base/bn_b"):
        assert by[("head", layer)]["relative_weight_change"] == 0.0
    assert by[("top", "base/conv_b")]["trainable"] is True
    assert by[("top", "base/conv_b")]["relative_weight_change"] > 0
    # BatchNormalization stays frozen in the unfrozen block (finetune.freeze_batchnorm).
    assert by[("top", "base/bn_b")]["trainable"] is False
    assert by[("top", "base/bn_b")]["relative_weight_change"] == 0.0
    markdown = client.download_artifacts(run.info.run_id, "reports/trainable_layers.md")
    assert "base/conv_b" in Path(markdown).read_text()


def test_keras_application_backbone_fine_tunes_its_top_blocks(make_cfg, client):
    result = tfharness.run(make_cfg([
        *IMAGES, "data.shape=[32,32,3]", "model=keras_application", "model.weights=null",
        "+model.kwargs.alpha=0.35", "trainer.epochs=1", "save_format=keras", "finetune=staged",
        _stages(("head", ["@base"], 0.01), ("top", ["preprocess", "base/0:-20"], 1e-4))]))
    run, rows = _check_run(client, result, ["head", "top"])
    assert run.data.params["model.name"] == "MobileNetV2"
    by = {(r["stage"], r["layer"]): r for r in rows}
    assert by[("head", "base/block_16_project")]["trainable"] is False
    assert by[("top", "base/block_16_project")]["trainable"] is True
    assert by[("top", "base/block_16_project")]["relative_weight_change"] > 0
    assert by[("top", "base/block_1_expand")]["relative_weight_change"] == 0.0
    # Frozen BatchNormalization in the frozen part ran in inference mode: statistics unmoved.
    assert by[("top", "base/block_1_expand_BN")]["relative_weight_change"] == 0.0
    assert len([r for r in rows if r["stage"] == "top"]) > 150
    # The served model takes raw pixels: the application's preprocessing is inside it.
    tuned = serialization.load_model(result.artifacts["finetuned"])
    assert tuned.layers[1].name == "preprocess"


@pytest.fixture
def flavor_models(client, tracking_uri, tmp_path):
    """The residual model logged by mlflow.tensorflow.log_model (registered, with an alias)
    and by mlflow.keras.log_model, the way teams log Keras models."""
    import keras

    keras.utils.set_random_seed(5)
    model = users.residual()
    users.stir_statistics(model)
    # Artifacts under tmp_path: a SQLite store's default artifact root is ./mlruns.
    experiment = client.create_experiment(
        "team", artifact_location=(tmp_path / "team-artifacts").as_uri())
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            tf_info = mlflow.tensorflow.log_model(model, name="clf",
                                                  pip_requirements=["tensorflow"],
                                                  registered_model_name="team-clf")
            keras_info = mlflow.keras.log_model(model, name="kclf", pip_requirements=["keras"])
    finally:
        mlflow.set_tracking_uri(previous)
    client.set_registered_model_alias("team-clf", "prod", "1")
    x = np.random.default_rng(0).random((8, FEATURES), dtype=np.float32)
    return run.info.run_id, tf_info, keras_info, np.asarray(model(x)), x


def test_models_logged_by_mlflow_flavors_are_sources(make_cfg, client, flavor_models, tmp_path):
    run_id, tf_info, keras_info, expected, x = flavor_models
    result = tfharness.run(make_cfg([
        *VECTORS, "source=mlflow", "source.uri=models:/team-clf/1", "finetune=staged",
        _stages(("head", ["@base"], 0.05), ("all", [], 0.001))]))
    run, rows = _check_run(client, result, ["head", "all"])
    tags = run.data.tags
    assert tags["tfharness.source"] == "models:/team-clf/1"
    assert tags["tfharness.source_model_id"] == tf_info.model_id
    assert tags["tfharness.source_run_id"] == run_id
    assert tags["tfharness.source_registered_model"] == "team-clf/1"
    assert tags["tfharness.source_flavor"] == "tensorflow"
    started_from = serialization.load_model(result.artifacts["pretrained"])
    np.testing.assert_array_equal(np.asarray(started_from(x)), expected)
    tuned = client.get_logged_model(result.model_uris["finetuned"].split("/")[-1])
    assert tuned.tags["tfharness.source_model_id"] == tf_info.model_id
    # Every URI form finds the flavor's Keras file, with the same lineage.
    for uri, info, flavor in [("models:/team-clf@prod", tf_info, "tensorflow"),
                              (f"models:/{tf_info.model_id}", tf_info, "tensorflow"),
                              (f"runs:/{run_id}/clf", tf_info, "tensorflow"),
                              (f"models:/{keras_info.model_id}", keras_info, "keras"),
                              (f"runs:/{run_id}/kclf", keras_info, "keras")]:
        found = sources.resolve_mlflow(uri, client.tracking_uri, tmp_path / "dl")
        assert found.path.suffix == ".keras", uri
        assert found.lineage["tfharness.source_model_id"] == info.model_id, uri
        assert found.lineage["tfharness.source_run_id"] == run_id, uri
        assert found.lineage["tfharness.source_flavor"] == flavor, uri


@pytest.mark.parametrize("extra,message", [
    (["finetune.head.cut=nope"], "'finetune.head.cut': got 'nope'; allowed: a top-level layer "
                                 "of the model: stem, branch, add, bn, output"),
    (["finetune.head.cut=branch"], "layer 'add' after the cut also reads 'stem'"),
    (["finetune.head.pop=4"], "'finetune.head.pop': got 4; allowed: at most 2: layer 'add' "
                              "merges 2 inputs"),
    (["finetune.freeze=[base/0]"], "'finetune.freeze[0]': got 'base/0'; allowed: a selector "
                                   "whose 'base/' names a nested model of the model: it has "
                                   "none"),
    (["data.shape=[13]"], "'data': got 'samples of shape (13,)'"),
])
def test_what_cannot_be_fine_tuned_fails_before_any_run(make_cfg, client, tmp_path, extra,
                                                        message):
    path = tmp_path / "residual.keras"
    users.residual().save(path)
    with pytest.raises(ConfigError) as caught:
        tfharness.run(make_cfg([*VECTORS, "source=path", f"source.path={path}", *extra]))
    assert message in str(caught.value)
    exp = client.get_experiment_by_name("tfharness")
    assert exp is None or client.search_runs([exp.experiment_id]) == []


def test_feature_map_without_pooling_and_two_outputs_fail_from_the_command_line(tmp_path):
    import keras

    users.guide_nested().save(tmp_path / "guide.keras")
    inputs = keras.Input((FEATURES,))
    keras.Model(inputs, [keras.layers.Dense(2)(inputs), keras.layers.Dense(3)(inputs)]).save(
        tmp_path / "two.keras")
    db = tmp_path / "cli.db"
    empty_store(db)
    for args, message in [
        ([*IMAGES, f"source.path={tmp_path / 'guide.keras'}", "finetune.head.cut=base"],
         "tfharness: Invalid value for 'finetune.head.pooling': got None; allowed: one of avg, "
         "max, flatten: the output of 'base' is a feature map of shape (None, 8, 8, 8)"),
        ([*VECTORS, f"source.path={tmp_path / 'two.keras'}"],
         "allowed: a model with one input and one output; this one has 1 input(s)"),
        ([*IMAGES, "model=keras_application", "model.name=MobileNetV9", "model.weights=null"],
         "'model.name': got 'MobileNetV9'; allowed: a constructor of keras.applications:"),
    ]:
        source = [] if "model=keras_application" in args else ["source=path"]
        done = prewarmed.run([sys.executable, "-m", "tfharness", *args, *source,
                               f"tracking.uri=sqlite:///{db}",
                               f"hydra.run.dir={tmp_path / 'run'}"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 1, done.stderr[-2000:]
        assert message in done.stderr
        assert "Traceback" not in done.stderr
        assert len([line for line in done.stderr.splitlines() if "tfharness:" in line]) == 1
    exp = mlflow.MlflowClient(f"sqlite:///{db}").get_experiment_by_name("tfharness")
    assert exp is None or mlflow.MlflowClient(f"sqlite:///{db}").search_runs(
        [exp.experiment_id]) == []
