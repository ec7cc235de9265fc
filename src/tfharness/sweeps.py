"""Sweeps in MLflow: one parent run per ``-m`` sweep, one nested child run per job.

Hydra calls :class:`SweepCallback` (configured under ``hydra.callbacks``) in the process that
launches the jobs. Before any job starts it creates the MLflow database, the experiment and the
parent run (so parallel jobs never race on a fresh SQLite schema), and hands the parent's id to
every job through ``hydra.job.env_set``, which Hydra applies in the job's own process on any
launcher (basic, joblib, Ray, Slurm). When the sweep ends it reads the children back from MLflow
and records on the parent: the best trial, a table of all trials, plots, and optionally the best
model registered with the alias ``champion``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, flag_override

log = logging.getLogger("tfharness")

PARENT_RUN_ENV = "TFHARNESS_PARENT_RUN_ID"
# The swept keys, comma-separated, handed to every job like the parent's id: a job names its run
# by its values of them (tfharness.tracking.naming).
SWEPT_KEYS_ENV = "TFHARNESS_SWEPT_KEYS"
SWEPT_TAG = "tfharness.swept"
SWEEP_TAG = "tfharness.sweep"
TRIALS_TABLE = "sweep/trials.json"
CHAMPION_ALIAS = "champion"


@dataclass
class Trial:
    """One job of a sweep as MLflow recorded it."""

    number: Optional[int]
    run_id: str
    run_name: str
    status: str
    objective: Optional[float]
    params: Dict[str, str]
    error: Optional[str] = None
    # How the trial got its pretrained model: "trained", "reused <run id>" (pretrain_cache).
    pretrain: str = "-"
    metrics: Dict[str, float] = field(default_factory=dict)
    tags: Dict[str, str] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return (self.status == "FINISHED" and self.objective is not None
                and math.isfinite(self.objective))


@dataclass
class SweepSummary:
    parent_run_id: str
    objective: str
    direction: str
    trials: List[Trial] = field(default_factory=list)
    # Jobs that failed before they could open a run (counted by Hydra, not in MLflow).
    unrecorded_failures: int = 0

    @property
    def failed(self) -> int:
        return sum(not t.succeeded for t in self.trials) + self.unrecorded_failures

    @property
    def best(self) -> Optional[Trial]:
        ranked = self.ranked()
        return ranked[0] if ranked and ranked[0].succeeded else None

    def ranked(self) -> List[Trial]:
        """Successful trials best first, then the failed ones in job order."""
        sign = -1.0 if self.direction == "maximize" else 1.0
        # Ties go to the earlier trial, as Optuna's best_trial does.
        good = sorted((t for t in self.trials if t.succeeded),
                      key=lambda t: (sign * t.objective, t.number or 0))
        bad = sorted((t for t in self.trials if not t.succeeded), key=lambda t: t.number or 0)
        return good + bad

    def rows(self, swept: List[str]) -> List[Dict[str, Any]]:
        return [{"trial": t.number, "run_id": t.run_id, "status": t.status,
                 self.objective: t.objective, "pretrain": t.pretrain,
                 **{k: t.params.get(k) for k in swept}}
                for t in self.ranked()]


def swept_keys(cfg: DictConfig) -> Dict[str, str]:
    """The swept keys of a sweep and their spaces: ``{"finetune.learning_rate": "1e-2,1e-3"}``.

    From the command line for Hydra's basic sweeper, and from ``hydra.sweeper.params`` for
    sweepers that keep their search space in config (Optuna).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space: Dict[str, str] = {}
    params = OmegaConf.select(cfg, "hydra.sweeper.params")
    if params:
        space.update({str(k): str(v) for k, v in params.items()})
    parser = OverridesParser.create()
    for override in parser.parse_overrides(list(cfg.hydra.overrides.task)):
        if override.is_sweep_override():
            # As typed: "1e-2,1e-3", "range(1,4)", "glob(*)".
            space[override.get_key_element()] = override.input_line.split("=", 1)[1]
    return space


def param_key(key: str, params: Dict[str, str]) -> str:
    """The MLflow param a swept key lands in: a group choice ``model`` is ``model.name``."""
    key = key.lstrip("+~")
    if key in params:
        return key
    # A user's option may have no name: its _target_ tells the trials apart.
    return next((f"{key}.{field}" for field in ("name", "_target_") if f"{key}.{field}" in params),
                key)


