"""Real data end to end: image folders, CSV tables and TensorFlow Datasets through a whole run,
checked as a user sees it in MLflow (datasets with their contexts, class names, signatures, the
served model taking raw inputs); bad data stops the command before any run opens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import TINY_SYNTHETIC, make_image_folder, only_run, write_csv

BIN = Path(sys.executable).parent
QUICK = ["trainer.epochs=1", "finetune.epochs=1", "trainer.batch_size=8"]


def image_run(tmp_path, make_cfg, *extra):
    pets = make_image_folder(tmp_path / "pets", ["cat", "dog", "owl"], per_class=6, untidy=True)
    birds = make_image_folder(tmp_path / "birds", ["crow", "wren"], per_class=6, seed=1)
    import tfharness

    return tfharness.run(make_cfg([
        "data=image_folder", f"data.pretrain_dir={pets}", f"data.finetune_dir={birds}",
        "data.image_size=[8,8]", "model=cnn", "model.filters=[4]", "model.dense_units=8",
        "finetune.head.num_classes=2", "data.augment.flip=horizontal", *QUICK, *extra]))


def inputs_by_context(run):
    return {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}


def class_names_of(model_uri: str) -> list:
    folder = mlflow.artifacts.download_artifacts(model_uri)
    return json.loads((Path(folder) / "artifacts" / "class_names.json").read_text())["class_names"]


def test_image_folder_run_records_datasets_classes_and_serves_raw_pixels(tmp_path, make_cfg,
                                                                         client):
    result = image_run(tmp_path, make_cfg)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    datasets = inputs_by_context(run)
    assert sorted(datasets) == ["finetune", "pretrain", "test"]
    assert datasets["pretrain"].name == "pets/pretrain/train"
    assert datasets["finetune"].name == "birds/finetune/train"
    assert datasets["test"].name == "birds/finetune/test"
    assert json.loads(datasets["pretrain"].source)["uri"] == str((tmp_path / "pets").resolve())
    features = json.loads(json.loads(datasets["pretrain"].schema)["mlflow_tensorspec"]["features"])
    assert features[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 8, 8, 3]}
    profile = json.loads(datasets["pretrain"].profile)
    assert profile["num_classes"] == 3 and profile["skipped_files"] == 6
    assert len({d.digest for d in datasets.values()}) == 3
    tags = run.data.tags
    assert json.loads(tags["tfharness.class_names.pretrain"]) == ["cat", "dog", "owl"]
    assert json.loads(tags["tfharness.class_names.finetune"]) == ["crow", "wren"]
    assert len(tags["tfharness.data_digest"]) == 64
    # Beside each logged model, the names of its outputs.
    assert class_names_of(result.model_uris["pretrained"]) == ["cat", "dog", "owl"]
    assert class_names_of(result.model_uris["finetuned"]) == ["crow", "wren"]
    # The signature is the raw pixel tensor, and the served model takes raw pixels.
    info = mlflow.models.get_model_info(result.model_uris["finetuned"])
    spec = info.signature.inputs.to_dict()[0]["tensor-spec"]
    assert list(spec["shape"]) == [-1, 8, 8, 3] and spec["dtype"] == "float32"
    served = mlflow.pyfunc.load_model(result.model_uris["finetuned"])
    pixels = np.full((2, 8, 8, 3), 200.0, np.float32)
    probabilities = np.asarray(served.predict(pixels))
    assert probabilities.shape == (2, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # The report names the classes each head predicts.
    report = result.artifacts["report"].read_text()
    assert "crow, wren" in report


def test_csv_run_normalizes_inside_the_model_and_names_string_classes(tmp_path, make_cfg,
                                                                      client):
    import tfharness

    train = write_csv(tmp_path / "iris.csv", rows=60)
    tune = write_csv(tmp_path / "more.csv", rows=40, seed=3, labels=("small", "large"))
    result = tfharness.run(make_cfg(["data=csv", f"data.path={train}",
                                     f"data.finetune_path={tune}", "data.label_column=species",
                                     "model.units=[8]", "finetune.head.num_classes=2", *QUICK]))
    run = client.get_run(result.run_id)
    datasets = inputs_by_context(run)
    assert datasets["pretrain"].name == "iris.csv/pretrain/train"
    columns = json.loads(datasets["pretrain"].schema)["mlflow_colspec"]
    assert [c["name"] for c in columns] == ["sepal_length", "sepal_width", "petal_length",
                                            "petal_width", "species"]
    assert json.loads(run.data.tags["tfharness.class_names.pretrain"]) == [
        "setosa", "versicolor", "virginica"]
    assert class_names_of(result.model_uris["finetuned"]) == ["large", "small"]
    # The Normalization layer travels inside the model with the training split's statistics.
    from tfharness.artifacts import serialization
    from tfharness.config import CsvDataConfig
    from tfharness.data import csv_table

    model = serialization.load_model(result.artifacts["pretrained"])
    assert model.layers[0].name == "normalize"
    expected = csv_table.load(CsvDataConfig(path=str(train), label_column="species"))
    train_x = expected.splits["pretrain"].train[0]
    np.testing.assert_allclose(np.asarray(model.get_layer("normalize").mean).ravel(),
                               train_x.mean(axis=0), rtol=1e-5)
    raw = np.loadtxt(train, delimiter=",", skiprows=1, usecols=range(4), dtype=np.float32)
    info = mlflow.models.get_model_info(result.model_uris["pretrained"])
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 4]
    served = mlflow.pyfunc.load_model(result.model_uris["pretrained"])
    assert np.asarray(served.predict(raw[:3])).shape == (3, 3)


def test_tfds_run_under_mock_data(tmp_path, make_cfg, client):
    tfds = pytest.importorskip("tensorflow_datasets")
    import tfharness

    with tfds.testing.mock_data(num_examples=40):
        result = tfharness.run(make_cfg([
            "data=tfds", "data.dataset=mnist", "data.pretrain_classes=[0,1,2,3,4]",
            "data.finetune_classes=[5,6,7,8,9]", "data.image_size=[8,8]", "model=cnn",
            "model.filters=[4]", "model.dense_units=8", *QUICK]))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    datasets = inputs_by_context(run)
    assert datasets["pretrain"].source_type == "tfds"
    assert json.loads(run.data.tags["tfharness.class_names.finetune"]) == ["5", "6", "7", "8",
                                                                           "9"]


@pytest.mark.parametrize("option", [["data=digits", "data.finetune_fraction=0.1"],
                                    TINY_SYNTHETIC])
def test_every_source_records_its_datasets(tmp_path, make_cfg, client, option):
    import tfharness

    result = tfharness.run(make_cfg([*option, "model.units=[4]", *QUICK]))
    datasets = inputs_by_context(client.get_run(result.run_id))
    assert sorted(datasets) == ["finetune", "pretrain", "test"]
    assert all(len(d.digest) == 16 for d in datasets.values())


def test_npz_runs_on_different_data_never_look_alike(tmp_path, make_cfg, client):
    import tfharness

    digests = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        path = tmp_path / f"d{seed}.npz"
        np.savez(path, x=rng.standard_normal((40, 6)).astype("float32"),
                 y=rng.integers(0, 3, 40))
        result = tfharness.run(make_cfg(["data=npz", f"data.path={path}", "model.units=[4]",
                                         "finetune=none", "trainer.epochs=1"], out=f"o{seed}"))
        datasets = inputs_by_context(client.get_run(result.run_id))
        assert sorted(datasets) == ["pretrain", "test"]
        assert datasets["pretrain"].source_type == "local"
        digests.append(datasets["pretrain"].digest)
    assert digests[0] != digests[1]


def tfharness_cli(*args, cwd):
    return subprocess.run([str(BIN / "tfharness"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TFHARNESS_NO_SETUP": "1"})


@pytest.mark.parametrize("case,expected", [
    ("missing_folder", "Invalid value for 'data.pretrain_dir': got '{tmp}/nowhere'"),
    ("empty_folder", "Invalid value for 'data.pretrain_dir': got '{tmp}/empty'"),
    ("class_without_images", "Invalid value for 'data.pretrain_dir': got '{tmp}/pets/bird'"),
    ("no_label_column", "Invalid value for 'data.label_column': got 'kind'"),
    ("non_numeric_feature", "'petal_width' holds 'n/a?' in data row 4 of {tmp}/iris.csv"),
    ("missing_value", "column 'sepal_width' is empty in data row 3"),
])
def test_bad_data_is_one_line_exit_1_and_no_run(tmp_path, case, expected):
    pets = make_image_folder(tmp_path / "pets", ["cat", "dog"], per_class=3)
    iris = write_csv(tmp_path / "iris.csv", rows=10)
    lines = iris.read_text().splitlines()
    args = ["data=image_folder", f"data.pretrain_dir={pets}"]
    if case == "missing_folder":
        args[1] = f"data.pretrain_dir={tmp_path / 'nowhere'}"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args[1] = f"data.pretrain_dir={tmp_path / 'empty'}"
    elif case == "class_without_images":
        (pets / "bird").mkdir()
        (pets / "bird" / "x.txt").write_text("no image")
    else:
        args = ["data=csv", f"data.path={iris}", "data.label_column=species"]
        if case == "no_label_column":
            args[2] = "data.label_column=kind"
        elif case == "non_numeric_feature":
            cells = lines[4].split(",")
            lines[4] = ",".join(cells[:3] + ["n/a?"] + cells[4:])
        else:
            cells = lines[3].split(",")
            lines[3] = ",".join(cells[:1] + [""] + cells[2:])
        iris.write_text("\n".join(lines) + "\n")
    result = tfharness_cli(*args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert expected.format(tmp=tmp_path) in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "Invalid value" in line]
    assert len(errors) == 1
    db = tmp_path / "mlflow.db"
    if db.exists():
        client = mlflow.MlflowClient(f"sqlite:///{db}")
        experiment = client.get_experiment_by_name("tfharness")
        assert experiment is None or client.search_runs([experiment.experiment_id]) == []
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.pb"))


@pytest.mark.parametrize("backend", ["harness", "mlflow"])
def test_both_trackers_log_dataset_inputs_with_their_context(tmp_path, tracking_uri, client,
                                                             backend):
    from tfharness.config import TrackingConfig
    from tfharness.data import records
    from tfharness.tracking import make_tracker

    tracker = make_tracker(TrackingConfig(uri=tracking_uri, experiment="inputs",
                                          async_backend=backend))
    tracker.start("inputs", {}, {})
    record = records.split_record(label="table.csv/pretrain/train", base_digest="abc",
                                  selection=[1], source=records.local_source(tmp_path / "t.csv"),
                                  schema=records.column_schema(["a"], "label", "string"),
                                  rows=10, class_names=["x", "y"])
    description = records.DataDescription(splits={"pretrain/train": record,
                                                  "pretrain/test": record})
    tracker.log_inputs([r.to_dict() for r in description.records(finetune=False)])
    tracker.finish()
    inputs = client.get_run(tracker.run_id).inputs.dataset_inputs
    # One dataset, logged under one context only: MLflow keeps a dataset once per run.
    assert [(i.dataset.name, i.tags[0].key, i.tags[0].value) for i in inputs] == [
        ("table.csv/pretrain/train", "mlflow.data.context", "pretrain")]
    assert json.loads(inputs[0].dataset.profile) == {"num_rows": 10, "num_classes": 2}


def test_a_missing_image_folder_is_reported_while_tensorflow_still_imports(tmp_path):
    """image_folder indexes its files before its first use of TensorFlow
    (``@waits_for_tensorflow``), and a run that fails before it used Keras does not wait for
    Keras to put a dtype policy back: with the command line's ending (it leaves through
    os._exit then), the error comes while TensorFlow still imports on its thread, and no store
    is created."""
    script = (
        "import importlib.machinery, sys, threading, time\n"
        "class SlowTensorFlow:  # TensorFlow's import takes 60 s more, so the race is decided\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name != 'tensorflow' or threading.current_thread().name == 'MainThread':\n"
        "            return None\n"
        "        # The wait is in the module's execution, holding the module's own lock as a\n"
        "        # real import does; a finder that waits would hold every thread's imports.\n"
        "        spec = importlib.machinery.PathFinder.find_spec(name, path)\n"
        "        execute = spec.loader.exec_module\n"
        "        def slowly(module):\n"
        "            time.sleep(60)\n"
        "            execute(module)\n"
        "        spec.loader.exec_module = slowly\n"
        "        return spec\n"
        "sys.meta_path.insert(0, SlowTensorFlow())\n"
        "start = threading.Thread.start\n"
        "def start_and_let_it_begin(thread):  # the import has begun when the run goes on\n"
        "    start(thread)\n"
        "    while thread.name == 'tfharness-import-tensorflow' and 'keras' not in sys.modules:\n"
        "        time.sleep(0.01)\n"
        "threading.Thread.start = start_and_let_it_begin\n"
        "import tfharness\n"
        "from tfharness.errors import DataError\n"
        "from tfharness.pipeline import ending\n"
        "ending.LEAVE_IMPORTS_RUNNING = True  # as the command line does\n"
        f"cfg = tfharness.compose(['data=image_folder', 'data.pretrain_dir={tmp_path / 'nowhere'}',"
        f" 'tracking.uri=sqlite:///{tmp_path / 'm.db'}', 'output_dir={tmp_path / 'out'}'])\n"
        "try:\n"
        "    tfharness.run(cfg)\n"
        "except DataError as error:\n"
        "    alive = [t.name for t in threading.enumerate() if t.is_alive()]\n"
        "    print('importing' if 'tfharness-import-tensorflow' in alive else 'imported')\n"
        "    print(error)\n"
        "import os; sys.stdout.flush(); os._exit(0)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    first, message = result.stdout.splitlines()[:2]
    assert first == "importing", result.stdout
    assert "data.pretrain_dir" in message and "an existing folder" in message
    assert not (tmp_path / "m.db").exists()
