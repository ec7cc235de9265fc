"""Training under a tf.distribute strategy: mirrored on two logical CPUs, same results contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest

import tfharness
from tfharness.pipeline import distribute
from tfharness.config import to_typed, validate
from tfharness.errors import ConfigError

from conftest import TINY_SYNTHETIC, empty_store, free_port
import prewarmed


def test_mirrored_on_two_logical_cpus_keeps_the_results_contract(tmp_path):
    """A new process (the CPU can only be split before TensorFlow starts) trains, saves,
    reloads, verifies, fine-tunes and registers with two replicas."""
    uri = empty_store(tmp_path / "mlflow.db")
    out = prewarmed.run(
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


def _start_worker(index: int, ports, tmp_path, uri: str) -> subprocess.Popen:
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                 "task": {"type": "worker", "index": index}}
    return prewarmed.Popen(
        [sys.executable, "-m", "tfharness", *TINY_SYNTHETIC, "model.units=[4]",
         "trainer.epochs=2", "finetune.epochs=1", "trainer.strategy=multi_worker",
         f"tracking.uri={uri}", f"output_dir={tmp_path / 'out'}",
         f"checkpoint_root={tmp_path / 'checkpoints'}", "print_report=false"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_CONFIG": json.dumps(tf_config)})


def test_multi_worker_on_two_local_processes_records_one_run(tmp_path):
    """Two workers on 127.0.0.1 train together; the chief (worker 0) records the one MLflow run
    and writes the artifacts; worker 1 opens no run and leaves nothing in the chief's folders."""
    uri = empty_store(tmp_path / "mlflow.db")
    ports = [free_port(), free_port()]
    workers = [_start_worker(i, ports, tmp_path, uri) for i in range(2)]
    try:
        outputs = [w.communicate(timeout=420)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for index, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, f"worker {index}:\n{output[-3000:]}"
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tfharness").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["replicas"] == "2"
    assert run.data.params["trainer.strategy"] == "multi_worker"
    run_id = run.info.run_id
    # One point per epoch: the other worker's metrics are not in the run.
    for key, steps in (("pretrain/loss", [0, 1]), ("finetune/loss", [0]),
                       ("reload/pretrained/max_abs_diff", [0]),
                       ("reload/finetuned/max_abs_diff", [0])):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == steps, key
    assert run.data.metrics["finetune/frozen_weight_change_max"] == 0.0
    assert sorted(p.name for p in (tmp_path / "out" / "models").iterdir()) == [
        "finetuned", "finetuned.sha256.json", "pretrained", "pretrained.sha256.json"]
    assert "multi_worker: worker 1 trains with the chief" in outputs[1]


def test_a_malformed_tf_config_names_it(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG.*not json.*cluster"):
        distribute.worker_task()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert distribute.worker_task() == ("worker", 0, False)
    monkeypatch.delenv("TF_CONFIG")
    assert distribute.worker_task() == ("worker", 0, True)


def test_multi_worker_refuses_what_would_put_its_workers_out_of_step(make_cfg, tmp_path):
    """Every worker runs every step, and only the chief sees the store and keeps checkpoints: a
    resumed chief, a chief reusing a pretraining, or a sweep would leave the other workers
    waiting at another collective. Resume and sweeps are refused; the pretrain cache is off."""
    from types import SimpleNamespace

    from tfharness.pipeline import pretrain_cache

    multi = [*TINY_SYNTHETIC, "trainer.strategy=multi_worker"]
    with pytest.raises(ConfigError, match="'resume': got True; allowed: false with "
                                          "trainer.strategy=multi_worker"):
        validate(to_typed(make_cfg([*multi, "resume=true"])))
    cfg = to_typed(make_cfg([*multi, "pretrain_cache=auto"]))
    validate(cfg)
    assert "multi_worker" in pretrain_cache.why_not(SimpleNamespace(cfg=cfg))

    done = prewarmed.run(
        [sys.executable, "-m", "tfharness", "-m", *multi, "finetune.learning_rate=1e-2,1e-3",
         f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 1
    assert ("tfharness: Invalid value for 'trainer.strategy': got 'multi_worker'; allowed: "
            "default or mirrored in a sweep (-m)") in done.stderr
    assert not (tmp_path / "m.db").exists()  # no parent run, no trial run