def collect(client, experiment_id: str, parent_run_id: str, objective: str,
            direction: str) -> SweepSummary:
    """Reads a sweep's children back from MLflow."""
    runs = client.search_runs([experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10000)
    summary = SweepSummary(parent_run_id, objective, direction)
    for run in runs:
        number = run.data.tags.get("tfharness.job_num")
        summary.trials.append(Trial(
            number=int(number) if number is not None else None,
            run_id=run.info.run_id,
            run_name=run.info.run_name,
            status=run.info.status,
            objective=run.data.metrics.get(objective),
            params=dict(run.data.params),
            error=run.data.tags.get("error"),
            pretrain=pretrain_of(run.data.tags),
            metrics=dict(run.data.metrics),
            tags=dict(run.data.tags),
        ))
    return summary


def pretrain_of(tags: Dict[str, str]) -> str:
    """The trials table's ``pretrain`` cell: ``trained``, or ``reused <run id>``."""
    from tfharness.pipeline.pretrain_cache import PRETRAIN_TAG, REUSED_FROM_TAG

    if tags.get(PRETRAIN_TAG) == "reused":
        return f"reused {tags.get(REUSED_FROM_TAG, '?')}"
    return tags.get(PRETRAIN_TAG, "-")


def describe_sweep(summary: SweepSummary, swept: List[str]) -> str:
    """The parent run's one-line description: what was swept, how it went, the best trial."""
    from tfharness.tracking.naming import values_name

    head = (f"Sweep over {', '.join(swept) or 'nothing'}: {len(summary.trials)} trials, "
            f"{summary.failed} failed")
    best = summary.best
    if best is None:
        return head + "; no trial succeeded."
    accuracy = best.metrics.get("test/accuracy")
    return (f"{head}; best trial {best.number} ({values_name(best.params, swept)}): "
            f"{summary.objective} {best.objective:.4f}"
            + (f", test accuracy {accuracy:.4f}." if accuracy is not None else "."))


def record_failed_trial(cfg: DictConfig, parent_run_id: str, job_num: int, run_name: str,
                        error: BaseException) -> None:
    """Makes a trial that failed before opening its run visible: a FAILED child with the error.

    The runner checks a config before it opens a run (bad input should not leave runs behind),
    but in a sweep the user compares trials in MLflow, and a trial missing there is lost.
    """
    from tfharness.config import flatten, to_typed
    from tfharness.tracking import open_experiment
    from tfharness.tracking.batches import log_params

    try:
        typed = to_typed(cfg)
    except Exception:
        return  # not even a config to record; Hydra reports the error
    client, experiment_id = open_experiment(typed.tracking)
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                       f"tags.`tfharness.job_num` = '{job_num}'")
    if existing:
        return  # the run was opened and the runner already ended it FAILED
    run = client.create_run(experiment_id, run_name=run_name, tags={
        "mlflow.parentRunId": parent_run_id, "tfharness.job_num": str(job_num),
        "error": f"{type(error).__name__}: {error}"[:5000]})
    from tfharness.tracking.record import split_params

    params, tags = split_params(flatten(typed))
    log_params(client, run.info.run_id, params)
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FAILED")


