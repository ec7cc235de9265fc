"""tfharness: train, save, reload, verify and fine-tune a Keras model as one tracked experiment.

``tfharness.run(cfg)`` runs an experiment from Python; ``tfharness.compose([...])`` builds the
config the command line would. Importing this package imports neither TensorFlow nor NumPy, so
``tfharness --help`` answers at once; ``run`` and ``RunResult`` load on first use.
"""

from tfharness import _aliases
from tfharness._version import __version__
from tfharness.errors import (
    ConfigError,
    DataError,
    HarnessError,
    IntegrityError,
    SaveError,
    SourceError,
    TrackingError,
    VerificationError,
)

_aliases.install()

__all__ = ["compose", "run", "RunResult", "HarnessConfig", "HarnessError", "ConfigError",
           "DataError", "SaveError", "IntegrityError", "SourceError", "TrackingError", "VerificationError"]


def __getattr__(name):
    if name in ("run", "RunResult"):
        from tfharness.pipeline import runner

        return getattr(runner, name)
    if name == "compose":
        from tfharness.config.compose import compose

        return compose
    if name == "HarnessConfig":
        from tfharness.config import HarnessConfig

        return HarnessConfig
    if name == "serialization":
        import importlib

        return importlib.import_module("tfharness.artifacts.serialization")
    raise AttributeError(f"module 'tfharness' has no attribute {name!r}")
