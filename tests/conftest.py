"""Shared fixtures: every test writes under tmp_path and tracks into a SQLite store there."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests' `mlflow server`s and `mlflow ui`s (children inherit this) run no job consumers: each
# server would otherwise start MLflow's huey job processes, which tfharness never uses and which
# cost the suite CPU time (benchmarks/results.md, "Test suite").
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
# One TensorFlow thread per pool in every test process (children inherit it): the suite keeps
# more processes busy than the machine has cores, where TensorFlow's own pools, each sized to
# the cores, only add threads that wait for a core (benchmarks/results.md, "Test suite").
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import tfharness  # noqa: E402
from tfharness import heap  # noqa: E402
from tfharness.pipeline.prepare import KerasWithoutScikitLearn  # noqa: E402


def pytest_collection(session):
    """Each process that collects tests imports Keras and MLflow as a tfharness process does
    (tfharness.heap: no full collection while importing, then frozen; Keras without
    scikit-learn), before the test modules import them: the xdist workers' collection is
    cheaper, and the frozen modules stay out of every later collection (figures:
    benchmarks/results.md, "Test suite"). pytest-xdist's controller, which runs no test, does
    not collect (its own ``pytest_collection`` answers first), so it starts the workers without
    importing them."""
    with KerasWithoutScikitLearn():
        heap.import_frozen("keras")
    heap.import_frozen("mlflow", "mlflow.models", "mlflow.pyfunc", "hydra")
    atexit.register(heap.freeze_at_exit)


# Small enough to keep the suite quick on 2 cores, big enough for every split to be non-empty.
TINY_SYNTHETIC = ["data=synthetic", "data.shape=[12]", "data.num_samples=60",
                  "data.finetune_num_samples=40", "data.num_classes=4",
                  "data.finetune_num_classes=3", "finetune.head.num_classes=3"]


@functools.cache
def _empty_store_template() -> Path:
    """This test process's empty store, made by MLflow on first use (removed at its exit)."""
    import mlflow

    folder = Path(tempfile.mkdtemp(prefix="tfharness-empty-store-"))
    owner = os.getpid()  # a forked child's exit leaves it alone
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, True))
    mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # creates it
    return folder / "mlflow.db"


def empty_store(db: Path) -> str:
    """Puts an empty MLflow SQLite store at ``db``, unless a store is there already (a later
    command of the same test), and returns its ``sqlite:///`` URI.

    MLflow creates a store's schema on first use by running all its migrations, which costs CPU
    every time (figures: benchmarks/results.md, "Test suite"). This copies one MLflow made in
    this test process instead: the same database, with the schema and the Default experiment
    (as MLflow makes it, through the public client; no test logs to it). Tests of a store that
    does not exist yet (created under the lock, sweeps on a fresh store, the quickstart's
    ``./mlflow.db``) give a path of their own and no copy.
    """
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store_template(), db)
    return f"sqlite:///{db}"


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """An empty store at ``tmp_path/mlflow.db`` (:func:`empty_store`)."""
    return empty_store(tmp_path / "mlflow.db")


@pytest.fixture
def make_cfg(tmp_path: Path, tracking_uri: str, request) -> Callable:
    """Composes the packaged config as the CLI would, pointed at tmp_path.

    Each run pretrains for itself (``pretrain_cache=off``) unless the overrides say otherwise
    or the test is one of tests/test_pretrain_cache.py, which test the default, reuse.
    """
    cache = ([] if request.module.__name__.endswith("test_pretrain_cache")
             else ["pretrain_cache=off"])

    def make(overrides: Sequence[str] = (), *, out: str = "out"):
        given = any(str(o).startswith("pretrain_cache=") for o in overrides)
        return tfharness.compose([
            f"output_dir={tmp_path / out}",
            f"tracking.uri={tracking_uri}",
            f"checkpoint_root={tmp_path / 'checkpoints'}",
            "print_report=false",
            *([] if given else cache),
            *overrides,
        ])

    return make


@pytest.fixture
def client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri)


