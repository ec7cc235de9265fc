"""The private Keras and MLflow APIs tfharness still uses (each marked "private" where it is
used, saying why no public one does): these tests fail when an upgrade moves or changes them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import mlflow
import numpy as np


def test_keras_safe_mode_scope_is_what_the_opaque_block_reads():
    """sources/loading.py: a load in (un)safe mode for that load only, read by from_config."""
    from keras.src.saving.serialization_lib import SafeModeScope, in_safe_mode

    with SafeModeScope(False):
        assert in_safe_mode() is False
        with SafeModeScope(True):
            assert in_safe_mode() is True
        assert in_safe_mode() is False


def test_model_log_honours_validate_serving_input(tmp_path, tracking_uri, caplog):
    """tracking/models.py: the input example is kept and the serving check is skipped.

    The artifact is not a model at all, so a serving check would fail to load it and warn
    ("Failed to validate serving input example", as it does without the keyword).
    """
    from mlflow.models import infer_signature

    from tfharness.tracking.models import ModelSpec, log_model_spec

    uri = tracking_uri
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    # Artifacts under tmp_path: the default root, ./mlruns, would land in the working folder.
    run = client.create_run(client.create_experiment(
        "private", artifact_location=(tmp_path / "artifacts").as_uri()))
    artifact = tmp_path / "not-a-model.keras"
    artifact.write_bytes(b"not a zip archive")
    example = np.zeros((2, 3), np.float32)
    spec = ModelSpec("m", str(artifact), infer_signature(example, np.zeros((2, 1))), example,
                     ["keras"])
    with caplog.at_level(logging.WARNING):
        model_uri = log_model_spec(spec, run.info.run_id)
    assert "Failed to validate serving input" not in caplog.text
    info = mlflow.models.get_model_info(model_uri)
    assert info.saved_input_example_info is not None
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    logged = client.get_logged_model(model_uri.split("/")[-1])
    assert logged.source_run_id == run.info.run_id
    assert logged.name == "m"


def test_functional_graph_rerun_keeps_every_layer_in_place():
    """data_record.with_preprocessing re-runs a functional model's graph (private
    ``Functional._run_through_graph``): its layers stay flat, after the preprocessing."""
    from types import SimpleNamespace

    import keras

    from tfharness.pipeline.data_record import with_preprocessing

    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="d1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="d2")(hidden))
    split = SimpleNamespace(preprocessing=lambda: [keras.layers.Rescaling(0.5, name="scale")])
    wrapped = with_preprocessing(model, split)
    assert [layer.name for layer in wrapped.layers] == ["features", "scale", "d1", "d2"]


def test_the_digits_are_read_from_scikit_learns_file_as_load_digits_returns_them(monkeypatch):
    """data/builtin.py: scikit-learn's digits file is where it keeps it, and reading it without
    importing scikit-learn gives what ``load_digits`` gives."""
    import builtins

    from sklearn.datasets import load_digits

    from tfharness.data import builtin

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise AssertionError(f"the fast path imported {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    images, labels = builtin.load_digits()
    monkeypatch.setattr(builtins, "__import__", real_import)
    expected = load_digits()
    assert images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images, expected.images)
    np.testing.assert_array_equal(labels, expected.target)


def test_keras_imports_without_scikit_learn_when_its_import_fails():
    """pipeline/prepare.py (KerasWithoutScikitLearn): Keras treats a failed ``import sklearn``
    as scikit-learn missing and still imports, defining its scikit-learn wrappers without it.
    In a fresh interpreter, since this one may have imported Keras already."""
    code = (
        "import sys\n"
        "from tfharness.pipeline.prepare import KerasWithoutScikitLearn\n"
        "with KerasWithoutScikitLearn():\n"
        "    import keras\n"
        "assert 'sklearn' not in sys.modules and 'scipy.stats' not in sys.modules\n"
        "assert hasattr(keras.wrappers, 'SKLearnClassifier')\n"
        "import sklearn.base\n"  # the user's own import of it still works
        "print('ok', sklearn.__version__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok ")
