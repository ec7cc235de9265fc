"""Sources: where a run starts when it does not start from scratch.

Finds the artifact named by the ``source`` config group (a path, or an MLflow model URI: one
logged by tfharness, or by ``mlflow.keras``/``mlflow.tensorflow``, whose ``data/`` folder holds
the Keras file), checks its bytes against the sha256 tfharness recorded, tells what kind of artifact it is, loads it as a
Keras 3 model with as much of its structure as the artifact carries, and proves the loaded model
computes what the artifact computes. What each kind gives:

=========================== ============ ================ =========
kind                        layers kept  per-layer freeze head swap
=========================== ============ ================ =========
tfharness SavedModel        yes          yes              yes
``.keras`` / ``.h5``        yes          yes              yes
Keras 2 SavedModel          yes          yes              yes
SavedModel without Keras    no: 1 block  block, variables on top
=========================== ============ ================ =========

A Keras 2 SavedModel (``keras_metadata.pb``) is converted by tf_keras in a child process into a
legacy ``.h5``, which Keras 3 loads layer by layer. A SavedModel with no Keras metadata at all is
a program with a signature: it becomes one :class:`SavedModelBlock` layer whose variables train,
or stay frozen as a whole or by variable-name glob (``source.freeze_variables``).

A SavedModel is a program (TensorFlow's SECURITY.md): one that tfharness did not write is loaded
only when it is named explicitly as the source. ``.keras`` and ``.h5`` load in Keras' safe mode
unless ``source.allow_unsafe=true``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tfharness.artifacts import integrity, serialization
from tfharness.models.applications import register_layers
from tfharness.config import MlflowSourceConfig, PathSourceConfig, SourceConfig
from tfharness.data.records import CLASS_NAMES_FILE, read_class_names
from tfharness.errors import ConfigError, SourceError, VerificationError

HARNESS_SAVEDMODEL = "tfharness-savedmodel"
KERAS_FILE = "keras"
H5_FILE = "h5"
LEGACY_SAVEDMODEL = "keras2-savedmodel"
OPAQUE_SAVEDMODEL = "opaque-savedmodel"

LEGACY_EXTRA = "pip install 'tfharness[legacy]' (the tf-keras package)"
SHA256_TAG = "tfharness.sha256"
_UNSAFE_HINT = ("set source.allow_unsafe=true to load it anyway, only if you trust where it "
                "came from (loading runs its code)")

# SavedModels the user named as a source in this process: a SavedModelBlock may (re)load these
# while a fine-tuned model that contains one is saved and verified. Anything else is refused in
# safe mode, as Keras' own TFSMLayer is.
_TRUSTED_BLOCK_PATHS: set = set()


@dataclass
class SourceArtifact:
    """The artifact on local disk, what named it, and what MLflow knows about it."""

    path: Path
    location: str
    expected_sha256: Optional[str] = None
    # Tags that link the run and its models to where they came from.
    lineage: Dict[str, str] = field(default_factory=dict)
    # What the model's outputs index, when it was logged with class_names.json beside it.
    class_names: Optional[List[str]] = None


@dataclass
class LoadedSource:
    """A source loaded as a Keras model, with what the load kept and proved."""

    model: object
    kind: str
    artifact: SourceArtifact
    layers_kept: bool
    load_seconds: float
    integrity: str
    parity_max_abs_diff: Optional[float] = None
    parity_against: Optional[str] = None
    block_variables: List[Dict] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.model.output_shape[-1])

    def describe(self) -> str:
        """Markdown for ``reports/source.md``: what was loaded and what it kept."""
        lines = [f"# Source: {self.artifact.location}", "",
                 f"- kind: {self.kind}", f"- local path: {self.artifact.path}",
                 f"- sha256: {self.integrity}",
                 f"- layers kept: {'yes' if self.layers_kept else 'no (one opaque block)'}",
                 f"- layers: {', '.join(layer.name for layer in self.model.layers)}"]
        if self.parity_against:
            lines.append(f"- output parity against {self.parity_against}: max abs diff "
                         f"{self.parity_max_abs_diff:.3g}")
        for key, value in sorted(self.artifact.lineage.items()):
            lines.append(f"- {key}: {value}")
        if self.block_variables:
            lines += ["", "The block is opaque: a SavedModel function with no layers. It holds "
                      "these variables (freeze them by name with source.freeze_variables):", "",
                      "| variable | shape | trainable |", "|---|---|---|"]
            lines += [f"| {v['name']} | {v['shape']} | {v['trainable']} |"
                      for v in self.block_variables]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ finding it
def source_location(cfg: SourceConfig) -> str:
    if isinstance(cfg, PathSourceConfig):
        return cfg.path
    if isinstance(cfg, MlflowSourceConfig):
        return cfg.uri
    return "scratch"


def source_key(cfg: SourceConfig) -> str:
    return "source.uri" if isinstance(cfg, MlflowSourceConfig) else "source.path"


def _mlflow_error(uri: str, exc: Exception) -> SourceError:
    return SourceError(f"Cannot find source.uri={uri!r} in the MLflow store: "
                       f"{type(exc).__name__}: {str(exc)[:400]}")


def resolve_mlflow(uri: str, tracking_uri: str, workdir: Path) -> SourceArtifact:
    """Downloads the model an MLflow URI names and finds the saved Keras artifact inside it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri)
    lineage: Dict[str, str] = {}
    try:
        if uri.startswith("models:/"):
            model_id = _models_uri_model_id(client, uri, lineage)
        else:
            model_id = _runs_uri_model_id(client, uri, lineage)
            if model_id is None:
                return _run_artifact(uri, tracking_uri, workdir, lineage)
        logged = client.get_logged_model(model_id)
        lineage["tfharness.source_model_id"] = logged.model_id
        if logged.source_run_id:
            lineage["tfharness.source_run_id"] = logged.source_run_id
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=logged.artifact_location, dst_path=str(workdir / logged.model_id),
            tracking_uri=tracking_uri))
    except MlflowException as exc:
        raise _mlflow_error(uri, exc) from exc
    return _flavor_artifact(local, uri, lineage) or _tfharness_artifact(local, uri, logged,
                                                                          lineage)


