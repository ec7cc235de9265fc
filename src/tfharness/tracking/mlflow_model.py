"""The MLflow pyfunc model of a tfharness artifact (an MLflow "model from code" file).

``tracking.MlflowTracker.log_model`` logs this file together with the artifact tfharness wrote
(a SavedModel directory, a ``.keras`` or an ``.h5`` file), so the logged model *is* that
artifact: ``mlflow.pyfunc.load_model(uri).predict(x)`` serves it, and the SavedModel files
(``saved_model.pb``, ``variables/``, ``assets/tfharness/model.json``) sit in the model's
artifacts. This file imports only what a serving environment has: no tfharness.
"""

import os

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


def _single_output(outputs):
    # tfharness SavedModels name their one output ({"probabilities": ...}); older ones return
    # the tensor itself.
    if isinstance(outputs, dict):
        return next(iter(outputs.values()))
    return outputs


class KerasArtifactModel(PythonModel):
    """Predicts with a SavedModel through its ``serve`` endpoint, or with a Keras file."""

    # The model takes tensors, which have no Python type hints for MLflow to validate (it would
    # warn at every load); the signature logged with the model describes the input instead.
    _skip_type_hint_validation = True

    def load_context(self, context):
        path = context.artifacts["model"]
        if os.path.isdir(path):
            import tensorflow as tf

            loaded = tf.saved_model.load(path)
            self._predict = lambda x: _single_output(loaded.serve(tf.constant(x)))
        else:
            import keras

            model = keras.saving.load_model(path, compile=False)
            self._predict = lambda x: model(x, training=False)

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "to_numpy"):
            model_input = model_input.to_numpy()
        return np.asarray(self._predict(np.asarray(model_input, dtype=np.float32)))


mlflow.models.set_model(KerasArtifactModel())
