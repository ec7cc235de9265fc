"""``python -m tfharness.sync SPOOL_DIR``: delivers spooled runs to the servers they were meant for.

Each spooled run (see :mod:`tfharness.spool`) is replayed once: a whole run becomes a new run in
the experiment of the same name on its server (params, tags, every metric point with its step and
timestamp, artifacts, models, final status), and its id is mapped in ``SPOOL_DIR/synced.json``; a
tail run appends its metric points, artifacts and models to the server run it belongs to and
sets that run's final status. Replayed runs are tagged in the spool and skipped next time, so
running the command again after a failure delivers only what is left.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

from tfharness.tracking import spool
from tfharness.errors import HarnessError, TrackingError
from tfharness.tracking import store
from tfharness.tracking.batches import log_metric_points, log_params
from tfharness.tracking.models import log_model_spec

SYNCED_FILE = "synced.json"


def _copy_metrics(source, target, source_run: str, target_run: str, keys) -> int:
    from mlflow.entities import Metric

    points = []
    for key in keys:
        points += [Metric(m.key, m.value, m.timestamp, m.step)
                   for m in source.get_metric_history(source_run, key)]
    log_metric_points(target, target_run, points)
    return len(points)


def _copy_artifacts(source, target, source_run: str, target_run: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for item in source.list_artifacts(source_run):
            if item.path == str(Path(spool.MODELS_FILE).parent):
                continue
            local = source.download_artifacts(source_run, item.path, tmp)
            if item.is_dir:
                target.log_artifacts(target_run, local, item.path)
            else:
                parent = str(Path(item.path).parent)
                target.log_artifact(target_run, local, None if parent == "." else parent)


def _replay_models(source, source_run: str, target_uri: str, target_run: str) -> int:
    import mlflow

    names = {a.path for a in source.list_artifacts(source_run, str(Path(spool.MODELS_FILE).parent))}
    if spool.MODELS_FILE not in names:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        specs = spool.model_specs_of(
            Path(source.download_artifacts(source_run, spool.MODELS_FILE, tmp)).read_text())
    mlflow.set_tracking_uri(target_uri)
    for spec in specs:
        if not Path(spec.artifact).exists():
            raise TrackingError(f"Cannot replay model {spec.name!r}: its saved artifact "
                                f"{spec.artifact} is gone.")
        log_model_spec(spec, target_run)
    return len(specs)


def sync(spool_dir: str, target_uri: Optional[str] = None) -> Dict[str, str]:
    """Replays every spooled run not replayed yet; returns ``{spool run id: server run id}``.

    Args:
        spool_dir: the ``tracking.spool_dir`` the runs were spooled to.
        target_uri: deliver to this tracking URI instead of the one each run was meant for.
    """
    import mlflow

    db = Path(spool_dir) / spool.DB_NAME
    if not db.is_file():
        raise TrackingError(f"No spool at {db}: nothing to sync.")
    source = mlflow.MlflowClient(spool.spool_uri(spool_dir))
    mapping: Dict[str, str] = {}
    for experiment in source.search_experiments():
        for run in source.search_runs([experiment.experiment_id], max_results=10000):
            tags = run.data.tags
            if spool.TARGET_URI not in tags or spool.SYNCED_TO in tags:
                continue
            uri = target_uri or tags[spool.TARGET_URI]
            try:
                if spool.TARGET_RUN in tags:
                    target = mlflow.MlflowClient(uri)
                    target_run = tags[spool.TARGET_RUN]
                    target.get_run(target_run)
                else:
                    target, experiment_id = store.open_experiment(uri, experiment.name)
                    kept = {k: v for k, v in tags.items() if not k.startswith("tfharness.spool.")}
                    kept["tfharness.spooled_from"] = run.info.run_id
                    target_run = target.create_run(experiment_id, run_name=run.info.run_name,
                                                   tags=kept).info.run_id
                    log_params(target, target_run, run.data.params)
                _copy_metrics(source, target, run.info.run_id, target_run, run.data.metrics)
                _copy_artifacts(source, target, run.info.run_id, target_run)
                _replay_models(source, run.info.run_id, uri, target_run)
                for key, value in tags.items():
                    if key.startswith(spool.TAG_PREFIX):
                        target.set_tag(target_run, key[len(spool.TAG_PREFIX):], value)
                target.set_tag(target_run, "tfharness.synced_from_spool", run.info.run_id)
                target.set_terminated(target_run,
                                      status=tags.get(spool.FINAL_STATUS, run.info.status))
            except HarnessError:
                raise
            except Exception as exc:
                raise TrackingError(f"Cannot replay spooled run {run.info.run_id} to {uri}: "
                                    f"{type(exc).__name__}: {str(exc)[:500]}; nothing was "
                                    f"marked as synced, run the command again") from exc
            source.set_tag(run.info.run_id, spool.SYNCED_TO, f"{uri} {target_run}")
            mapping[run.info.run_id] = target_run
    synced = Path(spool_dir) / SYNCED_FILE
    previous = json.loads(synced.read_text()) if synced.is_file() else {}
    from tfharness.artifacts.serialization import atomic_write

    text = json.dumps({**previous, **mapping}, indent=1)
    atomic_write(synced, lambda tmp: tmp.write_text(text))
    return mapping


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfharness.sync", description=__doc__.split(
        "\n")[0])
    parser.add_argument("spool_dir", nargs="?", default="mlflow-spool",
                        help="the tracking.spool_dir of the runs (default: mlflow-spool)")
    parser.add_argument("--to", dest="target_uri", default=None,
                        help="deliver to this tracking URI instead of the one each run names")
    args = parser.parse_args(argv)
    try:
        mapping = sync(args.spool_dir, args.target_uri)
    except HarnessError as error:
        print(f"tfharness-sync: {error}", file=sys.stderr)
        return 1
    for spooled, delivered in mapping.items():
        print(f"{spooled} -> {delivered}")
    print(f"{len(mapping)} run(s) delivered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