def _models_uri_model_id(client, uri: str, lineage: Dict[str, str]) -> str:
    """The logged model a ``models:/<id>``, ``models:/<name>/<version>`` or
    ``models:/<name>@<alias>`` URI names; a registered version's name and run go to ``lineage``."""
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in rest:
        name, number = rest.split("/", 1)
        version = client.get_model_version(name, number)
    else:
        return rest
    lineage["tfharness.source_registered_model"] = f"{version.name}/{version.version}"
    model_id = version.model_id
    # Registered from "models:/<model_id>", a version may name it only in source.
    if model_id is None and (version.source or "").startswith("models:/m-"):
        model_id = version.source[len("models:/"):].split("/")[0]
    if version.run_id:
        lineage["tfharness.source_run_id"] = version.run_id
    if model_id is None:
        raise SourceError(f"source.uri={uri!r}: version {version.version} of "
                          f"{version.name} points at {version.source}, not at an "
                          f"MLflow logged model.")
    return model_id


def _runs_uri_model_id(client, uri: str, lineage: Dict[str, str]) -> Optional[str]:
    """The logged model named ``<name>`` of run ``<run_id>`` in ``runs:/<run_id>/<name>``; None
    when the run logged no model by that name (then it names a plain artifact)."""
    run_id, name = uri[len("runs:/"):].split("/", 1)
    run = client.get_run(run_id)
    lineage["tfharness.source_run_id"] = run_id
    found = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id='{run_id}' AND name='{name}'")
    return found[0].model_id if found else None


def _run_artifact(uri: str, tracking_uri: str, workdir: Path,
                  lineage: Dict[str, str]) -> SourceArtifact:
    """A plain artifact of a run (a .keras file, a directory, a model folder an older MLflow
    logged into the run's artifacts)."""
    import mlflow

    run_id, name = uri[len("runs:/"):].split("/", 1)
    local = Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=name, dst_path=str(workdir), tracking_uri=tracking_uri))
    return (_flavor_artifact(local, uri, lineage) if local.is_dir() else None) \
        or SourceArtifact(local, uri, None, lineage)


