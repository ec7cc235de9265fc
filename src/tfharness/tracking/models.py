"""Logging a saved artifact as an MLflow model, and registering it.

The logged model *is* the artifact tfharness saved (a SavedModel directory, a ``.keras`` or an
``.h5`` file) with ``mlflow_model.py`` beside it, so ``mlflow.pyfunc.load_model`` serves it. The
same :class:`ModelSpec` is logged by the tracker and, for a spooled run, replayed by
``python -m tfharness.sync``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from tfharness.errors import TrackingError

PYTHON_MODEL = str(Path(__file__).with_name("mlflow_model.py"))
# Run tag prefix holding each logged model's URI: ``tfharness.model_uri.finetuned``.
MODEL_URI_TAG = "tfharness.model_uri"


@dataclass
class ModelSpec:
    """One model to log: what ``Model.log`` needs, all of it picklable and JSON-able."""

    name: str
    artifact: str
    signature: Any  # mlflow.models.ModelSignature
    example: np.ndarray
    requirements: List[str]
    tags: Dict[str, str] = field(default_factory=dict)
    extra_artifacts: Dict[str, str] = field(default_factory=dict)
    step: int = 0  # the epoch the model was produced at

    @classmethod
    def of(cls, name: str, example: np.ndarray, output: np.ndarray, artifact,
           requirements: List[str], tags: Optional[Dict[str, str]] = None,
           extra_artifacts: Optional[Dict[str, Any]] = None, step: int = 0) -> "ModelSpec":
        """The spec of a model whose ``output`` on ``example`` is known (its signature)."""
        from mlflow.models import infer_signature

        return cls(name, str(artifact), infer_signature(example, output), np.asarray(example),
                   list(requirements), dict(tags or {}),
                   {k: str(v) for k, v in (extra_artifacts or {}).items()}, int(step))

    def to_json(self) -> Dict[str, Any]:
        data = asdict(self)
        data["signature"] = self.signature.to_dict() if self.signature else None
        data["example"] = self.example.tolist()
        return data

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ModelSpec":
        from mlflow.models import ModelSignature

        signature = ModelSignature.from_dict(data["signature"]) if data["signature"] else None
        return cls(**{**data, "signature": signature,
                      "example": np.asarray(data["example"], dtype=np.float32)})


def log_model_spec(spec: ModelSpec, run_id: str) -> str:
    """Logs ``spec`` into the run ``run_id`` of the current tracking URI; returns its URI.

    What ``mlflow.pyfunc.log_model`` does, less its serving check of the input example: that
    check loads the model, that is TensorFlow, into the process that logs, to prove what the
    runner has proved already (the saved artifact reloads and serves the same outputs).
    """
    import mlflow
    from mlflow.models import Model

    # The logged model is created here, in the run's experiment, with the run's params:
    # Model.log alone would take both from the calling thread's active run, which the
    # delivering thread does not have.
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=spec.name,
                                       source_run_id=run_id, tags=spec.tags or None,
                                       params=dict(run.data.params))

    # private: ``validate_serving_input`` is an undocumented keyword of ``Model.log`` (the
    # transformers flavor passes it); the public mlflow.pyfunc.log_model offers no way to keep
    # the input example without the serving check.
    # tests/test_private_apis.py fails when they stop being honoured.
    info = Model.log(
        flavor=_PyfuncFlavor,
        validate_serving_input=False,
        artifact_path=None,
        run_id=run_id,
        model_id=model.model_id,
        name=spec.name,
        python_model=PYTHON_MODEL,
        artifacts={"model": spec.artifact, **spec.extra_artifacts},
        signature=spec.signature,
        input_example=spec.example,
        pip_requirements=spec.requirements,
        # MLflow links every run metric at this step to the new model; the runner logs a model
        # at the epoch after its training, where no metric is yet, and links the model's own
        # figures afterwards (LinkJob).
        step=spec.step,
    )
    return info.model_uri


class _PyfuncFlavor:
    """``mlflow.pyfunc`` as the flavor ``Model.log`` saves with (any object with a
    ``save_model``), minus ``validate_serving_input``: ``Model.log`` reads that option and then
    passes it on to ``save_model``, which ``mlflow.pyfunc.save_model`` refuses."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs):
        import mlflow.pyfunc

        return mlflow.pyfunc.save_model(**kwargs)


def model_id_of(client, run_id: str, name: str, model_uris: Dict[str, str]) -> Optional[str]:
    """The id of the model ``name`` the run logged (by this process or an earlier one)."""
    uri = model_uris.get(name, "")
    if uri.startswith("models:/"):
        return uri[len("models:/"):]
    run = client.get_run(run_id)
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
    return models[0].model_id if models else None


def link_model_metrics(client, run_id: str, model_id: Optional[str], keys: List[str]) -> None:
    """Links the latest point of each run metric in ``keys`` to the logged model ``model_id``.

    The point is logged again, unchanged, with the model's id: the run's history keeps one point
    (MLflow drops an exact duplicate) and the model carries the run's final value. Keys the run
    did not record are skipped; so is everything when the model was not logged.
    """
    from mlflow.entities import Metric

    from tfharness.tracking.batches import log_metric_points

    if model_id is None:
        return
    points = []
    for key in keys:
        history = client.get_metric_history(run_id, key)
        if history:
            # The point MLflow shows as the run's value: latest step, then latest time.
            last = max(history, key=lambda m: (m.step, m.timestamp, m.value))
            points.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id))
    log_metric_points(client, run_id, points)


def register(client, run_id: str, model_uris: Dict[str, str], name: str, registered_name: str,
             alias: Optional[str] = None) -> str:
    """Registers the logged model ``name`` of run ``run_id`` (its URI in ``model_uris``) as a
    new version of ``registered_name``, with ``alias`` if given, and tags the run with that
    version; returns the version."""
    import mlflow

    if name not in model_uris:
        raise TrackingError(f"model {name!r} was not logged (tracking.log_models=false?)")
    version = str(mlflow.register_model(model_uris[name], registered_name).version)
    client.set_tag(run_id, "tfharness.registered_model", f"{registered_name}/{version}")
    if alias:
        client.set_registered_model_alias(registered_name, alias, version)
    return version


def link_model_input(client, run_id: str, model_id: str) -> None:
    """Records the logged model ``model_id`` as an input of run ``run_id`` (MLflow's lineage)."""
    from mlflow.entities import LoggedModelInput

    client.log_inputs(run_id, models=[LoggedModelInput(model_id)])


def model_output_and_requirements(model, example: np.ndarray) -> Tuple[np.ndarray, List[str]]:
    """What logging ``model`` needs from TensorFlow: its output on ``example`` (for the
    signature) and the pip requirements to serve it, given explicitly (no inference)."""
    import keras
    import tensorflow as tf

    # The prediction runs in the training thread, while the model is known to be idle.
    output = np.asarray(model(example, training=False))
    return output, [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
