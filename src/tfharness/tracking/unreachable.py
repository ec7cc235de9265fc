"""Whether a tracking error means "the server did not answer" (worth a retry or the spool)."""

from __future__ import annotations

# MLflow wraps connection failures in MlflowException with requests' and urllib3's messages, so
# the type alone does not say it: these fragments of those messages do.
UNREACHABLE_MARKERS = ("Connection refused", "Max retries exceeded", "ConnectionError",
                       "Failed to establish a new connection", "Read timed out",
                       "RemoteDisconnected", "Connection aborted")


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, says the server could not be reached."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        text = f"{type(error).__name__}: {error}"
        if any(marker in text for marker in UNREACHABLE_MARKERS):
            return True
        error = error.__cause__ or error.__context__
    return False
