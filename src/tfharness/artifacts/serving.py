"""Serving: the signatures a tfharness SavedModel carries, and TensorFlow Serving's version layout.

``model.export`` alone gives one endpoint, ``serve``, whose input and output names are whatever
Keras generated. A SavedModel written here instead has:

- ``serving_default`` (also reachable as the ``serve`` endpoint): input ``features``, one output
  named for what the model emits: ``probabilities`` after a softmax or sigmoid, ``logits`` after
  a linear output layer, ``outputs`` otherwise;
- the extra signatures listed in ``save_format.signatures`` (see :data:`EXTRA_SIGNATURES`), each
  taking the same ``features`` input and returning one output named like the signature.

Every signature uses the model's own variables, so the SavedModel's ``variables`` stay exactly
the model's weights and the rebuild-by-path reload in :mod:`tfharness.serialization` still works.

``save_format.versioned=true`` writes ``<models>/<name>/<N>/``, the layout TensorFlow Serving
watches: it loads the highest integer-named subdirectory and ignores every other name, so the
temporary ``.N.tmp-*`` sibling of an atomic write is never picked up half-written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence

from tfharness.errors import SaveError

INPUT_NAME = "features"
# The serving_default endpoint keeps the name model.export gives it, so code calling
# ``tf.saved_model.load(d).serve(x)`` (the MLflow pyfunc model among it) keeps working.
DEFAULT_ENDPOINT = "serve"
EXTRA_SIGNATURES = {
    "probabilities": "class probabilities: the output itself after softmax or sigmoid, "
                     "softmax of it after a linear output layer",
    "logits": "the output layer before its activation",
    "embedding": "the input of the output layer (the penultimate layer's output)",
    "classes": "the index of the largest output, as int64",
}
PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


def _output_activation(model) -> Optional[str]:
    activation = getattr(model.layers[-1], "activation", None) if model.layers else None
    return getattr(activation, "__name__", None)


def default_output_name(model) -> str:
    """The name of ``serving_default``'s output: what the last layer emits."""
    activation = _output_activation(model)
    if activation in PROBABILITY_ACTIVATIONS:
        return "probabilities"
    if activation == "linear":
        return "logits"
    return "outputs"


def _penultimate(model):
    """A model sharing ``model``'s layers that returns the input of its output layer."""
    import keras

    try:
        # One input tensor, not a list of one: calling it with a tensor then matches its structure.
        return keras.Model(model.inputs[0], model.layers[-1].input, name=f"{model.name}_embedding")
    except (AttributeError, ValueError, TypeError) as error:
        raise SaveError(f"Cannot build the 'embedding' signature of {model.name!r}: the input "
                        f"of its output layer is not reachable ({error}).") from error


def signature_functions(model, extra: Sequence[str]) -> Dict[str, object]:
    """``{endpoint name: fn(features) -> {output name: tensor}}`` for the export archive."""
    import keras

    ops = keras.ops
    unknown = [name for name in extra if name not in EXTRA_SIGNATURES]
    if unknown:
        raise SaveError(f"Unknown signature(s) {unknown}; allowed: {', '.join(EXTRA_SIGNATURES)}.")
    output_name = default_output_name(model)
    functions = {DEFAULT_ENDPOINT: lambda features: {
        output_name: model(features, training=False)}}
    last = model.layers[-1]
    activation = _output_activation(model)
    embedding = _penultimate(model) if {"embedding", "logits"} & set(extra) else None
    for name in extra:
        if name == "probabilities":
            if activation in PROBABILITY_ACTIVATIONS:
                fn = lambda features: {"probabilities": model(features, training=False)}
            elif activation == "linear":
                fn = lambda features: {"probabilities": ops.softmax(
                    model(features, training=False), axis=-1)}
            else:
                raise SaveError(f"The 'probabilities' signature needs an output layer with a "
                                f"softmax, sigmoid or linear activation; {last.name!r} has "
                                f"{activation!r}.")
        elif name == "logits":
            if getattr(last, "kernel", None) is None:
                raise SaveError(f"The 'logits' signature needs a Dense output layer; "
                                f"{last.name!r} is a {type(last).__name__}.")

            # A closure, not a default argument: tf.function would trace a default as an input.
            def fn(features):
                logits = ops.matmul(embedding(features, training=False), last.kernel)
                return {"logits": logits + last.bias if last.use_bias else logits}
        elif name == "embedding":
            fn = lambda features: {"embedding": embedding(features, training=False)}
        else:  # classes
            fn = lambda features: {"classes": ops.cast(
                ops.argmax(model(features, training=False), axis=-1), "int64")}
        functions[name] = fn
    return functions


def export_savedmodel(model, path: str, extra_signatures: Sequence[str] = ()) -> None:
    """Writes ``model`` as a SavedModel at ``path`` (a local path or a ``ram://`` one).

    Args:
        model: a built Keras model. One with several inputs, or a subclassed one, is exported
            with Keras' own ``serve`` signature and cannot take extra signatures.
        path: where to write; anything ``tf.io.gfile`` handles.
        extra_signatures: names from :data:`EXTRA_SIGNATURES`, exported beside
            ``serving_default``.
    """
    import keras
    import tensorflow as tf

    try:
        inputs = list(model.inputs or [])
    except AttributeError:  # a subclassed model has no symbolic inputs
        inputs = []
    if len(inputs) != 1:
        # Named signatures need one known input; other models keep Keras' own export.
        if extra_signatures:
            raise SaveError(f"Extra signatures {list(extra_signatures)} need a model with one "
                            f"symbolic input; {model.name!r} has {len(inputs)}.")
        model.export(str(path), format="tf_saved_model", verbose=False)
        return
    spec = inputs[0]
    # A named TensorSpec is what gives the signature an input called "features" instead of the
    # positional name Keras would generate.
    input_spec = tf.TensorSpec((None, *spec.shape[1:]), spec.dtype, name=INPUT_NAME)
    archive = keras.export.ExportArchive()
    archive.track(model)
    # The first endpoint added becomes serving_default (ExportArchive.write_out).
    for name, fn in signature_functions(model, extra_signatures).items():
        archive.add_endpoint(name, fn, input_signature=[input_spec])
    archive.write_out(str(path), verbose=False)


def version_numbers(base: str | os.PathLike) -> list:
    """The integer-named subdirectories of ``base``, sorted: the versions TF Serving would see."""
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def next_version_path(base: str | os.PathLike) -> Path:
    """``base/<N+1>`` where N is the highest existing version (``base/1`` for the first)."""
    versions = version_numbers(base)
    return Path(base) / str(versions[-1] + 1 if versions else 1)


def latest_version_path(base: str | os.PathLike) -> Path:
    """The version TF Serving would serve from ``base``: its highest integer subdirectory."""
    versions = version_numbers(base)
    if not versions:
        raise SaveError(f"{base} has no numbered version directory (1/, 2/, ...).")
    return Path(base) / str(versions[-1])
