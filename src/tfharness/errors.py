"""Exception types of tfharness.

Every error a user can cause names the config key, the value it got and what is allowed, so the
command line can print one short line instead of a traceback.
"""

from __future__ import annotations

from typing import Any, Iterable


class HarnessError(Exception):
    """Base class of every error tfharness raises on purpose."""


class ConfigError(HarnessError, ValueError):
    """A config value is out of range, of the wrong kind, or refers to something missing."""

    def __init__(self, key: str, got: Any, allowed: str | Iterable[str]):
        if not isinstance(allowed, str):
            allowed = "one of " + ", ".join(str(a) for a in allowed)
        self.key, self.got, self.allowed = key, got, allowed
        super().__init__(f"Invalid value for '{key}': got {got!r}; allowed: {allowed}.")


class DataError(ConfigError):
    """The data named by the config cannot be read or lacks what the config names."""


class VerificationError(HarnessError):
    """A reloaded model does not reproduce the model it was saved from, or frozen weights moved."""


class SaveError(HarnessError):
    """Writing or reading a model artifact failed."""


class IntegrityError(SaveError):
    """An artifact's bytes no longer match the sha256 recorded when tfharness wrote it."""


class SourceError(HarnessError):
    """The artifact named by the ``source`` config group cannot be found, read or trusted."""


class TrackingError(HarnessError):
    """The MLflow tracking store named by ``tracking.uri`` cannot be used."""


class NumericalError(HarnessError):
    """The training loss became NaN or infinite; the phase stopped and the run FAILED."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run: it ends KILLED with its last checkpoint kept.

    A ``KeyboardInterrupt`` so that nothing on the way up swallows it as an ordinary error.
    """

    def __init__(self, signal_name: str):
        self.signal_name = signal_name
        super().__init__(f"interrupted by {signal_name}")
