"""Bring your own model, data, optimizer and callbacks: every swappable part a `_target_`.

A user project written in tmp_path (its own builder, data factory, callback and config folder)
runs through `tfharness.run`; the example in examples/own_project runs through the command;
each bad `_target_` is one line naming its key, and no MLflow run is opened.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest

import tfharness
from conftest import empty_store, only_run
import prewarmed
from tfharness.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_project"
BIN = Path(sys.executable).parent

PROJECT = '''
import numpy as np
import keras

NOT_CALLABLE = 3


def functional(input_shape, num_classes, width=8):
    inputs = keras.Input(shape=input_shape, name="features")
    hidden = keras.layers.Dense(width, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="output")(hidden)
    return keras.Model(inputs, outputs, name="functional")


def not_a_model(input_shape, num_classes):
    return "a string"


def datasets(n=48, features=5, classes=3, batch=8):
    import tensorflow as tf

    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, features)).astype("float32")
    y = (np.arange(n) % classes).astype("int32")

    def part(a, b):
        return tf.data.Dataset.from_tensor_slices((x[a:b], y[a:b])).batch(batch)

    return {"pretrain": {"train": part(0, 32), "val": part(32, 40), "test": part(40, n),
                         "class_names": ["a", "b", "c"]}}


def not_data():
    return [1, 2, 3]


class CountEpochs(keras.callbacks.Callback):
    seen = []

    def __init__(self, label="x"):
        super().__init__()
        self.label = label

    def on_epoch_end(self, epoch, logs=None):
        CountEpochs.seen.append((self.label, epoch))


class NotACallback:
    pass


class InterruptOnce(keras.callbacks.Callback):
    """Ctrl-C at the end of the first fit that sees the flag file (then the file is gone)."""

    def __init__(self, flag):
        super().__init__()
        self.flag = flag

    def on_train_end(self, logs=None):
        import os
        if os.path.exists(self.flag):
            os.remove(self.flag)
            raise KeyboardInterrupt
'''


@pytest.fixture
def project(tmp_path, monkeypatch, request):
    """A user project in tmp_path, the current folder; its module is named per test."""
    name = f"userproj_{request.node.name.split('[')[0][-30:]}".replace("-", "_")
    (tmp_path / f"{name}.py").write_text(PROJECT)
    configs = tmp_path / "configs"
    (configs / "model").mkdir(parents=True)
    (configs / "data").mkdir()
    (configs / "model" / "functional.yaml").write_text(f"_target_: {name}.functional\nwidth: 8\n")
    (configs / "data" / "datasets.yaml").write_text(f"_target_: {name}.datasets\nbatch: 8\n")
    monkeypatch.chdir(tmp_path)
    # The run makes the current folder importable; undo that after the test.
    monkeypatch.setattr(sys, "path", list(sys.path))
    return name, configs


def compose(tmp_path, configs, overrides):
    return tfharness.compose([
        f"output_dir={tmp_path / 'out'}", f"tracking.uri={empty_store(tmp_path / 'mlflow.db')}",
        f"checkpoint_root={tmp_path / 'checkpoints'}", "print_report=false",
        # Each test's runs pretrain for themselves (tests/test_pretrain_cache.py tests reuse).
        "pretrain_cache=off", *overrides,
    ], config_dir=configs)


def test_a_user_project_runs_through_tfharness_run(tmp_path, project):
    name, configs = project
    result = tfharness.run(compose(tmp_path, configs, [
        "model=functional", "data=datasets", "trainer.epochs=3", "finetune=continue",
        "finetune.epochs=2", "finetune.freeze=[hidden]",
        "trainer.optimizer={_target_: keras.optimizers.AdamW, weight_decay: 0.01}",
        "trainer.metrics=[accuracy,{_target_: keras.metrics.SparseTopKCategoricalAccuracy,"
        "k: 2, name: top2}]",
        f"trainer.callbacks=[{{_target_: {name}.CountEpochs, label: train}}]",
        "finetune.callbacks=[]"]))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = only_run(client)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model._target_"] == f"{name}.functional" and params["model.width"] == "8"
    assert params["data._target_"] == f"{name}.datasets"
    assert params["trainer.optimizer._target_"] == "keras.optimizers.AdamW"
    assert params["trainer.optimizer.weight_decay"] == "0.01"
    assert params["trainer.metrics.1._target_"] == "keras.metrics.SparseTopKCategoricalAccuracy"
    assert params["trainer.callbacks.0._target_"] == f"{name}.CountEpochs"
    assert run.data.tags["model"] == f"{name}.functional"
    # Every epoch of each phase, from the datasets; the top-2 metric the user asked for.
    history = client.get_metric_history(run.info.run_id, "pretrain/val_top2")
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "finetune/loss")] == [0, 1]
    # The user's callback ran in pretraining only: finetune.callbacks=[] replaced it.
    seen = sys.modules[name].CountEpochs.seen
    assert seen == [("train", 0), ("train", 1), ("train", 2)]
    # The frozen layer stayed put; samples were counted off the dataset (4 batches of 8).
    assert result.metrics["finetune/frozen_weight_change_max"] == 0.0
    assert result.metrics["pretrain/samples_per_second"] > 0
    assert "test/accuracy" in result.metrics and result.metrics["reload/finetuned/max_abs_diff"] == 0


@pytest.mark.parametrize("overrides,key,says", [
    (["model._target_=nosuchmodule.build"], "model._target_", "importing it failed"),
    (["model._target_={name}.NOT_CALLABLE"], "model._target_", "a callable (it is a int)"),
    (["+model.widht=3"], "model._target_", "accepts the keyword arguments"),
    (["model._target_={name}.not_a_model", "~model.width"], "model._target_",
     "returns a keras.Model"),
    (["data._target_={name}.not_data", "~data.batch"], "data._target_", "a mapping with 'pretrain'"),
    (["trainer.callbacks=[{{_target_: {name}.NotACallback}}]"], "trainer.callbacks[0]._target_",
     "returns a keras.callbacks.Callback"),
    (["trainer.optimizer={{_target_: keras.optimizers.NoSuch}}"],
     "trainer.optimizer._target_", "importing it failed"),
    (["trainer.loss={{_target_: keras.losses.SparseCategoricalCrossentropy, nope: 1}}"],
     "trainer.loss._target_", "accepts the keyword arguments"),
])
def test_a_bad_target_names_its_key_and_opens_no_run(tmp_path, project, overrides, key, says):
    name, configs = project
    cfg = compose(tmp_path, configs, ["model=functional", "data=datasets", "finetune=none",
                                      *(o.format(name=name) for o in overrides)])
    # The store exists before the run (compose), so reading it afterwards races with nothing.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError) as error:
        tfharness.run(cfg)
    assert error.value.key == key
    assert says in str(error.value) and "\n" not in str(error.value)
    assert not any(client.search_runs([e.experiment_id]) for e in client.search_experiments())
    assert not (tmp_path / "out" / "models").exists()


def test_early_stopping_records_its_epoch_and_a_resume_does_not_train_past_it(
        tmp_path, project):
    name, configs = project
    flag = tmp_path / "interrupt-once"
    flag.touch()
    overrides = [
        "model=functional", "data=datasets", "trainer.epochs=6", "finetune=continue",
        "finetune.epochs=2", "finetune.callbacks=[]",
        # Stops after the second epoch (no epoch improves the loss by 100); then Ctrl-C at the
        # end of that fit, before the pretrained model is saved.
        "trainer.callbacks=[{_target_: keras.callbacks.EarlyStopping, monitor: loss, "
        f"min_delta: 100, patience: 1, restore_best_weights: true}}, "
        f"{{_target_: {name}.InterruptOnce, flag: '{flag}'}}]"]
    with pytest.raises(KeyboardInterrupt):
        tfharness.run(compose(tmp_path, configs, overrides))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert only_run(client).info.status == "KILLED"
    result = tfharness.run(compose(tmp_path, configs, [*overrides, "resume=true"]))
    run = only_run(client)
    assert run.info.status == "FINISHED" and run.data.tags["tfharness.resumes"] == "1"
    # Two epochs, each logged once; the stop is recorded; the resumed run trained no more.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pretrain/loss")] == [0, 1]
    assert run.data.metrics["pretrain/stopped_epoch"] == 2
    assert result.metrics["pretrain/stopped_epoch"] == 2
    assert [m.step for m in client.get_metric_history(run.info.run_id, "finetune/loss")] == [0, 1]


def example_command(*args, cwd=EXAMPLE, tmp, fresh: bool = False):
    """The example project's command line; ``fresh``: in a new interpreter (as for a bad
    ``_target_``, reported before TensorFlow has imported), not a prewarmed one."""
    launch = subprocess.run if fresh else prewarmed.run
    if not fresh:  # fresh: a bad command, checked for leaving no store (or no run) behind
        empty_store(tmp / "mlflow.db")
    return launch(
        [str(BIN / "tfharness"), *args, "pretrain_cache=off",
         f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
         f"checkpoint_root={tmp / 'checkpoints'}", f"hydra.run.dir={tmp / 'out'}",
         f"hydra.sweep.dir={tmp / 'multirun'}", "print_report=false"],
        cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TFHARNESS_NO_SETUP": "1", "PYTHONDONTWRITEBYTECODE": "1"})


def test_the_example_project_runs_through_the_command(tmp_path):
    listed = prewarmed.run([str(BIN / "tfharness"), "--config-dir", "configs", "--help"],
                            cwd=EXAMPLE, capture_output=True, text=True, timeout=60)
    assert "model: cnn, keras_application, mlp, tower" in listed.stdout
    assert "data: blobs, csv, digits, image_folder, npz, synthetic, tfds" in listed.stdout
    done = example_command("--config-dir", "configs", "experiment=own", "trainer.epochs=3",
                           "finetune.epochs=2", "data.num_samples=120", tmp=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = only_run(client)
    params = run.data.params
    assert run.info.status == "FINISHED"
    assert params["model._target_"] == "myproject.models.tower"
    assert params["data._target_"] == "myproject.data.blobs"
    assert params["trainer.callbacks.0._target_"] == "keras.callbacks.EarlyStopping"
    assert params["trainer.callbacks.1._target_"] == "myproject.callbacks.StopAtAccuracy"
    assert params["trainer.optimizer._target_"] == "keras.optimizers.AdamW"
    logged = {m.name: m for m in client.search_logged_models([run.info.experiment_id])}
    assert set(logged) == {"pretrained", "finetuned"}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model(logged["finetuned"].model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    assert np.asarray(model.predict(np.zeros((2, 8), "float32"))).shape == (2, 2)


def test_a_bad_callback_from_the_command_is_one_line_and_exit_1(tmp_path):
    done = example_command("--config-dir", "configs", "experiment=own",
                           "trainer.callbacks=[{_target_: myproject.callbacks.Nope}]",
                           tmp=tmp_path, fresh=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert ("tfharness: Invalid value for 'trainer.callbacks[0]._target_': got "
            "'myproject.callbacks.Nope'") in done.stderr
    assert not (tmp_path / "mlflow.db").exists() or not mlflow.MlflowClient(
        f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["0"])


def test_sweeps_over_a_user_models_own_arguments(tmp_path):
    grid = example_command("--config-dir", "configs", "-m", "experiment=own", "trainer.epochs=1",
                           "finetune.epochs=1", "data.num_samples=60", "model.width=4,8",
                           tmp=tmp_path)
    assert grid.returncode == 0, grid.stderr[-3000:]
    optuna = example_command("--config-dir", "configs", "-m", "experiment=own",
                             "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                             "trainer.epochs=1", "finetune.epochs=1", "data.num_samples=60",
                             "model.width=4,8", "tracking.experiment=optuna", tmp=tmp_path)
    assert optuna.returncode == 0, optuna.stderr[-3000:]
    assert "model.units left the search" in optuna.stdout + optuna.stderr
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for experiment, trials in (("tfharness", 2), ("optuna", 2)):
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id])
        children = [r for r in runs if r.data.tags.get("tfharness.sweep") != "parent"]
        assert len(children) == trials
        assert all(r.info.status == "FINISHED" for r in children)
        assert {r.data.params["model.width"] for r in children} <= {"4", "8"}
        parent = next(r for r in runs if r.data.tags.get("tfharness.sweep") == "parent")
        assert "sweep.space.model.width" in parent.data.params
    grid_widths = {r.data.params["model.width"] for r in client.search_runs(
        [client.get_experiment_by_name("tfharness").experiment_id])
        if r.data.tags.get("tfharness.sweep") != "parent"}
    assert grid_widths == {"4", "8"}


# ------------------------------------------------------------------ the interface, piece by piece
def arrays_factory(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return {"pretrain": (rng.standard_normal((n, 3)).astype("float32"),
                         (np.arange(n) % 4).astype("int64"))}


def takes_everything(**kwargs):
    return kwargs


def test_arrays_are_split_by_the_harness_and_one_phase_serves_both():
    from tfharness.data import load_data

    bundle = load_data({"_target_": f"{__name__}.arrays_factory", "n": 40, "seed": 3,
                        "val_fraction": 0.25, "test_fraction": 0.25})
    pre, ft = bundle.pretrain, bundle.finetune
    assert [len(p[0]) for p in (pre.train, pre.val, pre.test)] == [20, 10, 10]
    assert pre.num_classes == 4 and pre.train[1].dtype == np.int32
    # The fine-tune phase is the same arrays, shuffled by seed + 1.
    assert sorted(ft.train[0][:, 0].tolist() + ft.val[0][:, 0].tolist()
                  + ft.test[0][:, 0].tolist()) == sorted(
        pre.train[0][:, 0].tolist() + pre.val[0][:, 0].tolist() + pre.test[0][:, 0].tolist())
    assert not np.array_equal(ft.test[0], pre.test[0])
    assert bundle.name == f"{__name__}.arrays_factory"


def test_harness_keys_reach_a_factory_only_when_it_takes_them():
    from tfharness.config import targets

    option = {"_target_": f"{__name__}.arrays_factory", "n": 10, "seed": 1, "val_fraction": 0.2}
    kwargs = targets.arguments("data", option, arrays_factory, {},
                               optional=("val_fraction", "seed"))
    assert kwargs == {"n": 10, "seed": 1}
    assert targets.arguments("data", {**option, "_target_": "x"}, takes_everything, {},
                             optional=("val_fraction",)) == {"n": 10, "seed": 1,
                                                              "val_fraction": 0.2}


@pytest.mark.parametrize("produced,says", [
    ({"pretrain": {"train": None, "validation": None}}, "'train' and optionally 'val'"),
    ({"pretrain": (np.zeros((4, 2)), np.zeros(3, "int32"))}, "one label per sample"),
    ({"pretrain": (np.zeros((4, 2)), np.array([0.5, 1, 2, 3]))}, "integer class indices"),
    ({"pretrain": {"train": (np.zeros((4, 2)), np.arange(4)), "class_names": ["a"]}},
     "one name per class (4)"),
    ({"train": (np.zeros((4, 2)), np.arange(4))}, "a mapping with 'pretrain'"),
])
def test_what_a_factory_returns_is_checked_naming_data_target(produced, says):
    from tfharness.data.load import bundle_of
    from tfharness.errors import DataError

    with pytest.raises(DataError) as error:
        bundle_of(produced, {"_target_": "user.factory"})
    assert error.value.key == "data._target_" and says in str(error.value)


def test_lists_of_target_mappings_become_params_with_dotted_keys(make_cfg):
    from tfharness.config import flatten, to_typed

    cfg = to_typed(make_cfg([
        "trainer.callbacks=[{_target_: keras.callbacks.EarlyStopping, patience: 3}]",
        "trainer.optimizer={_target_: keras.optimizers.AdamW, weight_decay: 0.01}"]))
    params = flatten(cfg)
    assert params["trainer.callbacks.0._target_"] == "keras.callbacks.EarlyStopping"
    assert params["trainer.callbacks.0.patience"] == "3"
    assert params["trainer.optimizer.weight_decay"] == "0.01"
    assert params["model._target_"] == "tfharness.models.builders.mlp"
    assert params["model.units"] == "[64]"  # a list of scalars stays one param


@pytest.mark.parametrize("override,key", [
    ("trainer.callbacks=[{patience: 3}]", "trainer.callbacks[0]._target_"),
    ("trainer.optimizer=adamx", "trainer.optimizer"),
    ("trainer.optimizer={weight_decay: 0.1}", "trainer.optimizer._target_"),
    ("trainer.metrics=[accuracy,{name: x}]", "trainer.metrics[1]._target_"),
    ("data.val_fraction=2", "data.val_fraction"),
])
def test_target_forms_are_checked_before_tensorflow(make_cfg, override, key):
    from tfharness.config import to_typed, validate

    with pytest.raises(ConfigError) as error:
        validate(to_typed(make_cfg([override])))
    assert error.value.key == key