def plot(summary: SweepSummary, swept: List[str], folder: Path) -> List[Path]:
    """PNG plots: the objective per trial, and each swept parameter against the objective."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    from tfharness.tracking.plots import mark_best

    done = sorted((t for t in summary.trials if t.succeeded), key=lambda t: t.number or 0)
    if not done:
        return []
    best = done.index(summary.best)
    best_label = f"best: trial {summary.best.number}"
    paths = []
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([t.number for t in done], [t.objective for t in done], "o-")
    mark_best(axes, [t.number for t in done], [t.objective for t in done], best, best_label)
    axes.set_xlabel("trial (job number)")
    axes.set_ylabel(summary.objective)
    axes.set_title("Objective per trial")
    figure.tight_layout()
    paths.append(folder / "objective_per_trial.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    for key in swept:
        values = [t.params.get(key) for t in done]
        figure, axes = plt.subplots(figsize=(6, 4))
        numeric = _as_floats(values)
        if numeric is not None:
            xs = numeric
            if min(numeric) > 0 and max(numeric) / min(numeric) >= 100:
                axes.set_xscale("log")  # learning rates and the like span decades
        else:
            labels = sorted({str(v) for v in values})
            xs = [labels.index(str(v)) for v in values]
            axes.set_xticks(range(len(labels)), labels)
        axes.scatter(xs, [t.objective for t in done])
        mark_best(axes, xs, [t.objective for t in done], best, best_label)
        axes.set_xlabel(key)
        axes.set_ylabel(summary.objective)
        axes.set_title(f"{summary.objective} against {key}")
        figure.tight_layout()
        paths.append(folder / f"objective_vs_{key.replace('/', '_')}.png")
        figure.savefig(paths[-1], dpi=100)
        plt.close(figure)
    return paths


def _as_floats(values: List[Optional[str]]) -> Optional[List[float]]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _display(column: str, value: Any) -> str:
    from tfharness.tracking.tables import format_cell

    if column == "run_id":
        return str(value)[:8]  # enough to tell runs apart; the MLflow table has them whole
    if column == "pretrain" and str(value).startswith("reused "):
        return str(value)[:15]
    if isinstance(value, str):
        try:
            return format_cell(float(value))
        except ValueError:
            pass
    return format_cell(value)


def print_trials(summary: SweepSummary, swept: List[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 160
    table = Table(title=f"Sweep {summary.parent_run_id}: {len(summary.trials)} trials by "
                        f"{summary.objective} ({summary.direction})")
    rows = summary.rows(swept)
    columns = list(rows[0]) if rows else ["trial", "run_id", "status", summary.objective]
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_display(c, row[c]) for c in columns))
    console.print(table)
    if summary.best:
        console.print(f"Best trial: {summary.best.number} (run {summary.best.run_id}), "
                      f"{summary.objective}={summary.best.objective:.6g}")
    if summary.failed:
        console.print(f"[red]{summary.failed} trial(s) failed[/red]")


def prune_search_space(config: DictConfig) -> List[str]:
    """Drops keys of ``hydra.sweeper.params`` that the composed config does not have.

    The packaged search (``hparams_search=optuna``) covers ``model.units``; a model without
    that key (``cnn``, a user's builder) is searched over the rest, and over whatever the
    command line adds (``model.width=8,16``). Runs before the sweeper is created from the
    config. Returns the keys dropped.
    """
    params = OmegaConf.select(config, "hydra.sweeper.params")
    if not isinstance(params, DictConfig):
        return []
    def present(key: str) -> bool:
        parent_key, _, leaf = key.lstrip("+~").rpartition(".")
        parent = OmegaConf.select(config, parent_key) if parent_key else config
        return isinstance(parent, DictConfig) and leaf in parent

    dropped = [key for key in params if not present(str(key))]
    if dropped:
        with flag_override(config, ["readonly", "struct"], [False, False]):
            for key in dropped:
                del params[key]
        log.warning("Sweep: %s left the search: the config has no such key",
                    ", ".join(dropped))
    return dropped


class SweepCallback(Callback):
    """Hydra callback: the MLflow parent run of a sweep (see the module docstring)."""

    def __init__(self) -> None:
        self.parent_run_id: Optional[str] = None
        self.summary: Optional[SweepSummary] = None
        self._cfg: Optional[DictConfig] = None
        self._client = None
        self._experiment_id: Optional[str] = None
        self._job_failures = 0
        # Why the parent run could not be opened, if it could not.
        self.error: Optional[Exception] = None

    # ------------------------------------------------------------------ launching process
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global ACTIVE
        ACTIVE = self
        prune_search_space(config)
        if config.tracking.name == "off":
            return
        from tfharness.pipeline.distribute import sweep_error

        self.error = sweep_error(config)
        if self.error is not None:  # each job fails with it too; no parent run
            return
        try:
            self._start(config)
        except Exception as error:  # Hydra would only warn; the command exits 1 (cli.main)
            self.error = error
            log.error("Sweep: could not open the MLflow parent run, the jobs run without it: "
                      "%s: %s", type(error).__name__, error)

    def _start(self, config: DictConfig) -> None:
        import mlflow

        from tfharness.config import flatten, register_configs, to_typed
        from tfharness.config.targets import option_name
        from tfharness.rerun import RERUN_OF_ENV
        from tfharness.tracking import open_experiment, run_tags
        from tfharness.tracking.batches import log_params
        from tfharness.tracking.naming import sweep_name
        from tfharness.tracking.record import RERUN_OF_TAG, split_params

        register_configs()
        job_cfg = copy.deepcopy(config)
        with flag_override(job_cfg, ["readonly", "struct"], [False, False]):
            del job_cfg["hydra"]
            # Each job's output_dir is its own folder; the sweep's is the sweep folder.
            job_cfg.output_dir = str(config.hydra.sweep.dir)
        typed = to_typed(job_cfg)
        self._cfg = config
        self._client, self._experiment_id = open_experiment(typed.tracking)
        space = swept_keys(config)
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_"))
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_"))
        tags = run_tags(option_name(typed.data), option_name(typed.model), {
            SWEEP_TAG: "parent", "sweeper": sweeper.rsplit(".", 1)[-1],
            "launcher": launcher.rsplit(".", 1)[-1], "sweep_dir": str(config.hydra.sweep.dir)})
        run_name = sweep_name(space)
        if os.environ.get(RERUN_OF_ENV):
            tags[RERUN_OF_TAG] = os.environ[RERUN_OF_ENV]
        run = self._client.create_run(self._experiment_id, run_name=run_name,
                                      tags={**tags, **typed.tracking.tags})
        self.parent_run_id = run.info.run_id
        model_params, _ = split_params(flatten(typed))
        params = {**model_params, "sweep.sweeper": sweeper, "sweep.launcher": launcher,
                  **{f"sweep.space.{k}": v for k, v in space.items()}}
        log_params(self._client, self.parent_run_id, params)
        self._client.log_text(self.parent_run_id, OmegaConf.to_yaml(job_cfg), "sweep.yaml")
        # Every job, wherever it runs, gets the parent's id in its environment.
        swept = ",".join(k.lstrip("+~") for k in space)
        with flag_override(config, ["readonly", "struct"], [False, False]):
            config.hydra.overrides.hydra.append(
                f"++hydra.job.env_set.{PARENT_RUN_ENV}={self.parent_run_id}")
            config.hydra.overrides.hydra.append(f"++hydra.job.env_set.{SWEPT_KEYS_ENV}='{swept}'")
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        os.environ[SWEPT_KEYS_ENV] = swept
        mlflow.set_tracking_uri(typed.tracking.uri)
        log.info("Sweep: MLflow parent run %s ('%s') in experiment '%s' at %s",
                 self.parent_run_id, run_name, typed.tracking.experiment, typed.tracking.uri)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # Runs where the job ran: counts the failures of in-process jobs (basic launcher).
        from hydra.core.utils import JobStatus

        if job_return.status == JobStatus.FAILED:
            self._job_failures += 1

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.finish()

    def finish(self) -> Optional[SweepSummary]:
        """Summarizes the sweep on its parent run and ends it (once; safe to call again)."""
        if self.parent_run_id is None or self.summary is not None:
            return self.summary
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEPT_KEYS_ENV, None)
        cfg = self._cfg
        objective, direction = cfg.sweep.objective, cfg.sweep.direction
        client, parent = self._client, self.parent_run_id
        status = "FAILED"
        try:
            summary = collect(client, self._experiment_id, parent, objective, direction)
            # A job that failed before opening its run has no child in MLflow.
            summary.unrecorded_failures = max(
                0, self._job_failures - sum(not t.succeeded for t in summary.trials))
            self.summary = summary
            space = swept_keys(cfg)
            params = summary.trials[0].params if summary.trials else {}
            swept = [param_key(k, params) for k in space]
            self._record(summary, swept)
            print_trials(summary, swept)
            rate = summary.failed / max(1, len(summary.trials) + summary.unrecorded_failures)
            if summary.best is not None and rate <= float(cfg.sweep.max_failure_rate):
                status = "FINISHED"
            if summary.failed:
                client.set_tag(parent, "error", f"{summary.failed} of "
                               f"{len(summary.trials) + summary.unrecorded_failures} trials "
                               f"failed")
        finally:
            client.set_terminated(parent, status)
        return summary

    def _record(self, summary: SweepSummary, swept: List[str]) -> None:
        from tfharness.tracking.naming import table_columns

        client, parent = self._client, self.parent_run_id

        rows = summary.rows(swept)
        if rows:
            client.log_table(parent, data=table_columns(rows), artifact_file=TRIALS_TABLE)
        client.log_metric(parent, "trials", len(summary.trials))
        client.log_metric(parent, "failed_trials", summary.failed)
        best = summary.best
        if best is not None:
            client.log_metric(parent, f"best/{summary.objective}", best.objective)
            client.set_tag(parent, "best_run_id", best.run_id)
            client.set_tag(parent, "best_trial", str(best.number))
            for key in swept:
                client.set_tag(parent, f"best.{key}", str(best.params.get(key)))
            self._register_champion(best)
        client.set_tag(parent, "mlflow.note.content", describe_sweep(summary, swept))
        with tempfile.TemporaryDirectory() as tmp:
            for path in plot(summary, swept, Path(tmp)):
                client.log_artifact(parent, str(path), "plots")

    def _register_champion(self, best: Trial) -> None:
        name = self._cfg.sweep.register_best
        if not name:
            return
        import mlflow

        from tfharness.tracking.models import MODEL_URI_TAG

        tags = self._client.get_run(best.run_id).data.tags
        uri = tags.get(f"{MODEL_URI_TAG}.finetuned") or tags.get(f"{MODEL_URI_TAG}.pretrained")
        if uri is None:
            raise RuntimeError(f"sweep.register_best={name!r}: the best trial {best.run_id} "
                               f"logged no model (tracking.log_models=false?)")
        alias = OmegaConf.select(self._cfg, "tracking.promote")
        decision = self._promotion(best, name, alias) if alias else None
        version = mlflow.register_model(uri, name)
        if decision is None:
            self._client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
            self._client.set_tag(self.parent_run_id, "champion", f"{name}/{version.version}")
            log.info("Sweep: registered the best trial's model as %s version %s, alias %s",
                     name, version.version, CHAMPION_ALIAS)
            return
        from tfharness.pipeline import promotion

        if decision.promoted:
            self._client.set_registered_model_alias(name, alias, version.version)
            self._client.set_tag(self.parent_run_id, alias, f"{name}/{version.version}")
        self._client.set_tag(self.parent_run_id, "tfharness.registered_model",
                             f"{name}/{version.version}")
        self._client.set_tag(self.parent_run_id, promotion.PROMOTION_TAG,
                             f"version {version.version} {decision.summary()}")
        rows = decision.rows()
        self._client.log_table(self.parent_run_id, artifact_file=promotion.COMPARISON_TABLE,
                               data={key: [row[key] for row in rows] for key in rows[0]})
        self._client.log_text(self.parent_run_id, promotion.markdown(decision),
                              promotion.COMPARISON_MARKDOWN)
        promotion.print_decision(decision)
        log.info("Sweep: registered the best trial's model as %s version %s; %s", name,
                 version.version, decision.summary())

    def _promotion(self, best: Trial, name: str, alias: str):
        """The best trial's comparison with the alias's holder (measured in the trial) and the
        decision; a holder that moved since the trial compared keeps the alias."""
        from tfharness.pipeline import promotion

        cfg = self._cfg
        metric = OmegaConf.select(cfg, "tracking.promote_metric") or cfg.sweep.objective
        decision = promotion.Decision(
            name, alias, metric, cfg.sweep.direction,
            float(OmegaConf.select(cfg, "tracking.promote_min_delta") or 0.0),
            data=f"the held-out data of trial {best.number}",
            candidate=best.metrics.get(promotion.CANDIDATE_METRIC, float("nan")),
            candidate_label=f"best trial {best.number} (run {best.run_id[:8]})",
            champion=best.metrics.get(promotion.CHAMPION_METRIC))
        compared = best.tags.get(promotion.CHAMPION_TAG)
        holder = promotion.current_holder(self._client, name, alias)
        now = f"{name}/{holder.version}" if holder is not None else "none"
        decision.champion_version = str(holder.version) if holder is not None else None
        if compared is None:
            decision.reason = "the best trial did not measure the comparison"
        elif compared != now:
            decision.reason = (f"the alias moved to {now} after the trial compared with "
                               f"{compared}")
        elif promotion.CHAMPION_METRIC not in best.metrics and holder is not None:
            decision.reason = (f"{name}@{alias} could not be evaluated on the trial's data: "
                               f"{best.tags.get(promotion.PROMOTION_TAG, 'see the trial')}")
        else:
            decision.promoted, decision.reason = promotion.decide(
                decision.candidate, decision.champion, decision.direction, decision.min_delta)
        return decision


# The sweep of this process's command, so the command line can finish it when Hydra raised (a
# failed job makes Hydra's basic sweeper raise before on_multirun_end) and read its outcome.
ACTIVE: Optional[SweepCallback] = None


def finish_active() -> Optional[SweepSummary]:
    """Finishes the sweep this process started, if any, and returns its summary."""
    return ACTIVE.finish() if ACTIVE is not None else None