def _tfharness_artifact(local: Path, uri: str, logged, lineage: Dict[str, str]) -> SourceArtifact:
    """The one saved model under ``artifacts/`` of a model tfharness logged."""
    inside = local / "artifacts"
    # Beside the model: its sha256 record and the class names its outputs index.
    candidates = sorted(p for p in inside.iterdir()
                        if not p.name.endswith(integrity.RECORD_SUFFIX)
                        and p.name != CLASS_NAMES_FILE) if inside.is_dir() else []
    if len(candidates) != 1:
        found = sorted(p.relative_to(local).as_posix() for p in local.iterdir())
        raise SourceError(f"source.uri={uri!r} is neither a model logged by tfharness nor one "
                          f"logged by mlflow.keras or mlflow.tensorflow: expected one saved "
                          f"model under artifacts/ or a keras/tensorflow flavor in MLmodel, "
                          f"found {found}.")
    return SourceArtifact(candidates[0], uri, logged.tags.get(SHA256_TAG), lineage,
                          class_names=read_class_names(inside / CLASS_NAMES_FILE))


# MLflow's own Keras flavors, in the order they are looked for in an MLmodel file.
KERAS_FLAVORS = ("keras", "tensorflow")


def _flavor_artifact(local: Path, uri: str, lineage: Dict[str, str]) -> Optional[SourceArtifact]:
    """The Keras file or SavedModel inside a model logged by ``mlflow.keras.log_model`` or
    ``mlflow.tensorflow.log_model`` (None for anything else, tfharness' own included)."""
    import yaml

    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        return None
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
    flavor = next((f for f in KERAS_FLAVORS if f in flavors), None)
    if flavor is None:
        return None
    data = local / (flavors[flavor].get("data") or "data")
    found = sorted(p for p in data.iterdir()
                   if p.suffix in (".keras", ".h5") or (p / "saved_model.pb").is_file()) \
        if data.is_dir() else []
    if len(found) != 1:
        raise SourceError(f"source.uri={uri!r} is a model logged by mlflow.{flavor}, but its "
                          f"{data.name}/ folder holds {len(found)} saved models "
                          f"({', '.join(p.name for p in found) or 'none'}); one is needed.")
    return SourceArtifact(found[0], uri, None, {**lineage, "tfharness.source_flavor": flavor})


def resolve(cfg: SourceConfig, tracking_uri: str, workdir: Path) -> SourceArtifact:
    if isinstance(cfg, MlflowSourceConfig):
        workdir.mkdir(parents=True, exist_ok=True)
        return resolve_mlflow(cfg.uri, tracking_uri, workdir)
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError("source.path", cfg.path, "the path of an existing SavedModel "
                          "directory, .keras file or .h5 file")
    return SourceArtifact(path.resolve(), cfg.path)


def detect_kind(path: Path, key: str = "source.path") -> str:
    """What kind of artifact ``path`` is, from its files alone (nothing is loaded)."""
    if path.is_dir():
        if not ((path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()):
            raise ConfigError(key, str(path), "a SavedModel directory (with saved_model.pb), "
                              "a .keras file or an .h5 file")
        if serialization.is_harness_savedmodel(path):
            return HARNESS_SAVEDMODEL
        if (path / "keras_metadata.pb").is_file():
            return LEGACY_SAVEDMODEL
        return OPAQUE_SAVEDMODEL
    if path.suffix == ".keras":
        return KERAS_FILE
    if path.suffix in (".h5", ".hdf5"):
        return H5_FILE
    raise ConfigError(key, str(path), "a SavedModel directory, a .keras file or an .h5 file")


# ------------------------------------------------------------------------------ loading it
def _load_keras_file(path: Path, allow_unsafe: bool, key: str, shown: str):
    import keras

    register_layers()
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=not allow_unsafe)
    except Exception as exc:
        message = str(exc)
        if "safe_mode" in message or "unsafe_deserialization" in message:
            raise SourceError(f"{key}={shown!r} holds code (a Lambda layer) that Keras' safe "
                              f"mode refuses to load; {_UNSAFE_HINT}.") from exc
        if "Could not locate" in message or "Unknown" in message:
            raise SourceError(f"{key}={shown!r} uses a class this process does not know "
                              f"({message.splitlines()[0][:200]}); register it with "
                              f"keras.saving.register_keras_serializable before the run, or, "
                              f"for Lambda bytecode, {_UNSAFE_HINT}.") from exc
        raise SourceError(f"{key}={shown!r} could not be read as a Keras {path.suffix} file: it "
                          f"is truncated, altered or not a Keras model (Keras said: "
                          f"{type(exc).__name__}: {message[:300]}).") from exc


