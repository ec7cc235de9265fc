"""The command line: a thin Hydra layer over :func:`tfharness.runner.run`.

Hydra composes and type-checks the config, handles ``--help``, ``--cfg job`` and ``-m``; this
module only turns the result into a call of the runner and turns tfharness errors into one short
line (the full traceback with ``HYDRA_FULL_ERROR=1``). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# TensorFlow's C++ start-up chatter hides the run's own output; keep warnings and errors only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow draws a download progress bar for every logged model it validates: noise in a log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import hydra  # noqa: E402
from hydra.errors import CompactHydraException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tfharness import heap  # noqa: E402
from tfharness.config import register_configs  # noqa: E402
from tfharness.config.compose import compose  # noqa: E402,F401 (tfharness.cli.compose, as before)
from tfharness.config.targets import import_current_folder  # noqa: E402
from tfharness.errors import HarnessError, RunInterrupted  # noqa: E402

register_configs()
log = logging.getLogger("tfharness")


class HarnessCommandError(CompactHydraException):
    """Printed by Hydra as its message alone, with exit status 1."""


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from tfharness.tracking import naming
    from tfharness.pipeline.runner import run
    from tfharness.rerun import RERUN_OF_ENV
    from tfharness.tracking.record import RERUN_OF_TAG
    from tfharness.sweeps import PARENT_RUN_ENV, SWEPT_KEYS_ENV, SWEPT_TAG

    hydra_cfg = HydraConfig.get()
    overrides: List[str] = list(hydra_cfg.overrides.task)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    # A sweep's job is named by its values of the swept keys, a single run by its overrides.
    swept = [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k] if in_sweep else []
    if not cfg.tracking.run_name:
        cfg.tracking.run_name = naming.run_name(overrides, swept) or None
    if in_sweep and not any(o.startswith("print_report=") for o in overrides):
        # One table per job would bury the sweep's own trial table at the end.
        cfg.print_report = False
    tags = {"tfharness.job_num": str(hydra_cfg.job.num)} if in_sweep else {}
    if swept:
        values = naming.override_values(overrides)
        tags[SWEPT_TAG] = " ".join(f"{k}={values[k]}" for k in swept if k in values)
    if os.environ.get(RERUN_OF_ENV):
        tags[RERUN_OF_TAG] = os.environ[RERUN_OF_ENV]
    parent_run_id = os.environ.get(PARENT_RUN_ENV) if in_sweep else None
    try:
        result = run(cfg, overrides=overrides, tags=tags, parent_run_id=parent_run_id,
                     require_objective=in_sweep)
    except Exception as error:
        if parent_run_id and cfg.tracking.name != "off":
            from tfharness.sweeps import record_failed_trial

            try:
                record_failed_trial(cfg, parent_run_id, hydra_cfg.job.num,
                                    cfg.tracking.run_name or ",".join(overrides), error)
            except Exception as record_error:  # the trial's own error matters more
                log.warning("Could not record the failed trial in MLflow: %s", record_error)
        if not isinstance(error, HarnessError):
            raise
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise HarnessCommandError(f"tfharness: {error}") from None
    # What Hydra's sweepers optimize (Optuna): sweep.objective, checked finite by the runner.
    return result.objective


def config_groups(config_dir: Optional[str | os.PathLike] = None) -> str:
    """``group: option, option`` lines of the config groups, read off the packaged folder and
    the user's ``config_dir``."""
    from importlib.resources import files

    groups: Dict[str, set] = {}
    roots = [files("tfharness.conf"), *([Path(config_dir)] if config_dir is not None else [])]
    for root in roots:
        for folder in root.iterdir():
            if folder.is_dir() and folder.name != "__pycache__":
                groups.setdefault(folder.name, set()).update(
                    p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
    return "\n".join(f"{group}: {', '.join(sorted(options))}"
                     for group, options in sorted(groups.items()) if options)


def fast_help(overrides: Sequence[str], config_dir: Optional[str] = None) -> str:
    """What Hydra's ``--help`` prints with this app's template, without its slow group scan.

    Hydra builds the group listing by composing the config once per group option (and lists
    Hydra's own groups that the template then drops); listing the config folders gives the
    same lines at once.
    """
    from omegaconf import OmegaConf, open_dict

    cfg = compose(overrides, return_hydra_config=True, config_dir=config_dir)
    header, footer = cfg.hydra.help.header, cfg.hydra.help.footer
    with open_dict(cfg):
        del cfg["hydra"]
    return (f"{header}\n== Configuration groups ==\nCompose your configuration from those "
            f"groups (group=option)\n\n{config_groups(config_dir)}\n\n\n== Config ==\nOverride anything "
            f"in the config (foo.bar=value)\n\n{OmegaConf.to_yaml(cfg)}\n\n{footer}\n\n")


def split_config_dir(args: Sequence[str]) -> tuple:
    """Hydra's ``--config-dir DIR`` (``-cd DIR``, ``--config-dir=DIR``) and the other args."""
    config_dir, rest, items = None, [], iter(args)
    for arg in items:
        if arg in ("--config-dir", "-cd"):
            config_dir = next(items, None)
        elif arg.startswith("--config-dir="):
            config_dir = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return config_dir, rest


# Threads that load what a run needs while it checks its input (see tfharness.pipeline.prepare
# and tfharness.tracking.tracker); a run that failed before it needed them leaves them behind.
LOADING_THREADS = ("tfharness-import-tensorflow", "tfharness-mlflow-connect")


def exit_now(code) -> None:
    """Exits with ``code`` at once when a loading thread is still importing TensorFlow or MLflow
    (a bad input found while they load); returns otherwise.

    The interpreter's normal shutdown would first wait for those imports and can crash while
    a thread is inside one; ``os._exit`` ends the process without it, once the error is written
    and the logs flushed. A connect thread that began to create the store is not among them:
    the tracker waited for it before the run let go (tracker.finish).
    """
    import threading

    if code in (None, 0) or not any(t.is_alive() and t.name in LOADING_THREADS
                                    for t in threading.enumerate()):
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 1)


