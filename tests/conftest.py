"""Shared fixtures: every test writes under tmp_path and tracks into a SQLite store there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfharness  # noqa: E402

# Small enough to keep the suite quick on 2 cores, big enough for every split to be non-empty.
TINY_SYNTHETIC = ["data=synthetic", "data.shape=[12]", "data.num_samples=60",
                  "data.finetune_num_samples=40", "data.num_classes=4",
                  "data.finetune_num_classes=3", "finetune.head.num_classes=3"]


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def make_cfg(tmp_path: Path, tracking_uri: str) -> Callable:
    """Composes the packaged config as the CLI would, pointed at tmp_path."""

    def make(overrides: Sequence[str] = (), *, out: str = "out"):
        return tfharness.compose([
            f"output_dir={tmp_path / out}",
            f"tracking.uri={tracking_uri}",
            f"checkpoint_root={tmp_path / 'checkpoints'}",
            "print_report=false",
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