def legacy_keras_available() -> bool:
    try:
        return importlib.util.find_spec("tf_keras") is not None
    except (ImportError, ValueError):  # ValueError: imports of it are disabled in this process
        return False


def _convert_legacy(path: Path, probe: np.ndarray, tmp_path: Path, shown: str, key: str):
    """Keras 2 SavedModel -> legacy .h5 in ``tmp_path`` (tf_keras, in a child process).

    Returns the .h5 path and the Keras 2 model's own outputs on ``probe``.
    """
    if not legacy_keras_available():
        raise SourceError(f"{key}={shown!r} is a legacy Keras 2 SavedModel (keras_metadata.pb); "
                          f"loading it needs the optional extra 'legacy': {LEGACY_EXTRA}.")
    np.savez(tmp_path / "probe.npz", x=probe)
    # tf_keras is used directly; the switch that makes tf.keras mean Keras 2 must stay off.
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    script = Path(__file__).with_name("legacy_keras.py")
    done = subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path / "model.h5"),
         str(tmp_path / "probe.npz"), str(tmp_path / "outputs.npz")],
        capture_output=True, text=True, env=env, timeout=900, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise SourceError(f"{key}={shown!r}: tf_keras could not load this Keras 2 SavedModel "
                          f"and convert it to .h5:\n{tail}")
    return tmp_path / "model.h5", dict(np.load(tmp_path / "outputs.npz"))


def _endpoint(loaded, wanted: Optional[str], shown: str, key: str):
    if wanted:
        names = [wanted]
    else:
        names = ["serve", "serving_default"]
    for name in names:
        if hasattr(loaded, name) and callable(getattr(loaded, name)):
            return name, getattr(loaded, name)
        if name in loaded.signatures:
            return name, loaded.signatures[name]
    available = sorted(loaded.signatures) + [n for n in ("serve", "__call__")
                                             if hasattr(loaded, n)]
    raise ConfigError("source.call_endpoint", wanted, f"an endpoint of {key}={shown!r}: "
                      f"{', '.join(available) or 'it has none'}")


def _input_spec(function):
    import tensorflow as tf

    if hasattr(function, "structured_input_signature"):
        signature = function.structured_input_signature
    else:
        concrete = function.concrete_functions
        signature = concrete[0].structured_input_signature if concrete else ((), {})
    specs = [s for s in tf.nest.flatten(signature) if isinstance(s, tf.TensorSpec)]
    return specs


def block_class():
    """The Keras layer class of an opaque SavedModel, registered on first use.

    Defined lazily so that importing this module does not import Keras.
    """
    global _BLOCK_CLASS
    if _BLOCK_CLASS is not None:
        return _BLOCK_CLASS
    import keras

    @keras.saving.register_keras_serializable(package="tfharness")
    class SavedModelBlock(keras.layers.TFSMLayer):
        """A SavedModel function as one layer: its variables are the layer's weights.

        Unlike Keras' TFSMLayer it returns the single output tensor (a signature returns a
        dict), names its weights after the SavedModel's variables (so a SavedModel exported
        from a model that contains the block restores them by name), and keeps the variables
        matched by ``frozen_variables`` out of training.
        """

        def __init__(self, filepath, call_endpoint="serve", frozen_variables=(), **kwargs):
            self.frozen_variables = list(frozen_variables)
            super().__init__(filepath, call_endpoint=call_endpoint, **kwargs)
            self.call_training_endpoint = None
            for variable in self.weights:
                if any(fnmatch.fnmatchcase(block_variable_name(variable), pattern)
                       for pattern in self.frozen_variables):
                    variable.trainable = False

        def _add_existing_weight(self, weight):
            # Share the SavedModel's own variable (the function reads it), under its own name.
            # private: TFSMLayer's _add_existing_weight hook and Layer._track_variable are the
            # only way to name a TFSMLayer's weights; the opaque-source tests in
            # tests/test_sources.py freeze and restore them by these names, and fail when it moves.
            variable = keras.Variable(initializer=weight, trainable=weight.trainable,
                                      dtype=weight.dtype, shape=weight.shape,
                                      name=weight.name.split(":")[0].replace("/", "_"))
            self._track_variable(variable)

        def call(self, inputs, training=False):
            outputs = self.call_endpoint_fn(inputs)
            if isinstance(outputs, dict):
                outputs = outputs[sorted(outputs)[0]]
            return outputs

        def get_config(self):
            config = super().get_config()
            config.pop("call_training_endpoint", None)
            return {**config, "frozen_variables": self.frozen_variables}

        @classmethod
        def from_config(cls, config, custom_objects=None, safe_mode=None):
            _check_block_trusted(config["filepath"], safe_mode)
            return cls(**config)

    _BLOCK_CLASS = SavedModelBlock
    return SavedModelBlock


