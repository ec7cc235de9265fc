"""``tfharness --rerun RUN_ID [overrides]``: a run re-created from its MLflow record.

A run records the overrides it was composed with (the ``overrides.yaml`` artifact), and a sweep's
parent the command's arguments (the ``tfharness.argv`` tag). Re-running composes the same config
again from them: a single run or one trial of a sweep runs again as a single run, a sweep's parent
runs the whole sweep again. Overrides given after the run id are applied on top (the same key
given again replaces the recorded value). The new run is tagged ``tfharness.rerun_of``. A run
recorded with other package versions than the ones installed gets a warning: the config is the
same, the numbers may not be.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, List

import yaml

from tfharness.errors import ConfigError

log = logging.getLogger("tfharness")

RERUN_OF_ENV = "TFHARNESS_RERUN_OF"
# Overrides that belong to the recorded run's invocation, not to its config: a re-run writes
# into a new folder, starts a new run, and is named anew (it is tagged with the run it repeats).
NOT_REPEATED = ("output_dir", "resume", "tracking.run_name", "hydra.run.dir", "hydra.sweep.dir")


def _split(args: List[str]) -> tuple:
    """``(run_id, other args)`` from a command line holding ``--rerun ID`` or ``--rerun=ID``."""
    rest, run_id, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if arg == "--rerun":
            if i + 1 >= len(args):
                raise ConfigError("--rerun", None, "a run id: tfharness --rerun RUN_ID")
            run_id, i = args[i + 1], i + 2
            continue
        if arg.startswith("--rerun="):
            run_id = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return run_id, rest


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def recorded_args(client, run_id: str) -> List[str]:
    """The arguments that compose ``run_id``'s config again (a parent: its sweep command)."""
    from tfharness.tracking.record import ARGV_TAG

    run = client.get_run(run_id)
    if run.data.tags.get("tfharness.sweep") == "parent":
        return json.loads(run.data.tags[ARGV_TAG])
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, "overrides.yaml", folder)
        except Exception as exc:
            raise ConfigError("--rerun", run_id, "a tfharness run that recorded overrides.yaml "
                                                 f"({type(exc).__name__})") from None
        overrides = yaml.safe_load(Path(path).read_text()) or []
    return [o for o in overrides if _key(o) not in NOT_REPEATED]


def rerun_args(args: List[str]) -> List[str]:
    """The command-line arguments that re-create the run named by ``--rerun`` in ``args``.

    The run is looked up in the tracking store the other arguments select (``tracking.uri=...``,
    default ``sqlite:///mlflow.db``). Raises :class:`ConfigError` for an unknown run id.
    """
    import mlflow

    from tfharness.config.compose import compose
    from tfharness.tracking.record import package_versions

    run_id, extra = _split(args)
    overrides = [a for a in extra if not a.startswith("-")]
    uri = compose(overrides).tracking.uri
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except Exception:
        raise ConfigError("--rerun", run_id, f"the id of a run in the tracking store {uri} "
                                             f"(set tracking.uri=... to look elsewhere)") from None
    recorded = recorded_args(client, run_id)
    replaced = {_key(a) for a in extra if "=" in a}
    args = [a for a in recorded if "=" not in a or _key(a) not in replaced] + extra
    _warn_on_versions(run.data.tags, package_versions())
    log.warning("Re-running MLflow run %s (%s): tfharness %s", run_id, run.info.run_name,
                " ".join(args))
    os.environ[RERUN_OF_ENV] = run_id
    return args


def _warn_on_versions(tags: Dict[str, str], installed: Dict[str, str]) -> None:
    changed = [f"{name} {tags[f'version.{name}']} -> {version}"
               for name, version in installed.items()
               if tags.get(f"version.{name}", version) != version]
    if changed:
        log.warning("The run was recorded with other package versions (%s): same config, the "
                    "numbers may differ", ", ".join(changed))
