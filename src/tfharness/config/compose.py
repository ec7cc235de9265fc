"""Composing the packaged config as the command line would, from Python (tests, ``--rerun``).

It lives with the config, not the command line, so that code the command line calls (such as
``tfharness.rerun``) can compose without importing the command line back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import DictConfig

from tfharness.config import register_configs

# The schemas each YAML option names must be in Hydra's ConfigStore before anything composes.
register_configs()


def compose(overrides: Sequence[str] = (), config_name: str = "config", *,
            return_hydra_config: bool = False,
            config_dir: Optional[str | os.PathLike] = None) -> DictConfig:
    """Composes the packaged config with ``overrides``, as the command line would.

    For use from Python and tests; set ``output_dir`` (it defaults to Hydra's run folder,
    which exists only under the command line). ``return_hydra_config`` keeps the ``hydra``
    node (launcher, sweeper) in the result. ``config_dir`` adds a folder of the user's own
    options to every group, as ``--config-dir`` does on the command line.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("tfharness.conf", version_base="1.3"):
        return hydra_compose(config_name=config_name,
                             overrides=[*search_path(config_dir), *overrides],
                             return_hydra_config=return_hydra_config)


def search_path(config_dir: Optional[str | os.PathLike]) -> List[str]:
    """The override that adds ``config_dir`` to Hydra's config search path ([] for None)."""
    if config_dir is None:
        return []
    return [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"]