_BLOCK_CLASS = None


def _check_block_trusted(filepath: str, safe_mode: Optional[bool]) -> None:
    """Refuses to rebuild an opaque SavedModel block from a path this run did not name as its
    source, unless the load is unsafe (``safe_mode=False``, ``source.allow_unsafe``)."""
    # private: no public API says if the load in progress is in safe mode (tested in
    # tests/test_private_apis.py); from_config needs it.
    from keras.src.saving import serialization_lib

    path = str(Path(filepath).resolve())
    safe = safe_mode if safe_mode is not None else serialization_lib.in_safe_mode()
    if path not in _TRUSTED_BLOCK_PATHS and safe is not False:
        raise SourceError(
            f"This model contains an opaque SavedModel block loaded from {path}, which "
            f"runs that SavedModel's graph and was not named as this run's source; "
            f"{_UNSAFE_HINT}.")


def block_variable_name(variable) -> str:
    """The SavedModel's own name of a block variable (``sequential/dense/kernel``)."""
    return variable.value.name.split(":")[0]


def _load_opaque(path: Path, cfg: SourceConfig, input_shape: Tuple[int, ...], shown: str,
                 key: str):
    import keras
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    endpoint, function = _endpoint(loaded, cfg.call_endpoint, shown, key)
    specs = _input_spec(function)
    if len(specs) != 1:
        raise SourceError(f"{key}={shown!r}: endpoint '{endpoint}' takes {len(specs)} input "
                          f"tensors; only single-input SavedModels can be fine-tuned here.")
    saved_shape = tuple(specs[0].shape[1:])
    if len(saved_shape) != len(input_shape) or any(
            s is not None and s != d for s, d in zip(saved_shape, input_shape)):
        raise ConfigError("data", f"samples of shape {tuple(input_shape)}",
                          f"data whose samples have the source's input shape {saved_shape}")
    outputs = function(tf.zeros((1, *input_shape), specs[0].dtype))
    if isinstance(outputs, dict):
        if len(outputs) != 1:
            raise SourceError(f"{key}={shown!r}: endpoint '{endpoint}' returns "
                              f"{len(outputs)} outputs ({', '.join(sorted(outputs))}); a "
                              f"classifier to fine-tune has one.")
        outputs = next(iter(outputs.values()))
    _TRUSTED_BLOCK_PATHS.add(str(path.resolve()))
    block = block_class()(str(path.resolve()), call_endpoint=endpoint,
                          frozen_variables=cfg.freeze_variables, name="savedmodel_block")
    names = [block_variable_name(v) for v in block.weights]
    for i, pattern in enumerate(cfg.freeze_variables):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(f"source.freeze_variables[{i}]", pattern,
                              f"a glob matching a variable of the block: {', '.join(names)}")
    model = keras.Sequential([keras.Input(shape=input_shape, name="features"), block],
                             name="savedmodel_source")
    return model, loaded, endpoint


def _check_input_shape(model, input_shape: Tuple[int, ...], shown: str, key: str) -> None:
    from tfharness.finetune.surgery import check_single_io

    check_single_io(model, key, shown)
    saved = tuple(model.input_shape[1:])
    if len(saved) != len(input_shape) or any(
            s is not None and s != d for s, d in zip(saved, input_shape)):
        raise ConfigError("data", f"samples of shape {tuple(input_shape)}",
                          f"data whose samples have the source model's input shape {saved} "
                          f"({key}={shown!r})")


