"""What a run's MLflow record says about it, besides its measurements.

* **Params** hold what defines the model and its training, so the compare view shows what differs
  between runs; operational settings (where files go, how the run is tracked, whether it resumes)
  stay in the ``config.yaml`` artifact, and the folders also in tags.
* **Provenance**: the command the user ran (``command`` tag, and ``mlflow.source.name``, which the
  UI shows as the run's source), the package versions the run used (``version.<package>`` tags),
  and the argument list to re-create it (``tfharness.argv``; see ``tfharness --rerun``).
* **Description**: one line (``mlflow.note.content``, the UI's run description) saying what the
  run did and its final test accuracy.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Dict, Mapping, Optional, Sequence

from tfharness.tracking.naming import is_operational

# Packages whose versions decide what a run computes, as their distributions are named.
VERSIONED_PACKAGES = ("tensorflow", "keras", "mlflow", "hydra-core", "tfharness")
# Operational settings kept as tags (the rest live in the config.yaml artifact only).
OPERATIONAL_TAGS = ("output_dir", "checkpoint_root", "pretrain_cache", "pretrain_wait_s")
ARGV_TAG = "tfharness.argv"
RERUN_OF_TAG = "tfharness.rerun_of"
DESCRIPTION_TAG = "mlflow.note.content"


def split_params(flat: Mapping[str, str]) -> tuple:
    """``(params, tags)``: the flattened config split into what defines the model and its training
    (MLflow params) and the operational folders, as tags; other operational keys are dropped
    (they are in ``config.yaml``)."""
    params = {k: v for k, v in flat.items() if not is_operational(k)
              and not k.startswith(("sweep.max_failure_rate", "sweep.register_best"))}
    tags = {k: flat[k] for k in OPERATIONAL_TAGS if k in flat}
    return params, tags


def program(argv: Sequence[str]) -> str:
    """How the user started tfharness: ``tfharness``, ``python -m tfharness``, or their script."""
    first = argv[0] if argv else ""
    name = os.path.basename(first)
    if name in ("tfharness", "__main__.py") or first.endswith(os.path.join("tfharness",
                                                                           "__main__.py")):
        return "tfharness" if name == "tfharness" else "python -m tfharness"
    if name.startswith("pytest") or "pytest" in first:
        return "pytest"
    return first or "python"


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command the user ran, as they would type it again (``tfharness -m lr=...``)."""
    argv = list(sys.argv if argv is None else argv)
    if program(argv) == "pytest":
        return "pytest"
    return " ".join([program(argv), *map(shlex.quote, argv[1:])]).strip()


def source_name(argv: Optional[Sequence[str]] = None) -> str:
    """``mlflow.source.name``: the command, as much of it as the UI shows whole.

    The UI shows only what follows the last ``/`` of a local source, so a command whose
    arguments hold a path is named by its program (and ``-m`` for a sweep); the ``command`` tag
    always has it whole.
    """
    argv = list(sys.argv if argv is None else argv)
    full = command_line(argv)
    if "/" not in full:
        return full
    head = program(argv)
    if "/" in head:
        head = os.path.basename(head)
    return f"{head} -m" if any(a in ("-m", "--multirun") for a in argv[1:]) else head


def model_tags(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """The tags of a run that its logged models carry too (their "Logged from")."""
    return {"mlflow.source.name": source_name(argv)[:500], "mlflow.source.type": "LOCAL"}


def package_versions() -> Dict[str, str]:
    """``{"tensorflow": "2.21.0", ...}`` of the packages a run's results depend on."""
    from importlib import metadata

    versions = {}
    for package in VERSIONED_PACKAGES:
        for dist in (package, f"{package}-cpu", f"{package}-skinny"):
            try:
                versions[package] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def provenance_tags(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """The tags that say how a run came to be: command, source, package versions, argv."""
    argv = list(sys.argv if argv is None else argv)
    tags = {"command": command_line(argv)[:5000],
            "mlflow.source.name": source_name(argv)[:500],
            "mlflow.source.type": "LOCAL",
            ARGV_TAG: json.dumps(argv[1:])[:5000]}
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    return tags


def describe(*, what: str, metrics: Mapping[str, float]) -> str:
    """One line for ``mlflow.note.content``: what the run did, then its final test accuracy."""
    if "test/accuracy" in metrics:
        result = f"test accuracy {metrics['test/accuracy']:.4f}"
    elif "test/loss" in metrics:  # metrics without accuracy (trainer.metrics)
        result = f"test loss {metrics['test/loss']:.4f}"
    else:
        result = "no test split"
    return f"{what}: {result}."


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def run_summary(cfg, source_kind: Optional[str], finetune_stages: Sequence) -> str:
    """What a run did, in words: ``mlp on digits, pretrained 5 epochs, fine-tuned ...``."""
    from tfharness.config.targets import option_name

    model, data = option_name(cfg.model), option_name(cfg.data)
    start = (f"{model} on {data}, pretrained {_epochs(cfg.trainer.epochs)}"
             if source_kind is None else f"{source_kind} source on {data}")
    if not cfg.finetune.enabled:
        return start
    if len(finetune_stages) == 1:
        stage = finetune_stages[0]
        return (f"{start}, fine-tuned {_epochs(stage.epochs)} at lr {stage.learning_rate:g} "
                f"({cfg.finetune.name})")
    stages = ", ".join(f"{s.name} {_epochs(s.epochs)} at lr {s.learning_rate:g}"
                       for s in finetune_stages)
    return f"{start}, fine-tuned in stages ({stages})"
