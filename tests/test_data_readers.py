"""The data readers on their own: image folders, CSV tables, TensorFlow Datasets, digests.

End-to-end runs on these sources (MLflow datasets, class names, served models) are in
test_data_runs.py.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from conftest import make_image_folder, write_csv
from tfharness.data import csv_table, image_folder
from tfharness.data import records
from tfharness.config import AugmentConfig, CsvDataConfig, ImageFolderDataConfig
from tfharness.errors import DataError


def folder_cfg(root, **overrides) -> ImageFolderDataConfig:
    return ImageFolderDataConfig(**{"pretrain_dir": str(root), "image_size": [8, 8],
                                    "batch_size": 4, **overrides})


# ---------------------------------------------------------------------------- image folders
def test_untidy_folder_skips_and_counts_files_that_are_not_images(tmp_path, caplog):
    root = make_image_folder(tmp_path / "pets", ["cat", "dog"], per_class=5, untidy=True)
    (root / "LICENSE").write_text("loose file beside the class folders")
    with caplog.at_level(logging.WARNING, logger="tfharness"):
        phases = image_folder.index_data(folder_cfg(root))
    pretrain = phases["pretrain"]
    assert pretrain.class_names == ["cat", "dog"]
    assert sum(len(paths) for paths, _ in pretrain.splits.values()) == 10
    # notes.txt and fake.jpg in each class folder, and LICENSE.
    assert pretrain.skipped == 5
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "data.pretrain_dir: skipped 5 file(s)" in warning[0]
    assert "fake.jpg" in warning[0]


def test_mixed_sizes_and_grayscale_stream_as_one_shape(tmp_path):
    import tensorflow as tf

    root = make_image_folder(tmp_path / "pets", ["cat", "dog"], per_class=6, untidy=True)
    for mode, channels in (("rgb", 3), ("grayscale", 1)):
        cfg = folder_cfg(root, color_mode=mode, val_fraction=0.0, test_fraction=0.0)
        phases = image_folder.index_data(cfg)
        train = image_folder.datasets(cfg, phases, seed=0)["pretrain"]["train"]
        assert train.element_spec[0].shape.as_list() == [None, 8, 8, channels]
        seen = 0
        for x, y in train:
            assert x.dtype == tf.float32 and float(tf.reduce_max(x)) <= 255.0
            seen += int(tf.shape(y)[0])
        assert seen == 12


def test_augmentation_applies_to_training_batches_only(tmp_path):
    root = make_image_folder(tmp_path / "pets", ["cat", "dog"], per_class=4)
    cfg = folder_cfg(root, val_fraction=0.0, test_fraction=0.25,
                     augment=AugmentConfig(flip="horizontal_and_vertical", rotation=0.2))
    phases = image_folder.index_data(cfg)
    paths, labels = phases["pretrain"].splits["test"]
    plain = image_folder.pipeline(paths, labels, cfg, training=False, seed=0, cache_name="t")
    trained = image_folder.pipeline(paths, labels, cfg, training=True, seed=0, cache_name="t")
    first = np.concatenate([x.numpy() for x, _ in plain])
    again = np.concatenate([x.numpy() for x, _ in plain])
    np.testing.assert_array_equal(first, again)  # evaluation batches: as read, every time
    # The training pipeline shuffles too: compare sorted by label and pixel sum is not enough
    # to see augmentation, so compare the multiset of images instead.
    augmented = np.concatenate([x.numpy() for x, _ in trained])
    assert augmented.shape == first.shape
    assert not any(np.allclose(a, b) for a in augmented for b in first)


def test_cache_to_file_writes_beside_the_prefix(tmp_path):
    root = make_image_folder(tmp_path / "pets", ["cat", "dog"], per_class=3)
    cfg = folder_cfg(root, val_fraction=0.0, test_fraction=0.0, cache=str(tmp_path / "c"))
    phases = image_folder.index_data(cfg)
    train = image_folder.datasets(cfg, phases, seed=0)["pretrain"]["train"]
    epoch_1 = sorted(float(x.numpy().sum()) for x, _ in train.unbatch())
    epoch_2 = sorted(float(x.numpy().sum()) for x, _ in train.unbatch())
    assert epoch_1 == pytest.approx(epoch_2)
    assert list(tmp_path.glob("c-pretrain-train-*.index"))


@pytest.mark.parametrize("case", ["missing", "not_a_folder", "empty", "class_without_images",
                                  "val_classes_differ"])
def test_bad_folders_name_the_key(tmp_path, case):
    root = make_image_folder(tmp_path / "pets", ["cat", "dog"], per_class=3)
    cfg = folder_cfg(root)
    if case == "missing":
        cfg.pretrain_dir, key = str(tmp_path / "nowhere"), "data.pretrain_dir"
    elif case == "not_a_folder":
        cfg.pretrain_dir, key = str(root / "cat" / "0.jpg"), "data.pretrain_dir"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        cfg.pretrain_dir, key = str(tmp_path / "empty"), "data.pretrain_dir"
    elif case == "class_without_images":
        (root / "bird").mkdir()
        (root / "bird" / "readme.txt").write_text("soon")
        key = "data.pretrain_dir"
    else:
        val = make_image_folder(tmp_path / "val", ["cat", "cow"], per_class=2)
        cfg.pretrain_val_dir, key = str(val), "data.pretrain_val_dir"
    with pytest.raises(DataError) as caught:
        image_folder.index_data(cfg)
    assert caught.value.key == key
    message = str(caught.value)
    assert "\n" not in message
    if case == "class_without_images":
        assert str(root / "bird") in message
    if case == "val_classes_differ":
        assert "cat, dog" in message and "cat, cow" in message


def test_held_out_folders_replace_the_fractions(tmp_path):
    root = make_image_folder(tmp_path / "train", ["cat", "dog"], per_class=5)
    test = make_image_folder(tmp_path / "test", ["cat", "dog"], per_class=2, seed=1)
    cfg = folder_cfg(root, pretrain_test_dir=str(test), val_fraction=0.2, test_fraction=0.3)
    files = image_folder.index_data(cfg)["pretrain"]
    assert len(files.splits["test"][0]) == 4
    assert all(p.startswith(str(test)) for p in files.splits["test"][0])
    assert len(files.splits["val"][0]) == 2 and len(files.splits["train"][0]) == 8


def test_folder_digest_follows_content_not_location(tmp_path):
    root = make_image_folder(tmp_path / "a", ["cat", "dog"], per_class=3)
    cfg = folder_cfg(root)
    first = image_folder.describe(cfg, image_folder.index_data(cfg))
    copy = tmp_path / "b"
    shutil.copytree(root, copy)
    moved = image_folder.describe(folder_cfg(copy), image_folder.index_data(folder_cfg(copy)))
    assert moved.digest == first.digest
    assert moved.splits["pretrain/train"].digest == first.splits["pretrain/train"].digest
    (copy / "dog" / "0.jpg").write_bytes((root / "cat" / "0.jpg").read_bytes())
    changed = image_folder.describe(folder_cfg(copy), image_folder.index_data(folder_cfg(copy)))
    assert changed.digest != first.digest
    resized = image_folder.describe(folder_cfg(root, image_size=[16, 16]),
                                    image_folder.index_data(folder_cfg(root)))
    assert resized.digest != first.digest


def test_records_carry_contexts_schema_and_class_names(tmp_path):
    root = make_image_folder(tmp_path / "pets", ["cat", "dog"], per_class=4)
    cfg = folder_cfg(root, color_mode="grayscale")
    description = image_folder.describe(cfg, image_folder.index_data(cfg))
    with_finetune = description.records(finetune=True)
    assert [r.context for r in with_finetune] == ["pretrain", "finetune", "test"]
    assert [r.name for r in with_finetune] == ["pets/pretrain/train", "pets/finetune/train",
                                               "pets/finetune/test"]
    assert [r.context for r in description.records(finetune=False)] == ["pretrain", "test"]
    schema = json.loads(with_finetune[0].schema)["mlflow_tensorspec"]
    assert json.loads(schema["features"])[0]["tensor-spec"] == {"dtype": "float32",
                                                                "shape": [-1, 8, 8, 1]}
    assert json.loads(with_finetune[0].source) == {"uri": str(root.resolve())}
    assert description.tags()["tfharness.class_names.pretrain"] == '["cat", "dog"]'


# ------------------------------------------------------------------------------------- CSV
def test_csv_string_labels_become_sorted_class_indices(tmp_path):
    path = write_csv(tmp_path / "iris.csv", rows=30)
    data = csv_table.load(CsvDataConfig(path=str(path), label_column="species"))
    assert data.columns == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    table = data.tables["pretrain"]
    assert table.class_names == ["setosa", "versicolor", "virginica"]
    assert table.y[:3].tolist() == [0, 1, 2] and table.x.dtype == np.float32
    split = data.splits["pretrain"]
    assert sum(len(getattr(split, s)[0]) for s in ("train", "val", "test")) == 30
    schema = json.loads(data.description.splits["pretrain/train"].schema)["mlflow_colspec"]
    assert [c["name"] for c in schema][-1] == "species" and schema[-1]["type"] == "string"


def test_csv_integer_labels_keep_their_values_as_names(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,label\n1,2,7\n3,4,3\n5,6,7\n7,8,3\n1,1,7\n2,2,3\n3,3,7\n4,4,3\n")
    data = csv_table.load(CsvDataConfig(path=str(path)))
    assert data.tables["pretrain"].class_names == ["3", "7"]
    assert data.tables["pretrain"].y.tolist() == [1, 0, 1, 0, 1, 0, 1, 0]


def test_csv_normalization_layer_holds_training_statistics(tmp_path):
    path = write_csv(tmp_path / "iris.csv", rows=30)
    data = csv_table.load(CsvDataConfig(path=str(path), label_column="species"))
    train_x = data.splits["pretrain"].train[0]
    layer = csv_table.normalization(train_x)
    out = np.asarray(layer(train_x))
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=0), 1.0, atol=1e-3)


@pytest.mark.parametrize("case,key,words", [
    ("no_label", "data.label_column", ["'kind'", "sepal_length"]),
    ("stray_word", "data.feature_columns", ["'petal_width'", "'n/a?'", "data row 4"]),
    ("missing_value", "data.path", ["'sepal_width'", "data row 3"]),
    ("missing_label", "data.path", ["'species'", "data row 2"]),
    ("listed_text_column", "data.feature_columns", ["'note'", "'row0'", "data row 1"]),
    ("unknown_column", "data.feature_columns[1]", ["'height'"]),
    ("finetune_lacks_column", "data.finetune_path", ["petal_width"]),
    ("empty_file", "data.path", ["header"]),
    ("no_file", "data.path", ["existing CSV"]),
])
def test_bad_tables_name_the_key_file_row_and_column(tmp_path, case, key, words):
    path = write_csv(tmp_path / "iris.csv", rows=10)
    lines = path.read_text().splitlines()
    cfg = CsvDataConfig(path=str(path), label_column="species")
    if case == "no_label":
        cfg.label_column = "kind"
    elif case == "stray_word":
        lines[4] = ",".join(lines[4].split(",")[:3] + ["n/a?"] + lines[4].split(",")[4:])
    elif case == "missing_value":
        lines[3] = ",".join(lines[3].split(",")[:1] + [""] + lines[3].split(",")[2:])
    elif case == "missing_label":
        lines[2] = ",".join(lines[2].split(",")[:-1] + [""])
    elif case == "listed_text_column":
        cfg.feature_columns = ["sepal_length", "note"]
    elif case == "unknown_column":
        cfg.feature_columns = ["sepal_length", "height"]
    elif case == "finetune_lacks_column":
        other = tmp_path / "other.csv"
        other.write_text("sepal_length,sepal_width,petal_length,species\n1,2,3,a\n")
        cfg.finetune_path = str(other)
    elif case == "empty_file":
        lines = []
    elif case == "no_file":
        cfg.path = str(tmp_path / "absent.csv")
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataError) as caught:
        csv_table.load(cfg)
    assert caught.value.key == key
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message


# --------------------------------------------------------------------------------- digests
def test_digests_are_stable_and_tell_data_apart(tmp_path):
    a = write_csv(tmp_path / "a.csv", rows=10, seed=0)
    b = write_csv(tmp_path / "b.csv", rows=10, seed=0)
    c = write_csv(tmp_path / "c.csv", rows=10, seed=1)
    assert records.file_digest(a) == records.file_digest(b) != records.file_digest(c)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert records.arrays_digest(x) == records.arrays_digest(x.copy())
    assert records.arrays_digest(x) != records.arrays_digest(x.reshape(4, 3))
    assert records.sha256_of("ab", "c") != records.sha256_of("a", "bc")


def test_large_folders_are_digested_by_name_size_and_time(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "pets", ["cat"], per_class=2)
    files = sorted(root.rglob("*.*"))
    by_content = records.files_digest(files, root)
    monkeypatch.setattr(records, "CONTENT_HASH_LIMIT", 0)
    by_stat = records.files_digest(files, root)
    assert by_stat != by_content and by_stat == records.files_digest(files, root)
    import os

    os.utime(files[0], ns=(1, 1))
    assert records.files_digest(files, root) != by_stat


def test_long_class_lists_are_cut_in_tags_but_kept_whole_in_the_artifact(tmp_path):
    names = [f"class_{i:04d}" for i in range(1000)]
    tag = records.names_text(names)
    assert len(tag) <= records.TAG_VALUE_LIMIT and tag.endswith('more"]')
    path = records.write_class_names(tmp_path / "m" / "class_names.json", names)
    assert json.loads(path.read_text())["class_names"] == names


# -------------------------------------------------------------------- TensorFlow Datasets
def test_tfds_phases_take_their_classes_relabelled():
    tfds = pytest.importorskip("tensorflow_datasets")
    from tfharness.data import tfds_source
    from tfharness.config import TfdsDataConfig

    cfg = TfdsDataConfig(dataset="mnist", pretrain_classes=[0, 1, 2, 3, 4],
                         finetune_classes=[5, 6, 7, 8, 9], batch_size=8, image_size=[10, 10])
    with tfds.testing.mock_data(num_examples=40):
        data = tfds_source.load(cfg, seed=0)
        assert data.class_names == {"pretrain": ["0", "1", "2", "3", "4"],
                                    "finetune": ["5", "6", "7", "8", "9"]}
        assert data.input_shape == (10, 10, 1) and data.is_image
        labels = np.concatenate([y.numpy() for _, y in data.datasets["finetune"]["train"]])
        x, _ = next(iter(data.datasets["pretrain"]["test"]))
    assert x.shape[1:] == (10, 10, 1) and x.dtype.name == "float32"
    # Every example of the phase's classes, relabelled 0..4; the count is known up front.
    assert len(labels) == data.counts["finetune"]["train"] > 0
    assert labels.min() >= 0 and labels.max() <= 4
    assert data.counts["pretrain"]["train"] + data.counts["finetune"]["train"] == 40
    records_ = data.description.records(finetune=True)
    assert [r.context for r in records_] == ["pretrain", "finetune", "test"]
    assert records_[0].source_type == "tfds" and "mnist" in records_[0].name


@pytest.mark.parametrize("case,key", [("unknown", "data.dataset"),
                                      ("class_out_of_range", "data.pretrain_classes"),
                                      ("not_prepared", "data.data_dir")])
def test_tfds_bad_choices_name_the_key(tmp_path, case, key):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tfharness.data import tfds_source
    from tfharness.config import TfdsDataConfig

    cfg = TfdsDataConfig(dataset="mnist", batch_size=8)
    if case == "unknown":
        cfg.dataset = "no_such_dataset_here"
    elif case == "class_out_of_range":
        cfg.pretrain_classes = [3, 12]
    else:
        # Nothing prepared there, and no download: the folder is what is wrong.
        cfg.data_dir, cfg.download = str(tmp_path), False
        with pytest.raises(DataError) as caught:
            tfds_source.load(cfg, seed=0)
    if case != "not_prepared":
        with tfds.testing.mock_data(num_examples=10):
            with pytest.raises(DataError) as caught:
                tfds_source.load(cfg, seed=0)
    assert caught.value.key == key and "\n" not in str(caught.value)
