"""Writing params and metric points in the batch sizes MLflow accepts, and tables as columns."""

from __future__ import annotations

from typing import Dict, Iterable, List

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


def table_columns(rows: Iterable[Dict]) -> Dict[str, list]:
    """Rows (dicts) as the columns ``MlflowClient.log_table`` takes."""
    columns: Dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            columns.setdefault(key, []).append(value)
    return columns