def load_source(cfg: SourceConfig, *, tracking_uri: str, workdir: Path,
                input_shape: Sequence[int], probe: np.ndarray, atol: float) -> LoadedSource:
    """Finds, checks, loads and verifies the source named by ``cfg``.

    Args:
        cfg: the ``source`` config (not ``scratch``).
        tracking_uri: the MLflow store an ``mlflow`` source is looked up in.
        workdir: where MLflow models are downloaded.
        input_shape: the shape of one sample of the run's data; the source must take it.
        probe: a batch of the run's data to check output parity on.
        atol: the largest output difference accepted (``save_format.verify_atol``).
    """
    key, shown = source_key(cfg), source_location(cfg)
    input_shape = tuple(input_shape)
    start = time.perf_counter()
    artifact = resolve(cfg, tracking_uri, workdir)
    checked = _integrity_line(artifact)
    kind = detect_kind(artifact.path, key)
    parity, against, block_variables = None, None, []
    if kind == HARNESS_SAVEDMODEL:
        model, parity, against = _load_harness_savedmodel(artifact.path, cfg, probe, atol,
                                                          input_shape, shown, key)
    elif kind in (KERAS_FILE, H5_FILE):
        model = _load_keras_file(artifact.path, cfg.allow_unsafe, key, shown)
        _check_input_shape(model, input_shape, shown, key)
    elif kind == LEGACY_SAVEDMODEL:
        model, parity, against = _load_legacy_savedmodel(artifact.path, cfg, probe, atol,
                                                         input_shape, shown, key)
    else:
        model, parity, against, block_variables = _load_opaque_checked(
            artifact.path, cfg, probe, atol, input_shape, shown, key)
    if kind != OPAQUE_SAVEDMODEL and cfg.freeze_variables:
        raise ConfigError("source.freeze_variables", list(cfg.freeze_variables),
                          f"[] for a {kind} source, whose layers are kept: freeze layers with "
                          f"finetune.freeze")
    return LoadedSource(model=model, kind=kind, artifact=artifact,
                        layers_kept=kind != OPAQUE_SAVEDMODEL,
                        load_seconds=time.perf_counter() - start, integrity=checked,
                        parity_max_abs_diff=parity, parity_against=against,
                        block_variables=block_variables)


def _integrity_line(artifact: SourceArtifact) -> str:
    """The artifact's sha256, checked against its record in MLflow or beside it when one exists."""
    record = integrity.verify(artifact.path, expected=artifact.expected_sha256)
    has_record = artifact.expected_sha256 is not None or integrity.read_record(
        artifact.path) is not None
    if not has_record:
        return f"{record.sha256} (no record to check against)"
    where = "in MLflow" if artifact.expected_sha256 else "beside the artifact"
    return f"{record.sha256} (matches the record {where})"


def _load_harness_savedmodel(path: Path, cfg: SourceConfig, probe: np.ndarray, atol: float,
                             input_shape: Tuple[int, ...], shown: str, key: str):
    """A SavedModel tfharness exported (the Keras model rebuilt from it), checked against its
    own serving signature: ``(model, parity, against)``."""
    import tensorflow as tf

    block_class()  # a tfharness SavedModel may hold a fine-tuned opaque block
    # private: the one way to load in (un)safe mode for this load only: the rebuild goes
    # through keras.models.model_from_json, which takes no safe_mode, and the public
    # keras.config.enable_unsafe_deserialization() is global and cannot be undone.
    # tests/test_private_apis.py fails when it moves.
    from keras.src.saving.serialization_lib import SafeModeScope

    try:
        # Only a fine-tuned opaque block needs this: it loads the SavedModel it came from.
        with SafeModeScope(not cfg.allow_unsafe):
            model, loaded = serialization.load_savedmodel(path)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{key}={shown!r} could not be loaded as a tfharness SavedModel: "
                          f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    # Trusted once by source.allow_unsafe: the run's own saves reload these blocks again.
    _TRUSTED_BLOCK_PATHS.update(layer.filepath for layer in model.layers
                                if isinstance(layer, block_class()))
    _check_input_shape(model, input_shape, shown, key)
    served = loaded.signatures["serving_default"](tf.constant(probe))
    parity = serialization.check_outputs(next(iter(served.values())),
                                         model(probe, training=False), atol, shown)
    return model, parity, "its serving_default signature"