def main() -> None:
    """Entry point of the ``tfharness`` command and ``python -m tfharness``."""
    args = sys.argv[1:]
    # The user's modules import from the current folder, as with `python -m tfharness`.
    import_current_folder()
    if any(a == "--rerun" or a.startswith("--rerun=") for a in args):
        from tfharness.rerun import rerun_args

        try:
            args = rerun_args(args)
        except HarnessError as error:
            sys.stderr.write(f"tfharness: {error}\n")
            sys.exit(1)
        sys.argv = [sys.argv[0], *args]
    plain_help = ("--help" in args or "-h" in args) and not any(
        a.startswith("--hydra") or a in ("-m", "--multirun", "--cfg", "-c") for a in args)
    if plain_help:
        config_dir, rest = split_config_dir([a for a in args if a not in ("--help", "-h")])
        try:
            text = fast_help(rest, config_dir)
        except Exception:
            # A bad override: let Hydra compose and report it as it always does.
            _hydra_main()
            return
        sys.stdout.write(text)
        return
    from tfharness import sweeps
    from tfharness.pipeline import ending

    atexit.register(heap.freeze_at_exit)

    sweeps.ACTIVE = None
    ending.LEAVE_IMPORTS_RUNNING = True
    exiting: Optional[SystemExit] = None
    try:
        _hydra_main()
    except SystemExit as error:  # Hydra's exit after it reported a failed run
        exiting = error
        raise
    except RunInterrupted as interrupted:
        # The run is already KILLED in MLflow with its checkpoint kept (see runner.run).
        sys.stderr.write(f"tfharness: {interrupted}; the run is KILLED, its checkpoint kept: "
                         f"repeat the command with resume=true to continue it\n")
        number = getattr(signal, interrupted.signal_name, signal.SIGINT)
        sys.exit(128 + int(number))
    finally:
        # Hydra's basic sweeper raises on a failed job before its end-of-sweep callback:
        # the parent run is summarized and ended here then.
        summary = sweeps.finish_active()
        if exiting is not None:
            exit_now(exiting.code)  # after the sweep's parent run has ended
    failed = sweeps.ACTIVE is not None and (
        sweeps.ACTIVE.error is not None or (summary is not None and summary.failed))
    if failed:
        # Sweepers that tolerate failures (Optuna, max_failure_rate) would exit 0.
        sys.exit(1)


if __name__ == "__main__":
    main()
