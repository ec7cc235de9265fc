"""trainer.precision, trainer.jit_compile and trainer.steps_per_execution: checked, recorded,
and a mixed-precision model saves, reloads and verifies in every format."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tfharness
from tfharness.artifacts import inmemory, serialization
from tfharness.config import CnnConfig, to_typed, validate
from tfharness.errors import ConfigError
from tfharness.models import build_model, compile_model, restoring_policy, set_policy

from conftest import TINY_SYNTHETIC, only_run

MIXED = ("mixed_float16", "mixed_bfloat16")


@pytest.mark.parametrize("override, message", [
    ("trainer.precision=float16", "trainer.precision.*float16.*mixed_bfloat16"),
    ("trainer.jit_compile=1", "trainer.jit_compile.*1.*auto, true or false"),
    ("trainer.jit_compile=xla", "trainer.jit_compile.*xla.*auto, true or false"),
    ("trainer.steps_per_execution=0", "trainer.steps_per_execution.*0.*>= 1"),
])
def test_bad_speed_settings_name_the_key(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(to_typed(make_cfg([*TINY_SYNTHETIC, override])))


def test_the_previous_policy_comes_back_however_the_block_ends():
    assert keras.config.dtype_policy().name == "float32"
    with restoring_policy():
        set_policy("mixed_bfloat16")
        with pytest.raises(RuntimeError):
            with restoring_policy():
                set_policy("mixed_float16")
                raise RuntimeError("a failed run")
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"


def _trained_mixed_cnn(policy: str):
    """A CNN (BatchNormalization included) built and trained one epoch under ``policy``."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 32).astype(np.int32)
    with restoring_policy():
        set_policy(policy)
        keras.utils.set_random_seed(0)
        model = build_model(CnnConfig(filters=[4], dense_units=8), (8, 8, 1), 3)
        compile_model(model, "adam", 1e-2)
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    return model, x


@pytest.mark.parametrize("policy", MIXED)
def test_mixed_precision_model_round_trips_in_every_format(tmp_path, policy):
    model, probe = _trained_mixed_cnn(policy)
    # Compute in low precision, variables and the output (softmax) in float32.
    assert model.get_layer("conv_0").compute_dtype == policy.split("_")[1]
    assert model.get_layer("output").compute_dtype == "float32"
    assert {w.dtype for w in model.weights} == {"float32"}
    trips = {fmt: serialization.save_reload_verify(
        model, serialization.artifact_path(tmp_path, "m", fmt), fmt, probe, 0.0,
        ["probabilities"] if fmt == "savedmodel" else ())
        for fmt in serialization.SUFFIXES}
    trips.update({f"in-memory {fmt}": inmemory.save_reload_verify(model, fmt, probe, 0.0)
                  for fmt in ("keras", "savedmodel")})
    # Reloaded outside the policy's scope: each layer keeps the policy it was saved with.
    assert keras.config.dtype_policy().name == "float32"
    for way, trip in trips.items():
        assert trip.max_abs_diff == 0.0, way
        assert trip.model.get_layer("conv_0").dtype_policy.name == policy, way
        assert trip.model.get_layer("output").compute_dtype == "float32", way
        np.testing.assert_array_equal(trip.model.get_layer("bn_0").moving_variance.numpy(),
                                      model.get_layer("bn_0").moving_variance.numpy())
    assert trips["savedmodel"].serving_max_abs_diff == 0.0
    assert trips["in-memory savedmodel"].serving_max_abs_diff == 0.0


def test_a_mixed_precision_xla_run_is_recorded_and_the_next_run_is_float32(make_cfg, client):
    """Pretrain, save, reload, verify, fine-tune (new head), save, verify: all under
    mixed_bfloat16 with XLA and two steps per execution; the process' policy is float32 after."""
    result = tfharness.run(make_cfg([
        *TINY_SYNTHETIC, "model.units=[8]", "trainer.epochs=2", "finetune.epochs=1",
        "trainer.precision=mixed_bfloat16", "trainer.jit_compile=true",
        "trainer.steps_per_execution=2", "save_format=savedmodel"]))
    assert keras.config.dtype_policy().name == "float32"
    run = only_run(client)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["trainer.precision"], params["trainer.jit_compile"],
            params["trainer.steps_per_execution"]) == ("mixed_bfloat16", "True", "2")
    assert run.data.metrics["reload/pretrained/max_abs_diff"] == 0.0
    assert run.data.metrics["reload/finetuned/max_abs_diff"] == 0.0
    assert run.data.metrics["reload/finetuned/serving_max_abs_diff"] == 0.0
    assert run.data.metrics["finetune/frozen_weight_change_max"] == 0.0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pretrain/loss")] == [0, 1]
    tuned = serialization.load_model(result.artifacts["finetuned"])
    assert tuned.get_layer("dense_0").dtype_policy.name == "mixed_bfloat16"
    assert tuned.layers[-1].compute_dtype == "float32"  # the new head
