"""Continuing training from saved artifacts: every kind of source, made here the way its writer
makes it (Keras 2 ones by tf_keras in a child process), loaded, checked for output parity,
fine-tuned with a new head and a freeze; MLflow sources and lineage; the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest

import tfharness
from tfharness import sources
from tfharness.artifacts import integrity, serialization
from tfharness.errors import ConfigError, IntegrityError, SourceError

from conftest import empty_store, only_run
import prewarmed

FEATURES = 12
# Tiny synthetic data whose samples fit the 12-feature sources below.
DATA = ["data=synthetic", f"data.shape=[{FEATURES}]", "data.num_samples=40",
        "data.finetune_num_samples=40", "data.num_classes=4", "data.finetune_num_classes=3",
        "finetune.head.num_classes=3", "finetune.epochs=1", "finetune.learning_rate=0.05"]
SEED_DATA = ["data=synthetic", "data.shape=[784]", "data.num_samples=40",
             "data.finetune_num_samples=40", "data.num_classes=10",
             "data.finetune_num_classes=3", "finetune.head.num_classes=3", "finetune.epochs=1",
             "finetune.learning_rate=0.05"]

KERAS2_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import tf_keras

    out = sys.argv[1]
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([
        tf_keras.layers.Dense(8, activation="relu", input_shape=(12,), name="d0"),
        tf_keras.layers.BatchNormalization(name="bn"),
        tf_keras.layers.Dense(4, activation="softmax", name="out"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(np.random.rand(32, 12), np.arange(32) % 4, epochs=1, verbose=0)
    model.save(out + "/keras2.h5")                      # Keras 2's HDF5
    model.save(out + "/keras2_savedmodel", save_format="tf")  # legacy SavedModel
    x = np.load(out + "/x.npz")["x"]
    np.save(out + "/keras2_outputs.npy", model(x).numpy())
    lam = tf_keras.Sequential([tf_keras.layers.Dense(4, input_shape=(12,)),
                               tf_keras.layers.Lambda(lambda t: t * 2.0)])
    lam.save(out + "/keras2_lambda.h5")
""")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Every kind of source, and each original model's outputs on a fixed batch ``x``."""
    import keras
    import tensorflow as tf

    from tfharness.config import MlpConfig
    from tfharness.models import build_model

    root = tmp_path_factory.mktemp("sources")
    x = np.random.default_rng(1).random((16, FEATURES), dtype=np.float32)
    np.savez(root / "x.npz", x=x)
    keras2 = subprocess.Popen([sys.executable, "-c", KERAS2_SCRIPT, str(root)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    made = {}
    keras.utils.set_random_seed(0)
    model = build_model(MlpConfig(units=[8]), (FEATURES,), 4)
    path = serialization.save_model(model, root / "harness_sm", "savedmodel")
    integrity.write_record(path)  # as a tfharness run does after every save
    made["tfharness-savedmodel"] = (path, np.asarray(model(x)))
    path = serialization.save_model(model, root / "model.keras", "keras")
    integrity.write_record(path)
    made["keras"] = (path, np.asarray(model(x)))

    # The seed's Example 1, exactly as the seed writes it.
    seed_model = tf.keras.Sequential([
        tf.keras.layers.Dense(10, activation="relu", input_shape=(784,)),
        tf.keras.layers.Dense(10, activation="softmax"),
    ])
    tf.saved_model.save(seed_model, str(root / "my_saved_model"))
    seed_x = np.random.default_rng(2).random((8, 784), dtype=np.float32)
    made["seed-example1"] = (root / "my_saved_model", np.asarray(seed_model(seed_x)))

    class Affine(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(3)
            self.kernel = tf.Variable(rng.normal(size=(FEATURES, 4)).astype("float32"),
                                      name="kernel")
            self.bias = tf.Variable(np.zeros(4, np.float32), name="bias")

        @tf.function(input_signature=[tf.TensorSpec([None, FEATURES], tf.float32)])
        def serve(self, inputs):
            return tf.nn.softmax(tf.matmul(inputs, self.kernel) + self.bias)

    module = Affine()
    tf.saved_model.save(module, str(root / "module_sm"),
                        signatures={"serving_default": module.serve})
    made["tf-module"] = (root / "module_sm", module.serve(x).numpy())

    stdout, stderr = keras2.communicate(timeout=300)
    assert keras2.returncode == 0, stderr[-2000:]
    keras2_out = np.load(root / "keras2_outputs.npy")
    made["keras2-h5"] = (root / "keras2.h5", keras2_out)
    made["keras2-savedmodel"] = (root / "keras2_savedmodel", keras2_out)
    return root, x, seed_x, made


# kind -> (extra overrides, frozen layer names, frozen block variables)
MATRIX = {
    "tfharness-savedmodel": (["finetune.freeze=[dense_0]"], ["dense_0"], []),
    "keras": (["finetune.freeze=[0]"], ["dense_0"], []),
    "keras2-h5": (["finetune.freeze=[d0]"], ["d0"], []),
    "keras2-savedmodel": (["finetune.freeze=[0]"], ["d0"], []),
    # An opaque block: the head goes on top (pop 0); freeze inside it by variable name.
    "seed-example1": (["finetune.head.pop=0", "finetune.freeze=[]",
                       "source.freeze_variables=[sequential/dense/*]"], [],
                      ["sequential/dense/kernel", "sequential/dense/bias"]),
    "tf-module": (["finetune.head.pop=0", "finetune.freeze=[savedmodel_block]"],
                  ["savedmodel_block"], []),
}
KINDS = {"tfharness-savedmodel": "tfharness-savedmodel", "keras": "keras", "keras2-h5": "h5",
         "keras2-savedmodel": "keras2-savedmodel", "seed-example1": "opaque-savedmodel",
         "tf-module": "opaque-savedmodel"}


@pytest.mark.parametrize("name", list(MATRIX))
def test_every_source_kind_loads_with_parity_and_fine_tunes(artifacts, make_cfg, name):
    root, x, seed_x, made = artifacts
    path, expected = made[name]
    extra, frozen_layers, frozen_variables = MATRIX[name]
    data = SEED_DATA if name == "seed-example1" else DATA
    probe = seed_x if name == "seed-example1" else x
    result = tfharness.run(make_cfg([*data, "tracking=off", "source=path",
                                     f"source.path={path}", *extra], out=name))
    assert f"kind: {KINDS[name]}" in result.source
    # Parity after the load: the model the run started from computes what the artifact did.
    started_from = serialization.load_model(result.artifacts["pretrained"])
    np.testing.assert_allclose(np.asarray(started_from(probe)), expected, atol=1e-6, rtol=0)
    if name not in ("keras", "keras2-h5"):  # a Keras file has no second program to ask
        assert result.metrics["source/max_abs_diff"] <= 1e-6
    assert result.metrics["reload/pretrained/max_abs_diff"] == 0.0
    assert result.metrics["reload/finetuned/max_abs_diff"] == 0.0
    # Fine-tuned with a new 3-class head; frozen layers did not move, the head did.
    rows = {row["layer"]: row for row in result.report}
    assert rows["head"]["trainable"] and rows["head"]["relative_weight_change"] > 0
    for layer in frozen_layers:
        assert rows[layer]["trainable"] is False
        assert rows[layer]["relative_weight_change"] == 0.0
    assert result.metrics["finetune/frozen_weight_change_max"] == 0.0
    tuned = serialization.load_model(result.artifacts["finetuned"])
    assert tuned.output_shape[-1] == 3
    if frozen_variables:
        assert result.metrics["finetune/frozen_variable_change_max"] == 0.0
        block = started_from.get_layer("savedmodel_block")
        tuned_block = tuned.get_layer("savedmodel_block")
        before = {sources.block_variable_name(v): np.asarray(v) for v in block.weights}
        after = {sources.block_variable_name(v): np.asarray(v) for v in tuned_block.weights}
        for name_ in before:
            moved = float(np.max(np.abs(after[name_] - before[name_])))
            assert (moved == 0.0) == (name_ in frozen_variables), (name_, moved)
        assert "The block is opaque" in result.source
        layer_report = result.artifacts["report"].read_text()
        assert "`savedmodel_block` is opaque" in layer_report
        for name_ in before:
            assert f"| {name_} |" in result.source
            trainable = name_ not in frozen_variables
            assert f"| {name_} | {before[name_].shape} | {trainable} |" in layer_report


def test_seed_example1_fine_tunes_from_the_command_line(artifacts, tmp_path):
    root, *_ = artifacts
    db = tmp_path / "cli.db"
    done = prewarmed.run(
        [sys.executable, "-m", "tfharness", *SEED_DATA, "source=path",
         f"source.path={root / 'my_saved_model'}", "finetune.head.pop=0",
         f"tracking.uri={empty_store(db)}", f"hydra.run.dir={tmp_path / 'run'}",
         "print_report=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.params["source"] == str(root / "my_saved_model")
    assert run.data.tags["tfharness.source_kind"] == "opaque-savedmodel"
    assert run.data.tags["model"] == "source:opaque-savedmodel"
    assert run.data.metrics["reload/finetuned/max_abs_diff"] == 0.0
    # The fine-tuned model serves through MLflow on its own: the block's graph went with it.
    logged = {m.name: m for m in client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id='{run.info.run_id}'")}
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    original = root / "my_saved_model"
    original.rename(root / "moved_away")
    try:
        served = mlflow.pyfunc.load_model(f"models:/{logged['finetuned'].model_id}")
        assert served.predict(np.zeros((2, 784), np.float32)).shape == (2, 3)
    finally:
        (root / "moved_away").rename(original)
    report = client.download_artifacts(run.info.run_id, "reports/source.md", str(tmp_path))
    assert "savedmodel_block" in Path(report).read_text()


def test_registered_model_by_alias_continues_with_lineage_and_sha256(make_cfg, client,
                                                                      tmp_path):
    first = tfharness.run(make_cfg([*DATA, "trainer.epochs=1", "model.units=[8]"], out="first"))
    finetuned_id = first.model_uris["finetuned"].split("/")[-1]
    version = mlflow.register_model(first.model_uris["finetuned"], "clf")
    client.set_registered_model_alias("clf", "champion", version.version)
    # Every artifact the run wrote has its sha256 in MLflow and beside it.
    first_run = client.get_run(first.run_id)
    for stem in ("pretrained", "finetuned"):
        digest = integrity.record_of(first.artifacts[stem]).sha256
        assert first_run.data.tags[f"tfharness.sha256.{stem}"] == digest
        assert integrity.read_record(first.artifacts[stem]).sha256 == digest
    assert client.get_logged_model(finetuned_id).tags["tfharness.sha256"] == \
        first.digests["finetuned"]

    second = tfharness.run(make_cfg([*DATA, "source=mlflow", "source.uri=models:/clf@champion",
                                     "finetune.freeze=[0]"], out="second"))
    run = client.get_run(second.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["source"] == "models:/clf@champion"
    tags = run.data.tags
    assert tags["tfharness.source_model_id"] == finetuned_id
    assert tags["tfharness.source_run_id"] == first.run_id
    assert tags["tfharness.source_registered_model"] == f"clf/{version.version}"
    assert "matches the record in MLflow" in second.source
    assert run.data.metrics["source/max_abs_diff"] == 0.0
    assert "pretrain/loss" not in run.data.metrics  # no pretraining from a source
    # The source's class names, logged beside it, name its outputs in this run's report.
    source_classes = json.loads(first_run.data.tags["tfharness.class_names.finetune"])
    assert f"- pretrained output ({len(source_classes)} classes): " \
           f"{', '.join(source_classes)}" in second.artifacts["report"].read_text()
    tuned = client.get_logged_model(second.model_uris["finetuned"].split("/")[-1])
    assert tuned.tags["tfharness.source_model_id"] == finetuned_id
    assert tuned.tags["tfharness.source"] == "models:/clf@champion"
    # The other MLflow URI forms name the same logged model.
    for uri in (f"models:/clf/{version.version}", f"models:/{finetuned_id}",
                f"runs:/{first.run_id}/finetuned"):
        found = sources.resolve_mlflow(uri, client.tracking_uri, tmp_path / "dl")
        assert integrity.record_of(found.path).sha256 == first.digests["finetuned"], uri
        assert found.lineage["tfharness.source_run_id"] == first.run_id
        assert found.class_names == source_classes, uri


def test_lambda_is_refused_unless_allow_unsafe(artifacts, tmp_path):
    import keras

    root, x, *_ = artifacts
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(4),
                              keras.layers.Lambda(lambda t: t * 2.0)])
    path = tmp_path / "lambda.keras"
    model.save(path)
    from tfharness.config import PathSourceConfig

    for file in (path, root / "keras2_lambda.h5"):
        cfg = PathSourceConfig(path=str(file))
        with pytest.raises(SourceError, match="source.allow_unsafe=true"):
            sources.load_source(cfg, tracking_uri="", workdir=tmp_path, input_shape=(FEATURES,),
                                probe=x, atol=1e-6)
        cfg.allow_unsafe = True
        loaded = sources.load_source(cfg, tracking_uri="", workdir=tmp_path,
                                     input_shape=(FEATURES,), probe=x, atol=1e-6)
        assert type(loaded.model.layers[-1]).__name__ == "Lambda"


def test_damaged_artifacts_are_named_as_such_and_leave_no_run(artifacts, make_cfg, client,
                                                              tmp_path):
    import shutil

    root, *_ = artifacts
    truncated = tmp_path / "model.keras"
    data = (root / "model.keras").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    shutil.copy(integrity.record_path(root / "model.keras"), integrity.record_path(truncated))
    with pytest.raises(IntegrityError, match="truncated or altered") as caught:
        tfharness.run(make_cfg([*DATA, "source=path", f"source.path={truncated}"]))
    assert "File not found" not in str(caught.value)
    # Without a record, the load error still says what is wrong with the file.
    integrity.record_path(truncated).unlink()
    with pytest.raises(SourceError, match="truncated, altered or not a Keras model"):
        tfharness.run(make_cfg([*DATA, "source=path", f"source.path={truncated}"]))

    altered = tmp_path / "harness_sm"
    shutil.copytree(root / "harness_sm", altered)
    shutil.copy(integrity.record_path(root / "harness_sm"), integrity.record_path(altered))
    index = next((altered / "variables").glob("*.data-*"))
    index.write_bytes(index.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(IntegrityError, match=r"variables/variables\.data-.* changed"):
        tfharness.run(make_cfg([*DATA, "source=path", f"source.path={altered}"]))
    exp = client.get_experiment_by_name("tfharness")
    assert exp is None or client.search_runs([exp.experiment_id]) == []


def test_bad_sources_are_clear_errors_before_any_run(artifacts, make_cfg, client, tmp_path,
                                                     monkeypatch):
    root, *_ = artifacts
    with pytest.raises(ConfigError, match="'source.path': got .*nowhere"):
        tfharness.run(make_cfg([*DATA, "source=path", f"source.path={tmp_path / 'nowhere'}"]))
    with pytest.raises(ConfigError, match="'source.uri': got '\\?\\?\\?'"):
        tfharness.run(make_cfg([*DATA, "source=mlflow"]))
    with pytest.raises(ConfigError, match="'source.uri': got 'clf'"):
        tfharness.run(make_cfg([*DATA, "source=mlflow", "source.uri=clf"]))
    with pytest.raises(SourceError, match="source.uri='models:/nope@champion'"):
        tfharness.run(make_cfg([*DATA, "source=mlflow", "source.uri=models:/nope@champion"]))
    seed = [*SEED_DATA, "source=path", f"source.path={root / 'my_saved_model'}"]
    with pytest.raises(ConfigError, match="'finetune.head.pop': got 1; allowed: 0 for a "
                                          "SavedModel without Keras metadata"):
        tfharness.run(make_cfg(seed))
    with pytest.raises(ConfigError, match="'save_format': got 'keras'; allowed: savedmodel"):
        tfharness.run(make_cfg([*seed, "finetune.head.pop=0", "save_format=keras"]))
    with pytest.raises(ConfigError, match="'source.freeze_variables': got .*finetune.freeze"):
        tfharness.run(make_cfg([*DATA, "source=path", f"source.path={root / 'keras2.h5'}",
                                "source.freeze_variables=[d0*]"]))
    with pytest.raises(ConfigError, match=r"source.freeze_variables\[0\].*sequential/dense/kernel"):
        tfharness.run(make_cfg([*seed, "finetune.head.pop=0", "source.freeze_variables=[conv*]"]))
    with pytest.raises(ConfigError, match="'data': got 'samples of shape \\(12,\\)'.*784"):
        tfharness.run(make_cfg([*DATA, "source=path", f"source.path={root / 'my_saved_model'}",
                                "finetune.head.pop=0"]))
    # Without the 'legacy' extra, a Keras 2 SavedModel is refused with the extra named.
    monkeypatch.setitem(sys.modules, "tf_keras", None)
    with pytest.raises(SourceError, match=r"extra 'legacy': pip install 'tfharness\[legacy\]'"):
        tfharness.run(make_cfg([*DATA, "source=path",
                                f"source.path={root / 'keras2_savedmodel'}"]))
    exp = client.get_experiment_by_name("tfharness")
    assert exp is None or client.search_runs([exp.experiment_id]) == []
