"""Writing params and metric points in the batch sizes MLflow accepts."""

from __future__ import annotations

from typing import Dict, List

# MLflow's limits: params and metrics per log_batch call, characters of a param value.
PARAM_BATCH = 100
METRIC_BATCH = 1000
PARAM_VALUE_LIMIT = 6000


def log_params(client, run_id: str, params: Dict[str, str]) -> None:
    """Logs ``params`` (sorted by key, values cut to MLflow's limit) in batches."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in sorted(params.items())]
    for i in range(0, len(items), PARAM_BATCH):
        client.log_batch(run_id, params=items[i:i + PARAM_BATCH])


def log_metric_points(client, run_id: str, points: List) -> None:
    """Logs ``points`` (``mlflow.entities.Metric``) in batches."""
    for i in range(0, len(points), METRIC_BATCH):
        client.log_batch(run_id, metrics=points[i:i + METRIC_BATCH])
