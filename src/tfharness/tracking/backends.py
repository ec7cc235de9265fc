"""The MLflow tracker, as ``tracking.async_backend`` says."""

from __future__ import annotations

from tfharness.config import TrackingConfig
from tfharness.tracking.tracker import MlflowTracker


def in_process_tracker(cfg: TrackingConfig) -> MlflowTracker:
    """tfharness' delivery thread (``harness``) or MLflow's asynchronous logging (``mlflow``)."""
    if cfg.async_backend == "mlflow":
        from tfharness.tracking.mlflow_async import MlflowAsyncTracker

        return MlflowAsyncTracker(cfg)
    return MlflowTracker(cfg)