def only_run(client, experiment: str = "tfharness"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    """Returns once the `mlflow server` at ``url`` answers /health; fails the test (and stops
    the server's process group) when it exits or does not answer in time."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                if process.poll() is None:
                    os.killpg(process.pid, 9)
                pytest.fail(f"mlflow server at {url} did not start")
            time.sleep(0.2)


@pytest.fixture
def mlflow_server(tmp_path):
    """scripts/mlflow-server, as a team would start it, on a free loopback port."""
    url, process = start_mlflow_server(tmp_path)
    yield url
    os.killpg(process.pid, 9)  # a graceful stop takes seconds; the store is thrown away
    process.wait(timeout=30)


@pytest.fixture
def mlflow_server_process(tmp_path):
    """The same, with its process (its own process group) for a test that pauses it."""
    url, process = start_mlflow_server(tmp_path)
    yield url, process
    os.killpg(process.pid, 9)
    process.wait(timeout=30)


def start_mlflow_server(tmp_path: Path):
    port = free_port()
    process = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "mlflow-server"), "--port", str(port),
         "--backend-store-uri", empty_store(tmp_path / "server.db"),
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "TFHARNESS_NO_SETUP": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_for_server(url, process)
    return url, process


def make_image_folder(root: Path, classes: Sequence[str], per_class: int = 6, *,
                      size=(12, 10), seed: int = 0, untidy: bool = False) -> Path:
    """Writes ``root/<class>/<n>.jpg|png`` with PIL, each class a distinct colour (learnable).

    ``untidy``: mixed sizes, some grayscale files, and files that are not images beside them.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.zeros(3)
        base[index % 3] = 200
        for n in range(per_class):
            width, height = size
            if untidy:
                width, height = width + 3 * (n % 3), height + 2 * (n % 2)
            noise = rng.integers(0, 40, (height, width, 3))
            image = Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"))
            if untidy and n % 3 == 1:
                image = image.convert("L")
            image.save(folder / (f"{n}.png" if n % 2 else f"{n}.jpg"))
        if untidy:
            (folder / "notes.txt").write_text("not an image")
            (folder / "fake.jpg").write_text("a text file with an image's name")
    return root


def write_csv(path: Path, rows: int = 60, *, seed: int = 0, labels=("setosa", "versicolor",
              "virginica")) -> Path:
    """A small iris-like CSV: four numeric features, a text column, a string label column."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = ["sepal_length,sepal_width,petal_length,petal_width,note,species"]
    for i in range(rows):
        k = i % len(labels)
        values = rng.normal(loc=[5 + k, 3 - k * 0.3, 1.5 + 2 * k, 0.2 + k], scale=0.2)
        lines.append(",".join(f"{v:.3f}" for v in values) + f",row{i},{labels[k]}")
    path.write_text("\n".join(lines) + "\n")
    return path


# The files that take longest (their tests' wall time summed, from TFHARNESS_TEST_CPU; a stale
# order costs time, not correctness): scripts/test hands whole files to its workers in
# collection order (--no-loadscope-reorder), and a long file handed out last would run alone at
# the end while the other workers sit idle.
LONGEST_FIRST = ("test_crash.py", "test_sweeps.py", "test_transfer.py", "test_pretrain_cache.py",
                 "test_own_project.py", "test_data_runs.py", "test_store.py", "test_runner.py",
                 "test_sources.py", "test_cli.py", "test_tracking.py", "test_ui_check.py",
                 "test_serving.py", "test_distribute.py", "test_mlflow_record.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Opt-in CPU accounting (``TFHARNESS_TEST_CPU=<file>``): appends each test's CPU seconds
    (setup, call and teardown; its own and its waited-for child processes') to ``<file>``: on a
    2-core machine the suite's time is bounded by its CPU."""
    out = os.environ.get("TFHARNESS_TEST_CPU")
    if not out:
        return (yield)
    import json
    import resource

    def cpu() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        prewarmed = sys.modules.get("prewarmed")  # its processes are not this one's children
        return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
                + (prewarmed.children_cpu if prewarmed is not None else 0.0))

    start, wall = cpu(), time.time()
    try:
        return (yield)
    finally:
        with open(out, "a") as f:
            f.write(json.dumps({"test": item.nodeid, "cpu": round(cpu() - start, 2),
                                "wall": round(time.time() - wall, 2)}) + "\n")
