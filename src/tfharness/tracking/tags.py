"""The tags every run carries: what it ran on, where it came from, who ran it."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from typing import Dict, Optional


def git_commit(cwd: str | os.PathLike | None = None) -> Optional[str]:
    """The commit checked out in ``cwd``, or None outside a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def system_tags() -> Dict[str, str]:
    """MLflow's documented system tags that ``mlflow.start_run`` sets (a run created through
    ``MlflowClient`` gets none): who ran it and from what."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd)
        user = "unknown"
    return {"mlflow.user": os.environ.get("MLFLOW_TRACKING_USERNAME") or user,
            "mlflow.source.name": sys.argv[0] or "<console>",
            "mlflow.source.type": "LOCAL"}


def run_tags(data: str, model: str, extra: Dict[str, str]) -> Dict[str, str]:
    """The tags of a run on ``data`` with ``model``, computed in the process the user started."""
    tags = {**system_tags(), "data": data, "model": model, "command": " ".join(sys.argv),
            **extra}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
