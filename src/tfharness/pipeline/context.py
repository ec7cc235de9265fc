"""What one run carries from stage to stage (:class:`RunContext`) and gives back (:class:`RunResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tfharness.config import HarnessConfig


@dataclass
class RunResult:
    """What a run produced, for callers of :func:`tfharness.run` (the CLI, sweeps, tests)."""

    run_id: Optional[str]
    # Each metric's final value, under the name the MLflow run has it (reload/finetuned/...).
    metrics: Dict[str, float] = field(default_factory=dict)
    report: List[Dict] = field(default_factory=list)
    artifacts: Dict[str, Path] = field(default_factory=dict)
    model_uris: Dict[str, str] = field(default_factory=dict)
    # sha256 of each artifact written (see artifacts/integrity.py), by name.
    digests: Dict[str, str] = field(default_factory=dict)
    # reports/source.md of a run that started from a source.
    source: Optional[str] = None
    registered_versions: Dict[str, str] = field(default_factory=dict)
    # The value of sweep.objective, set when the run was asked for it (sweep trials).
    objective: Optional[float] = None
    # The run whose pretrained model this run fine-tuned instead of pretraining (pretrain_cache).
    pretrain_reused_from: Optional[str] = None
    # What tracking.promote decided (tfharness.pipeline.promotion.Decision), if asked.
    promotion: Any = None


@dataclass
class RunContext:
    """Everything the stages of one run share.

    Built before the MLflow run opens (config, data, model, frozen layers: whatever can fail on
    bad input is settled by then); ``ckpt`` is set once the run's checkpoint folder is held.
    """

    cfg: HarnessConfig
    tracker: Any  # tfharness.tracking.Tracker
    data: Any  # tfharness.data.DataBundle
    # A fixed batch to compare each model with its reload on (pretrain data).
    probe: np.ndarray
    # The tf.distribute strategy models are built and compiled under.
    strategy: Any
    # The model to pretrain, or the model loaded from the source.
    model: Any
    # The loaded source (tfharness.sources.LoadedSource), None when built from scratch.
    source: Any
    # The layer names each fine-tune stage freezes, resolved against the planned layers.
    frozen_by_stage: List[set]
    config_hash: str
    # The interrupted run this one continues (tfharness.artifacts.checkpoint.RunState), if any.
    resumed: Any = None
    overrides: Sequence[str] = ()
    # The config as composed (interpolations resolved), recorded as config.yaml.
    resolved_yaml: Optional[str] = None
    # Lineage tags of the source, also set on each logged model.
    lineage: Dict[str, str] = field(default_factory=dict)
    run_name: str = ""
    # What the run records about its data (tfharness.data.records.DataDescription).
    description: Any = None
    # How long loading the data took (data/load_seconds).
    data_seconds: float = 0.0
    ckpt: Any = None  # tfharness.artifacts.checkpoint.RunCheckpoints
    # The pretraining fingerprint (tfharness.pipeline.fingerprint.Fingerprint); None with a
    # source, which does not pretrain.
    fingerprint: Any = None
    # The sweep's parent run, for a sweep job.
    parent_run_id: Optional[str] = None
    # The run whose pretrained model this run reused (pretrain_cache), if any.
    pretrain_reused_from: Optional[str] = None
    result: RunResult = field(default_factory=lambda: RunResult(run_id=None))

    @property
    def pretrained_is_final(self) -> bool:
        """No fine-tuning and no source: the pretrained model is the run's final model, so its
        one measurement on the test split (step 7, on its reloaded copy) is recorded as both
        ``pretrain/test_*`` and ``test/*``."""
        return not self.cfg.finetune.enabled and self.source is None
