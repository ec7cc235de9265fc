"""tfharness: train, save, reload, verify and fine-tune a Keras model as one tracked experiment.

``tfharness.run(cfg)`` runs an experiment from Python; ``tfharness.compose([...])`` builds the
config the command line would. Importing this package does not import TensorFlow.
"""

from tfharness.cli import compose
from tfharness.config import HarnessConfig
from tfharness.errors import ConfigError, DataError, HarnessError, SaveError, VerificationError
from tfharness.runner import RunResult, run

__version__ = "0.1.0"
__all__ = ["compose", "run", "RunResult", "HarnessConfig", "HarnessError", "ConfigError",
           "DataError", "SaveError", "VerificationError"]
