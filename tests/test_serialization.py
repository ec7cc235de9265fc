"""Save, reload and verify: every format gives back a full Keras model with the same outputs."""

from __future__ import annotations

import numpy as np
import pytest

from tfharness.artifacts import serialization
from tfharness.config import CnnConfig, MlpConfig
from tfharness.errors import SaveError, VerificationError
from tfharness.models import build_model, compile_model


def trained_cnn():
    """A CNN whose BatchNormalization statistics moved away from their initial values."""
    import keras

    keras.utils.set_random_seed(0)
    model = build_model(CnnConfig(filters=[4], dense_units=8), (8, 8, 1), 3)
    compile_model(model, "adam", 1e-2)
    x = np.random.default_rng(0).random((32, 8, 8, 1), dtype=np.float32)
    y = np.arange(32) % 3
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    return model, x


@pytest.mark.parametrize("fmt", ["savedmodel", "keras", "h5"])
def test_round_trip_is_exact_and_keeps_every_layer(tmp_path, fmt):
    model, x = trained_cnn()
    target = serialization.artifact_path(tmp_path, "m", fmt)
    trip = serialization.save_reload_verify(model, target, fmt, x, atol=0.0)
    reloaded = trip.model
    assert trip.max_abs_diff == 0.0
    assert [layer.name for layer in reloaded.layers] == [layer.name for layer in model.layers]
    for original, restored in zip(model.weights, reloaded.weights):
        np.testing.assert_array_equal(np.asarray(original), np.asarray(restored))
    bn = reloaded.get_layer("bn_0")
    assert not np.allclose(np.asarray(bn.moving_variance), 1.0)  # statistics came back too
    # Ready to train: freeze a layer and fit.
    reloaded.layers[0].trainable = False
    compile_model(reloaded, "adam", 1e-3)
    reloaded.fit(x, np.arange(32) % 3, epochs=1, verbose=0)
    # Nothing temporary left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_harness_savedmodel_still_serves_through_its_signature(tmp_path):
    import tensorflow as tf

    model, x = trained_cnn()
    path = serialization.save_model(model, tmp_path / "sm", "savedmodel")
    loaded = tf.saved_model.load(str(path))
    outputs = loaded.signatures["serving_default"](tf.constant(x))
    served = next(iter(outputs.values())).numpy()
    np.testing.assert_array_equal(served, model(x, training=False).numpy())
    trip = serialization.save_reload_verify(model, tmp_path / "sm2", "savedmodel", x, atol=0.0)
    assert trip.serving_max_abs_diff == 0.0


def test_seed_example1_savedmodel_fails_on_plain_tensorflow_but_not_here(tmp_path):
    """The seed's Example 1 calls the loaded object; on Keras 3 that needs the signature."""
    import tensorflow as tf

    import keras

    model = build_model(MlpConfig(units=[10]), (784,), 10)
    path = serialization.save_model(model, tmp_path / "my_saved_model", "savedmodel")
    with pytest.raises(TypeError, match="not callable"):
        tf.saved_model.load(str(path))(tf.random.normal((1, 784)))
    with pytest.raises(ValueError, match="File format not supported"):
        keras.models.load_model(str(path))
    reloaded = serialization.load_model(path)
    assert reloaded(np.zeros((1, 784), np.float32)).shape == (1, 10)


def test_failed_save_leaves_the_previous_artifact_and_no_temporary_files(tmp_path):
    model, x = trained_cnn()
    target = serialization.save_model(model, tmp_path / "m.keras", "keras")
    before = target.read_bytes()

    def crash(tmp):
        tmp.write_bytes(b"half a model")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        serialization.atomic_write(target, crash)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]


def test_replacing_a_savedmodel_directory_is_atomic(tmp_path):
    model, x = trained_cnn()
    target = tmp_path / "sm"
    serialization.save_model(model, target, "savedmodel")
    serialization.save_model(model, target, "savedmodel")
    assert [p.name for p in tmp_path.iterdir()] == ["sm"]
    assert serialization.is_harness_savedmodel(target)


def test_verification_fails_past_the_tolerance():
    expected = np.zeros((4, 3), np.float32)
    assert serialization.check_outputs(expected, expected + 1e-7, 1e-6, "m") == pytest.approx(1e-7)
    with pytest.raises(VerificationError, match="difference 0.001 > save_format.verify_atol=1e-06"):
        serialization.check_outputs(expected, expected + 1e-3, 1e-6, "m")
    with pytest.raises(VerificationError, match="differs"):
        serialization.check_outputs(expected, expected * np.nan, 1.0, "m")
    with pytest.raises(VerificationError, match="shape"):
        serialization.check_outputs(expected, expected[:, :2], 1.0, "m")


def test_unknown_artifacts_get_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaveError, match="not a SavedModel written by tfharness"):
        serialization.load_model(tmp_path / "empty")
    with pytest.raises(SaveError, match="No model at"):
        serialization.load_model(tmp_path / "missing.keras")
    with pytest.raises(SaveError, match="needs a '.keras' file name"):
        serialization.save_model(object(), tmp_path / "m.bin", "keras")
