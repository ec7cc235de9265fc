"""What a run records about its data, and what the data puts into the model.

* MLflow dataset inputs (``mlflow.log_input``'s records), one per context: ``pretrain``,
  ``finetune`` and ``test`` (see :mod:`tfharness.data.records`), for every data source;
* the data's digest and each phase's class names as run tags, the class names as an artifact
  beside each logged model (``class_names.json``) and in the trainable-layer report;
* the data's preprocessing layers (a ``Normalization`` adapted on the training rows, a
  ``Rescaling`` of raw pixels) put in front of a model built from scratch, so the saved and
  served model takes raw inputs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List, Optional

from tfharness.config import HarnessConfig
from tfharness.config import targets
from tfharness.data import records
from tfharness.pipeline.context import RunContext

log = logging.getLogger("tfharness")

# Model options that preprocess raw pixels themselves (keras.applications' preprocess_input).
OWN_PIXEL_PREPROCESSING = ("keras_application",)


def resolve_auto_keys(cfg: HarnessConfig) -> None:
    """``data.rescale: null`` means yes, unless the model preprocesses raw pixels itself."""
    data = cfg.data
    if getattr(data, "rescale", True) is None:
        data.rescale = targets.option_name(cfg.model) not in OWN_PIXEL_PREPROCESSING


def load(cfg: HarnessConfig, load_data):
    """Calls ``load_data`` (the data option's factory, checked); returns the bundle, its
    description and how long loading took."""
    start = time.perf_counter()
    bundle = load_data()
    seconds = time.perf_counter() - start
    options = targets.options_of(cfg.data)
    description = records.describe_bundle(bundle, options, options.get(targets.TARGET))
    return bundle, description, seconds


def log_data(ctx: RunContext) -> None:
    """Once the run is open: its datasets, the data digest and class names, the load time."""
    description: records.DataDescription = ctx.description
    tracker = ctx.tracker
    tracker.log_inputs([r.to_dict() for r in description.records(ctx.cfg.finetune.enabled)])
    tracker.set_tags(description.tags())
    tracker.log_metrics({"data/load_seconds": ctx.data_seconds})
    ctx.result.metrics["data/load_seconds"] = ctx.data_seconds


def class_names_of(ctx: RunContext, stem: str) -> Optional[List[str]]:
    """The names of the outputs of model ``stem``: what the data's labels index."""
    if stem == "pretrained" and ctx.source is not None:
        # A loaded model's outputs mean what they meant where it was trained: the names logged
        # beside it there, if any.
        return ctx.source.artifact.class_names
    phase = "finetune" if stem == "finetuned" else "pretrain"
    return ctx.description.class_names.get(phase)


def class_names_file(ctx: RunContext, stem: str) -> Optional[Path]:
    """Writes ``<output_dir>/classes/<stem>/class_names.json`` (logged beside the model)."""
    names = class_names_of(ctx, stem)
    if names is None:
        return None
    path = Path(ctx.cfg.output_dir) / "classes" / stem / records.CLASS_NAMES_FILE
    return records.write_class_names(path, names)


def classes_markdown(ctx: RunContext) -> str:
    """The report's line naming the classes each model's output predicts."""
    lines = []
    for stem, label in (("pretrained", "pretrained output"), ("finetuned", "fine-tuned head")):
        names = class_names_of(ctx, stem)
        if names is not None:
            lines.append(f"- {label} ({len(names)} classes): {', '.join(names)}")
    return "\nClasses each model predicts (output index order):\n\n" + "\n".join(lines) + "\n"


def with_preprocessing(model, split):
    """``model`` with the data's preprocessing layers in front (``split.preprocessing``).

    A Sequential model gets them as its first layers; a functional model's graph is re-run on
    their output, so every layer keeps its place in ``model.layers`` (freeze selectors, head
    surgery and the report see the same layers, plus these).
    """
    if split.preprocessing is None:
        return model
    import keras

    layers = list(split.preprocessing())
    if not layers:
        return model
    shape = tuple(model.input_shape[1:])
    inputs = keras.Input(shape=shape, name="features")
    if isinstance(model, keras.Sequential):
        return keras.Sequential([inputs, *layers, *model.layers], name=model.name)
    x = inputs
    for layer in layers:
        x = layer(x)
    try:
        # private: Functional's own graph walk, reusing each layer on the new input; no public
        # API re-runs a graph on a new input and keeps its layers flat (calling the model nests
        # it as one layer, which the fallback does). tests/test_private_apis.py fails when it moves.
        outputs = model._run_through_graph(x, operation_fn=lambda op: op)
    except Exception:  # noqa: BLE001 - another Keras: nest the model instead
        outputs = model(x)
    return keras.Model(inputs, outputs, name=model.name)