def _load_legacy_savedmodel(path: Path, cfg: SourceConfig, probe: np.ndarray, atol: float,
                            input_shape: Tuple[int, ...], shown: str, key: str):
    """A Keras 2 SavedModel, converted through tf_keras and checked against the Keras 2 model's
    own outputs: ``(model, parity, against)``."""
    with tempfile.TemporaryDirectory(prefix="tfharness-legacy-") as tmp:
        h5, reference = _convert_legacy(path, probe, Path(tmp), shown, key)
        model = _load_keras_file(h5, cfg.allow_unsafe, key, shown)
    _check_input_shape(model, input_shape, shown, key)
    if not bool(reference["has_outputs"]):
        raise SourceError(f"{key}={shown!r}: tf_keras could not run the legacy model on the "
                          f"run's data to check the conversion.")
    parity = serialization.check_outputs(reference["y"], model(probe, training=False), atol,
                                         f"{shown} (converted from Keras 2)")
    return model, parity, "the Keras 2 model itself (tf_keras)"


def _load_opaque_checked(path: Path, cfg: SourceConfig, probe: np.ndarray, atol: float,
                         input_shape: Tuple[int, ...], shown: str, key: str):
    """A SavedModel with no Keras model inside, wrapped as one block and checked against the
    function it calls: ``(model, parity, against, block_variables)``."""
    import tensorflow as tf

    model, loaded, endpoint = _load_opaque(path, cfg, input_shape, shown, key)
    function = getattr(loaded, endpoint, None) or loaded.signatures[endpoint]
    direct = function(tf.constant(probe))
    if isinstance(direct, dict):
        direct = next(iter(direct.values()))
    parity = serialization.check_outputs(direct, model(probe, training=False), atol, shown)
    block = model.layers[-1]
    block_variables = [{"name": block_variable_name(v), "shape": str(tuple(v.shape)),
                        "trainable": bool(v.trainable)} for v in block.weights]
    return model, parity, f"the SavedModel's '{endpoint}' function", block_variables


def frozen_block_variables(model) -> List[Tuple[str, np.ndarray]]:
    """The block variables kept out of training by ``source.freeze_variables``, with values."""
    cls = _BLOCK_CLASS
    if cls is None:
        return []
    return [(block_variable_name(v), np.array(v)) for layer in model.layers
            if isinstance(layer, cls) for v in layer.weights if not v.trainable]


def check_frozen_block_variables(before: List[Tuple[str, np.ndarray]], model) -> float:
    """Raises if a variable frozen inside an opaque block moved; returns the largest change."""
    after = dict(frozen_block_variables(model))
    worst, moved = 0.0, []
    for name, value in before:
        change = float(np.max(np.abs(after[name] - value))) if value.size else 0.0
        worst = max(worst, change)
        if change != 0.0:
            moved.append(f"{name} (max abs change {change:.3g})")
    if moved:
        raise VerificationError("Variables frozen by source.freeze_variables changed: "
                                + ", ".join(moved))
    return worst


def block_report(model) -> str:
    """Markdown naming each opaque block of ``model`` and the variables it holds, or ''."""
    cls = _BLOCK_CLASS
    blocks = [layer for layer in model.layers if cls is not None and isinstance(layer, cls)]
    lines = []
    for block in blocks:
        lines += ["", f"`{block.name}` is opaque: the function of the SavedModel {block.filepath}, "
                  f"with no layers inside. Its variables:", "",
                  "| variable | shape | trainable |", "|---|---|---|"]
        lines += [f"| {block_variable_name(v)} | {tuple(v.shape)} | "
                  f"{bool(block.trainable and v.trainable)} |" for v in block.weights]
    return "\n".join(lines) + "\n" if lines else ""


def lineage_tags(source: LoadedSource) -> Dict[str, str]:
    return {"tfharness.source": source.artifact.location, "tfharness.source_kind": source.kind,
            **source.artifact.lineage}


__all__ = ["LoadedSource", "SourceArtifact", "load_source", "detect_kind", "resolve",
           "block_class", "lineage_tags", "frozen_block_variables",
           "check_frozen_block_variables"]
