"""Promote only a better model: ``tracking.promote=<alias>``.

The new version of a registered model (``tracking.register``, or ``sweep.register_best`` for the
best trial of a sweep) gets the alias only when its metric (``tracking.promote_metric``, else
``sweep.objective``, compared in ``sweep.direction``) is better than the alias's current
holder's by at least ``tracking.promote_min_delta``. Both models are evaluated in this run on the
same held-out data: the final model's validation or test part, as the metric's name says
(``test/<m>``, ``<phase>/val_<m>``, ``<phase>/test_<m>``). The holder is loaded from the registry
as a ``source=mlflow`` model is (sha256 checked). The first version of a name is promoted; a
holder that cannot be evaluated on this run's data (another input shape, say) is not replaced.

Each run records the comparison: a table (``promotion/comparison.json`` and ``.md``), printed
too, the metrics ``promotion/candidate`` and ``promotion/champion``, and the tag
``tfharness.promotion`` saying what was decided and why. In a sweep each trial measures both and
the sweep's end decides for its best trial (:mod:`tfharness.sweeps`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tfharness import data as data_lib
from tfharness import sources as sources_lib
from tfharness.config import HarnessConfig, MlflowSourceConfig
from tfharness.errors import HarnessError
from tfharness.pipeline.context import RunContext

log = logging.getLogger("tfharness")

PROMOTION_TAG = "tfharness.promotion"
# The alias holder a trial was compared with: "<name>/<version>", or "none".
CHAMPION_TAG = "tfharness.promotion.champion"
COMPARISON_TABLE = "promotion/comparison.json"
COMPARISON_MARKDOWN = "promotion/comparison.md"
CANDIDATE_METRIC = "promotion/candidate"
CHAMPION_METRIC = "promotion/champion"


@dataclass
class Decision:
    """What was compared and what was decided."""

    registered_name: str
    alias: str
    metric: str
    direction: str
    min_delta: float
    data: str
    candidate: float
    candidate_label: str = "this run's model"
    champion: Optional[float] = None
    champion_version: Optional[str] = None
    promoted: bool = False
    reason: str = ""

    def rows(self) -> List[Dict]:
        """The comparison table: one row per model."""
        decision = "promoted" if self.promoted else "not promoted"
        holder = (f"{self.registered_name}@{self.alias} (version {self.champion_version})"
                  if self.champion_version else f"{self.registered_name}@{self.alias}: none")
        return [{"model": self.candidate_label, "metric": self.metric, "value": self.candidate,
                 "data": self.data, "decision": decision},
                {"model": holder, "metric": self.metric, "value": self.champion,
                 "data": self.data, "decision": "keeps the alias" if not self.promoted
                 and self.champion_version else "-"}]

    def summary(self) -> str:
        verb = "promoted to" if self.promoted else "not promoted to"
        return f"{verb} {self.registered_name}@{self.alias}: {self.reason}"


def held_out(metric: str) -> Tuple[str, str]:
    """``(part, keras metric)`` a promotion metric is measured on: ``test/accuracy`` ->
    ``("test", "accuracy")``, ``finetune/val_loss`` -> ``("val", "loss")``."""
    prefix, _, name = metric.partition("/")
    if prefix == "test":
        return "test", name
    part, _, keras_name = name.partition("_")
    return part, keras_name


def decide(candidate: float, champion: Optional[float], direction: str,
           min_delta: float) -> Tuple[bool, str]:
    """Whether the candidate takes the alias, and why: strictly better by >= ``min_delta``."""
    if champion is None:
        return True, "no model holds the alias yet"
    gain = candidate - champion if direction == "maximize" else champion - candidate
    if gain > 0 and gain >= min_delta:
        return True, f"better by {gain:.6g} (>= promote_min_delta {min_delta:g})"
    return False, (f"better by only {gain:.6g} (< promote_min_delta {min_delta:g})" if gain > 0
                   else f"not better ({'higher' if direction == 'minimize' else 'lower'} or "
                        f"equal: {candidate:.6g} against {champion:.6g})")


def evaluate_part(cfg: HarnessConfig, model, split, part: str, keras_name: str,
                  label: str) -> float:
    """``keras_name`` of ``model`` on the ``part`` (val or test) of ``split``."""
    from tfharness.pipeline.train import compile_for, replicas

    features = getattr(split, part)
    if not data_lib.has_samples(features):
        raise HarnessError(f"tracking.promote: the {part} data of this run is empty; nothing to "
                           f"compare {label} on")
    compile_for(cfg, model, "sgd", 0.0)
    batches = data_lib.fit_input(features, cfg.trainer.batch_size, shuffle=False, seed=0,
                                 pad_to_multiple=replicas(model))[0]
    values = model.evaluate(batches, verbose=0, return_dict=True)
    if keras_name not in values:
        raise HarnessError(f"tracking.promote: {label} reports {', '.join(sorted(values))}, "
                           f"not {keras_name!r}")
    return float(values[keras_name])


def current_holder(client, name: str, alias: str):
    """The model version holding ``alias`` (None: the name or the alias does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def compare(ctx: RunContext, final_model, final_split, name: str) -> Decision:
    """Evaluates this run's final model and the holder of the alias on the same held-out data."""
    import mlflow

    cfg = ctx.cfg
    alias, metric = cfg.tracking.promote, cfg.tracking.promote_metric or cfg.sweep.objective
    part, keras_name = held_out(metric)
    phase = "finetune" if cfg.finetune.enabled else "pretrain"
    decision = Decision(name, alias, metric, cfg.sweep.direction, cfg.tracking.promote_min_delta,
                        data=f"{phase}/{part} of this run",
                        candidate=evaluate_part(cfg, final_model, final_split, part, keras_name,
                                                "this run's model"))
    holder = current_holder(mlflow.MlflowClient(cfg.tracking.uri), name, alias)
    if holder is not None:
        decision.champion_version = str(holder.version)
        try:
            loaded = sources_lib.load_source(
                MlflowSourceConfig(uri=f"models:/{name}/{holder.version}"),
                tracking_uri=cfg.tracking.uri, workdir=Path(cfg.output_dir) / "champion",
                input_shape=ctx.data.input_shape, probe=ctx.probe,
                atol=cfg.save_format.verify_atol)
            decision.champion = evaluate_part(cfg, loaded.model, final_split, part, keras_name,
                                              f"{name}@{alias}")
        except HarnessError as error:
            decision.reason = (f"{name}@{alias} (version {holder.version}) cannot be evaluated "
                               f"on this run's data, so it is not replaced: {error}")
            return decision
    decision.promoted, decision.reason = decide(decision.candidate, decision.champion,
                                                decision.direction, decision.min_delta)
    return decision


def record(tracker, decision: Decision, *, decided: bool = True) -> None:
    """Logs the comparison (table, Markdown, metrics, tags) on the run ``tracker`` records.

    ``decided=False``: a sweep trial, whose comparison the sweep's end decides on.
    """
    tracker.log_metrics({CANDIDATE_METRIC: decision.candidate,
                         **({CHAMPION_METRIC: decision.champion}
                            if decision.champion is not None else {})})
    holder = (f"{decision.registered_name}/{decision.champion_version}"
              if decision.champion_version else "none")
    tags = {CHAMPION_TAG: holder}
    if not decided:
        tags[PROMOTION_TAG] = "measured for the sweep's decision" + (
            f": {decision.reason}" if decision.reason else "")
    else:
        log.info("tracking.promote: %s", decision.summary())
        tags[PROMOTION_TAG] = decision.summary()
        tracker.log_table(decision.rows(), COMPARISON_TABLE)
        tracker.log_text(markdown(decision), COMPARISON_MARKDOWN)
    tracker.set_tags(tags)


def markdown(decision: Decision) -> str:
    from tfharness.tracking import markdown_table

    return (f"# Promotion to {decision.registered_name}@{decision.alias}\n\n"
            f"{markdown_table(decision.rows())}\n"
            f"Compared on {decision.metric} ({decision.direction}), {decision.data}: "
            f"{decision.summary()}.\n")


def print_decision(decision: Decision) -> None:
    """The comparison table and the decision, on the console."""
    from rich.console import Console
    from rich.table import Table

    from tfharness.tracking import format_cell

    console = Console()
    if not console.is_terminal:
        console.width = 160
    rows = decision.rows()
    table = Table(title=f"Promotion to {decision.registered_name}@{decision.alias} on "
                        f"{decision.metric} ({decision.direction})")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(format_cell(value) for value in row.values()))
    console.print(table)
    console.print(decision.summary())
