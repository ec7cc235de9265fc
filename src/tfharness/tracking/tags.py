"""The tags every run carries: what it ran on, where it came from, who ran it."""

from __future__ import annotations

import getpass
import os
import subprocess
from typing import Dict, Optional

from tfharness.tracking.record import provenance_tags


def git_commit(cwd: str | os.PathLike | None = None) -> Optional[str]:
    """The commit checked out in ``cwd``, or None outside a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def user_name() -> str:
    """Who runs this, as MLflow's ``mlflow.user`` tag names them (``mlflow.start_run`` sets it;
    a run created through ``MlflowClient`` gets it from here)."""
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return os.environ["MLFLOW_TRACKING_USERNAME"]
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd)
        return "unknown"


def run_tags(data: str, model: str, extra: Dict[str, str]) -> Dict[str, str]:
    """The tags of a run on ``data`` with ``model``, computed in the process the user started."""
    tags = {"mlflow.user": user_name(), "data": data, "model": model, **provenance_tags(),
            **extra}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
