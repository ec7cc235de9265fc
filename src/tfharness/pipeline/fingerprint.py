"""The pretraining fingerprint: a digest of everything that decides what pretraining produces.

Two runs with the same fingerprint pretrain the same model (exactly the same with
``trainer.deterministic=true``), so a later run may reuse the first one's (see
:mod:`tfharness.pipeline.pretrain_cache`). What goes in:

- the data option (its ``_target_`` and keys, less the ``finetune*`` keys that shape only the
  fine-tuning data) and the digest of the pretraining data itself (the dataset digests of its
  train, validation and test parts, see :mod:`tfharness.data.records`);
- the model option, every key;
- the trainer settings (``trainer.verbose`` aside), the seed among them;
- the source (only ``scratch`` pretrains);
- the versions of tfharness, TensorFlow and Keras.

The digest is the run tag ``tfharness.pretrain_fingerprint`` (searchable with
``MlflowClient.search_runs``); what went into it is the run's ``pretrain_fingerprint.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict

from tfharness._version import __version__
from tfharness.config import HarnessConfig
from tfharness.config import targets
from tfharness.data import records

FINGERPRINT_TAG = "tfharness.pretrain_fingerprint"
FINGERPRINT_FILE = "pretrain_fingerprint.json"
# Trainer keys that do not change what is trained.
UNFINGERPRINTED_TRAINER_KEYS = ("verbose",)


@dataclass
class Fingerprint:
    """The digest (sha256 hex) and the parts it was computed from."""

    digest: str
    parts: Dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"fingerprint": self.digest, **self.parts}, indent=1, sort_keys=True,
                          default=str) + "\n"


def pretrain_data_digest(description: records.DataDescription) -> str:
    """The digest of the pretraining data: its parts' dataset digests (not the fine-tune data)."""
    parts = sorted((key, record.name, record.digest) for key, record in description.splits.items()
                   if key.startswith("pretrain/"))
    return records.sha256_of("pretrain-data", parts, description.class_names.get("pretrain"))


def fingerprint(cfg: HarnessConfig, description: records.DataDescription) -> Fingerprint:
    """The fingerprint of ``cfg``'s pretraining on the data ``description`` describes.

    TensorFlow must be imported already (its version is part of it).
    """
    import keras
    import tensorflow as tf

    data = {k: v for k, v in targets.options_of(cfg.data).items()
            if not str(k).startswith("finetune")}
    trainer = {k: v for k, v in dataclasses.asdict(cfg.trainer).items()
               if k not in UNFINGERPRINTED_TRAINER_KEYS}
    parts = {
        "data": {"option": targets.option_name(cfg.data), "keys": data,
                 "digest": pretrain_data_digest(description)},
        "model": {"option": targets.option_name(cfg.model),
                  "keys": targets.options_of(cfg.model)},
        "trainer": trainer,
        "seed": cfg.trainer.seed,
        "source": cfg.source.name,
        "versions": {"tfharness": __version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__},
    }
    # Round-tripped through JSON so that what is hashed is exactly what the artifact shows.
    parts = json.loads(json.dumps(parts, sort_keys=True, default=str))
    return Fingerprint(records.sha256_of("pretrain-fingerprint/1", parts), parts)
