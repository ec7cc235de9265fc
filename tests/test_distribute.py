"""Training under a tf.distribute strategy: mirrored on two logical CPUs, same results contract."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest

import tfharness
from tfharness.pipeline import distribute
from tfharness.config import to_typed, validate
from tfharness.errors import ConfigError

from conftest import TINY_SYNTHETIC


def test_mirrored_on_two_logical_cpus_keeps_the_results_contract(tmp_path):
    """A new process (the CPU can only be split before TensorFlow starts) trains, saves,
    reloads, verifies, fine-tunes and registers with two replicas."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = subprocess.run(
        [sys.executable, "-m", "tfharness", *TINY_SYNTHETIC, "model.units=[4]",
         "trainer.epochs=2", "finetune.epochs=2", "trainer.strategy=mirrored",
         "trainer.cpu_devices=2", "tracking.register=mirrored", f"tracking.uri={uri}",
         "print_report=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tfharness").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["replicas"] == "2"
    run_id = run.info.run_id
    for key, steps in (("pretrain/loss", [0, 1]), ("pretrain/val_accuracy", [0, 1]),
                       ("finetune/loss", [0, 1]), ("reload/finetuned/max_abs_diff", [0])):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == steps, key
    assert run.data.metrics["reload/finetuned/max_abs_diff"] == 0.0
    assert run.data.metrics["finetune/frozen_weight_change_max"] == 0.0
    version = client.get_model_version("mirrored", "1")
    assert version.run_id == run_id
    assert run.data.tags["tfharness.registered_model"] == "mirrored/1"


def test_strategy_and_device_settings_are_checked(make_cfg):
    cfg = to_typed(make_cfg([*TINY_SYNTHETIC, "trainer.strategy=parameter_server"]))
    with pytest.raises(ConfigError, match="trainer.strategy.*parameter_server.*mirrored"):
        validate(cfg)
    import tensorflow as tf

    tf.constant(1.0)  # TensorFlow has started in this process: too late to split the CPU
    with pytest.raises(ConfigError, match="trainer.cpu_devices.*new process"):
        distribute.split_cpu(3)


def test_registering_needs_tracking(make_cfg):
    cfg = to_typed(make_cfg([*TINY_SYNTHETIC, "tracking=off", "tracking.register=m"]))
    with pytest.raises(ConfigError, match="tracking.register"):
        validate(cfg)
    assert tfharness.compose(["tracking=local"]).tracking.register is None
