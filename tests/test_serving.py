"""SavedModels worth serving: named signatures, extra ones from config, TF Serving's version layout,
and in-memory round trips inside a run."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

import prewarmed
import tfharness
from tfharness.artifacts import serialization, serving
from tfharness.config import SERVING_SIGNATURES, MlpConfig, to_typed, validate
from tfharness.errors import ConfigError, SaveError
from tfharness.models import build_model, compile_model

from conftest import TINY_SYNTHETIC, only_run

SAVED_MODEL_CLI = Path(sys.executable).parent / "saved_model_cli"
ALL = ["probabilities", "logits", "embedding", "classes"]


def trained_mlp(output_activation="softmax"):
    import keras

    keras.utils.set_random_seed(0)
    model = build_model(MlpConfig(units=[8], output_activation=output_activation), (12,), 4)
    compile_model(model, "adam", 1e-2)
    x = np.random.default_rng(0).random((20, 12), dtype=np.float32)
    model.fit(x, np.arange(20) % 4, epochs=2, verbose=0)
    return model, x


def test_config_and_serving_agree_on_the_signature_names():
    assert tuple(serving.EXTRA_SIGNATURES) == SERVING_SIGNATURES


def test_signatures_are_named_listed_by_saved_model_cli_and_exact(tmp_path):
    import keras
    import tensorflow as tf

    model, x = trained_mlp()
    path = serialization.save_model(model, tmp_path / "sm", "savedmodel", ALL)
    shown = prewarmed.run([str(SAVED_MODEL_CLI), "show", "--all", "--dir", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    for name in ["serving_default", *ALL]:
        assert f"signature_def['{name}']:" in shown.stdout
    default = shown.stdout.split("signature_def['serving_default']:")[1].split("signature_def[")[0]
    assert "inputs['features'] tensor_info:" in default
    assert "shape: (-1, 12)" in default
    assert "outputs['probabilities'] tensor_info:" in default

    loaded = tf.saved_model.load(str(path))
    features = tf.constant(x)
    expected = model(x, training=False).numpy()
    call = {name: loaded.signatures[name](features=features) for name in ["serving_default", *ALL]}
    np.testing.assert_array_equal(call["serving_default"]["probabilities"].numpy(), expected)
    np.testing.assert_array_equal(call["probabilities"]["probabilities"].numpy(), expected)
    embedding = keras.Model(model.inputs[0], model.get_layer("dense_0").output)(x).numpy()
    np.testing.assert_array_equal(call["embedding"]["embedding"].numpy(), embedding)
    np.testing.assert_allclose(tf.nn.softmax(call["logits"]["logits"]).numpy(), expected,
                               atol=1e-6)
    assert call["classes"]["classes"].dtype == tf.int64
    np.testing.assert_array_equal(call["classes"]["classes"].numpy(), expected.argmax(-1))
    # The tfharness reload still rebuilds every layer with the same weights.
    reloaded, again = serialization.load_savedmodel(path)
    assert [v.name for v in again.variables] == [f"{w.path}:0" for w in model.weights]
    np.testing.assert_array_equal(reloaded(x).numpy(), expected)


def test_linear_output_serves_logits_and_softmax_probabilities(tmp_path):
    import tensorflow as tf

    model, x = trained_mlp("linear")
    trip = serialization.save_reload_verify(model, tmp_path / "sm", "savedmodel", x, 0.0,
                                            ["probabilities"])
    assert trip.serving_max_abs_diff == 0.0
    loaded = tf.saved_model.load(str(trip.path))
    outputs = loaded.signatures["serving_default"](features=tf.constant(x))
    assert list(outputs) == ["logits"]
    np.testing.assert_allclose(
        loaded.signatures["probabilities"](features=tf.constant(x))["probabilities"].numpy(),
        tf.nn.softmax(model(x)).numpy(), atol=1e-6)
    relu, _ = trained_mlp("relu")
    with pytest.raises(SaveError, match="'probabilities' signature needs an output layer with a "
                                        "softmax, sigmoid or linear activation; 'output' has "
                                        "'relu'"):
        serialization.save_model(relu, tmp_path / "relu", "savedmodel", ["probabilities"])
    assert list(tmp_path.iterdir()) == [tmp_path / "sm"]  # the failed save left nothing


def test_versions_number_up_and_ignore_unfinished_writes(tmp_path):
    model, _ = trained_mlp()
    base = tmp_path / "models" / "digits"
    assert serving.next_version_path(base) == base / "1"
    serialization.save_model(model, serving.next_version_path(base), "savedmodel")
    (base / ".2.tmp-0123abcd").mkdir()  # what a crash during the next atomic write leaves
    second = serialization.save_model(model, serving.next_version_path(base), "savedmodel")
    assert second == base / "2"
    assert serving.version_numbers(base) == [1, 2]
    assert serving.latest_version_path(base) == base / "2"
    assert serialization.is_harness_savedmodel(base / "2")
    with pytest.raises(SaveError, match="no numbered version directory"):
        serving.latest_version_path(tmp_path / "empty")


def test_versioned_run_with_signatures_writes_the_serving_layout(make_cfg, client, tmp_path):
    import tensorflow as tf

    overrides = [*TINY_SYNTHETIC, "model.units=[8]", "trainer.epochs=1", "finetune.epochs=1",
                 "save_format.versioned=true", "save_format.signatures=[embedding,classes]"]
    result = tfharness.run(make_cfg(overrides))
    models = tmp_path / "out" / "models"
    assert result.artifacts["pretrained"] == models / "pretrained" / "1"
    assert result.artifacts["finetuned"] == models / "finetuned" / "1"
    loaded = tf.saved_model.load(str(models / "finetuned" / "1"))
    assert {"serving_default", "embedding", "classes"} <= set(loaded.signatures)
    # The version logged to MLflow serves through pyfunc like an unversioned one.
    import mlflow

    served = mlflow.pyfunc.load_model(result.model_uris["finetuned"]).predict(
        np.zeros((2, 12), np.float32))
    assert served.shape == (2, 3)
    # Same output folder again: the next version, the first one kept for rollback.
    again = tfharness.run(make_cfg([*overrides, "tracking.log_models=false"]))
    assert again.artifacts["finetuned"] == models / "finetuned" / "2"
    assert serving.version_numbers(models / "finetuned") == [1, 2]


@pytest.mark.parametrize("form", [["save_format.signatures=[embedding]"], ["save_format=keras"]])
def test_in_memory_run_logs_the_byte_size_and_writes_no_model(make_cfg, client, tmp_path, form):
    overrides = [*TINY_SYNTHETIC, "model.units=[8]", "trainer.epochs=1", "finetune.epochs=1",
                 *form, "save_format.in_memory=true"]
    result = tfharness.run(make_cfg(overrides))
    run = only_run(client)
    assert run.info.status == "FINISHED"
    for stem in ("pretrained", "finetuned"):
        sizes = client.get_metric_history(run.info.run_id, f"reload/{stem}/size_bytes")
        assert [m.step for m in sizes] == [0] and sizes[0].value > 10_000
        assert run.data.metrics[f"reload/{stem}/max_abs_diff"] == 0.0
        if "save_format=keras" not in form:  # only a SavedModel has a serving signature
            assert run.data.metrics[f"reload/{stem}/serving_max_abs_diff"] == 0.0
    assert "test/accuracy" in run.data.metrics  # fine-tuning went on from the deserialized model
    assert not (tmp_path / "out" / "models").exists()
    assert "pretrained" not in result.artifacts and result.model_uris == {}
    assert run.data.tags["model_logging"].startswith("skipped: save_format.in_memory=true")


@pytest.mark.parametrize("overrides, key, got", [
    (["save_format.signatures=[embeddings]"], "save_format.signatures[0]", "'embeddings'"),
    (["save_format.signatures=[classes,classes]"], "save_format.signatures", "['classes', "
                                                                             "'classes']"),
    (["save_format=keras", "save_format.signatures=[embedding]"], "save_format.signatures",
     "['embedding']"),
    (["save_format=keras", "save_format.versioned=true"], "save_format.versioned", "True"),
    (["save_format=h5", "save_format.in_memory=true"], "save_format.name", "'h5'"),
    (["save_format.in_memory=true", "save_format.versioned=true"], "save_format.versioned",
     "True"),
    (["save_format.in_memory=true", "tracking.register=digits"], "tracking.register",
     "'digits'"),
    (["save_format.in_memory=true", "sweep.register_best=digits"], "sweep.register_best",
     "'digits'"),
    (["model.output_activation=relu", "save_format.signatures=[probabilities]"],
     "model.output_activation", "'relu'"),
])
def test_bad_serving_config_names_the_key(overrides, key, got):
    cfg = to_typed(tfharness.compose(["output_dir=/tmp/unused", *overrides]))
    with pytest.raises(ConfigError, match=re.escape(f"Invalid value for '{key}'")) as error:
        validate(cfg)
    assert f"got {got};" in str(error.value)


def test_a_two_input_model_keeps_keras_own_signature_and_refuses_extras(tmp_path):
    import keras

    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    joined = keras.layers.Concatenate(name="join")([a, b])
    model = keras.Model([a, b], keras.layers.Dense(2, activation="softmax", name="output")(joined))
    x = [np.ones((4, 3), np.float32), np.arange(8, dtype=np.float32).reshape(4, 2)]
    path = serialization.save_model(model, tmp_path / "sm", "savedmodel")
    np.testing.assert_array_equal(serialization.load_model(path)(x).numpy(), model(x).numpy())
    with pytest.raises(SaveError, match=r"Extra signatures \['embedding'\] need a model with one "
                                        r"symbolic input; .* has 2"):
        serialization.save_model(model, tmp_path / "sm2", "savedmodel", ["embedding"])
    assert not (tmp_path / "sm2").exists()
