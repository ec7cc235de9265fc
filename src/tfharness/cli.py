"""The command line: a thin Hydra layer over :func:`tfharness.runner.run`.

Hydra composes and type-checks the config, handles ``--help``, ``--cfg job`` and ``-m``; this
module only turns the result into a call of the runner and turns tfharness errors into one short
line (the full traceback with ``HYDRA_FULL_ERROR=1``). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

# TensorFlow's C++ start-up chatter hides the run's own output; keep warnings and errors only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from hydra.errors import CompactHydraException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tfharness.config import register_configs  # noqa: E402
from tfharness.errors import HarnessError  # noqa: E402

register_configs()


class HarnessCommandError(CompactHydraException):
    """Printed by Hydra as its message alone, with exit status 1."""


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Composes the packaged config with ``overrides``, as the command line would.

    For use from Python and tests; set ``output_dir`` (it defaults to Hydra's run folder,
    which exists only under the command line).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("tfharness.conf", version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig

    from tfharness.runner import run

    hydra_cfg = HydraConfig.get()
    overrides: List[str] = list(hydra_cfg.overrides.task)
    if not cfg.tracking.run_name and hydra_cfg.job.override_dirname:
        cfg.tracking.run_name = hydra_cfg.job.override_dirname
    try:
        result = run(cfg, overrides=overrides)
    except HarnessError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise HarnessCommandError(f"tfharness: {error}") from None
    # Returned for Hydra sweepers (Optuna optimizes the task function's return value).
    return result.metrics.get("test/accuracy")


def main() -> None:
    """Entry point of the ``tfharness`` command and ``python -m tfharness``."""
    _hydra_main()


if __name__ == "__main__":
    main()
