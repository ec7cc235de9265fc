"""What a run records besides its epochs: texts, the source, the layer report, the test split,
the results gathered from the run state, the sweep objective, and the report printed at the end."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from tfharness import sources as sources_lib
from tfharness import tracking
from tfharness.artifacts import integrity, serialization
from tfharness.config import HarnessConfig
from tfharness.errors import ConfigError, HarnessError
from tfharness.pipeline import data_record
from tfharness.pipeline.context import RunContext
from tfharness.pipeline.roundtrip import model_step, probe_batch
from tfharness.pipeline import train
from tfharness.pipeline.train import evaluate
from tfharness.tracking import record as run_record

log = logging.getLogger("tfharness")

REPORT_TABLE = "reports/trainable_layers.json"
REPORT_MARKDOWN = "reports/trainable_layers.md"
SOURCE_REPORT = "reports/source.md"


def log_texts(ctx: RunContext) -> None:
    """``config.yaml`` (resolved) and ``overrides.yaml``, once per run."""
    if ctx.ckpt.done("texts"):
        return
    texts = {"config.yaml": ctx.resolved_yaml or OmegaConf.to_yaml(OmegaConf.structured(ctx.cfg)),
             "overrides.yaml": OmegaConf.to_yaml(list(ctx.overrides))}
    ctx.ckpt.complete("texts", texts=texts)
    for file, text in texts.items():
        ctx.tracker.log_text(text, file)


def record_source(ctx: RunContext) -> None:
    """The loaded source's measurements and ``reports/source.md`` (instead of pretraining)."""
    if ctx.ckpt.done("source"):
        return
    ctx.ckpt.complete("source")
    source = ctx.source
    measured = {"source/load_seconds": source.load_seconds}
    if source.parity_max_abs_diff is not None:
        measured["source/max_abs_diff"] = source.parity_max_abs_diff
    ctx.tracker.log_metrics(measured)
    ctx.result.metrics.update(measured)
    description = source.describe()
    ctx.tracker.log_text(description, SOURCE_REPORT)
    ctx.result.source = description
    log.info("source: %s loaded from %s (%s) in %.2f s%s", source.kind, source.artifact.location,
             "layers kept" if source.layers_kept else "one opaque block", source.load_seconds,
             f", max abs diff {source.parity_max_abs_diff:.3g} against {source.parity_against}"
             if source.parity_against else "")


def layer_report(ctx: RunContext, final_model) -> None:
    """The trainable-layer report: Markdown in the output folder, a table and Markdown in MLflow."""
    result = ctx.result
    if not result.report:
        return
    report_file = Path(ctx.cfg.output_dir) / REPORT_MARKDOWN
    if not ctx.ckpt.done("report"):
        markdown = (tracking.markdown_table(result.report)
                    + sources_lib.block_report(final_model) + data_record.classes_markdown(ctx))
        serialization.atomic_write(report_file, lambda tmp: tmp.write_text(markdown))
        texts = {**ctx.ckpt.state.values.get("texts", {}), REPORT_MARKDOWN: markdown}
        ctx.ckpt.complete("report", texts=texts, report_rows=result.report)
        ctx.tracker.log_table(result.report, REPORT_TABLE)
        ctx.tracker.log_text(markdown, REPORT_MARKDOWN)
    result.artifacts["report"] = report_file


def test_metrics(ctx: RunContext, final_model, final_split) -> None:
    """Step 7: the final model on the held-out test split, as ``test/*``."""
    if ctx.ckpt.done("test"):
        return
    measured = evaluate(ctx.cfg, final_model, final_split)
    test = {f"test/{k}": v for k, v in measured.items()}
    if ctx.pretrained_is_final:
        test.update({f"pretrain/test_{k}": v for k, v in measured.items()})
    ctx.ckpt.complete("test", test, 0)
    ctx.tracker.log_metrics(test)


def transfer_gain(ctx: RunContext, final_model, final_split) -> None:
    """``finetune.transfer_gain``: the from-scratch baseline and ``transfer/gain``, once."""
    ft = ctx.cfg.finetune
    if not (ft.enabled and ft.transfer_gain) or ctx.ckpt.done("transfer"):
        return
    accuracy = next((value for key, value, _ in reversed(ctx.ckpt.state.metrics)
                     if key == "test/accuracy"), float("nan"))
    measured = train.transfer_gain(ctx, final_model, final_split, accuracy)
    ctx.ckpt.complete("transfer", measured, 0)
    ctx.tracker.log_metrics(measured)


def gather_results(ctx: RunContext) -> None:
    """Fills ``result.metrics`` with what earlier processes of a resumed run measured.

    The ledger holds every point; each metric's value is the one at its latest step (the last
    epoch's, for sweeps). Values this process measured are kept.
    """
    result = ctx.result
    latest: Dict[str, tuple] = {}
    for key, value, step in ctx.ckpt.state.metrics:
        if key not in latest or step >= latest[key][0]:
            latest[key] = (step, value)
    for key, (_, value) in latest.items():
        result.metrics.setdefault(key, value)
    log.info("test: loss %.4f, accuracy %.4f", result.metrics.get("test/loss", float("nan")),
             result.metrics.get("test/accuracy", float("nan")))


def objective(cfg: HarnessConfig, metrics: Dict[str, float]) -> float:
    """The sweep objective of a finished run; a missing or non-finite one fails the trial."""
    key = cfg.sweep.objective
    if key not in metrics:
        raise ConfigError("sweep.objective", key,
                          f"a metric this run records: {', '.join(sorted(metrics))}")
    value = metrics[key]
    if not math.isfinite(value):
        raise HarnessError(f"The objective {key} of this trial is {value}: a failed trial")
    return value


def deliver_missing(ctx: RunContext) -> None:
    """Logs what the dead process recorded as done but may not have delivered to the store."""
    cfg, tracker, state = ctx.cfg, ctx.tracker, ctx.ckpt.state
    missing = tracker.missing_points(state.metrics)
    by_step: Dict[int, Dict[str, float]] = {}
    for key, value, step in missing:
        by_step.setdefault(step, {})[key] = value
    for step, metrics in sorted(by_step.items()):
        tracker.log_metrics(metrics, step=step)
    texts = state.values.get("texts", {})
    for file in tracker.missing_artifacts(texts):
        tracker.log_text(texts[file], file)
    if state.values.get("report_rows") and tracker.missing_artifacts([REPORT_TABLE]):
        tracker.log_table(state.values["report_rows"], REPORT_TABLE)
    if cfg.tracking.log_models and not cfg.save_format.in_memory and state.values.get("models"):
        logged = set(tracker.logged_model_names())
        for stem, path in state.values["models"].items():
            if stem not in logged:
                split = ctx.data.finetune if stem == "finetuned" else ctx.data.pretrain
                probe = probe_batch(split, cfg.save_format.verify_batch_size)
                digest = state.values.get("digests", {}).get(stem)
                extra = {"sha256": integrity.record_path(Path(path))} if digest else {}
                classes = data_record.class_names_file(ctx, stem)
                if classes is not None:
                    extra["class_names"] = classes
                tracker.log_model(
                    serialization.load_model(path), stem, probe[:5], Path(path),
                    tags={**({sources_lib.SHA256_TAG: digest} if digest else {}),
                          **run_record.model_tags()},
                    extra_artifacts=extra or None, step=model_step(cfg, stem, ctx.source))
    if missing:
        log.info("resumed run: delivered %d metric points the interrupted process had not",
                 len(missing))


def print_report(rows: List[Dict], metrics: Dict[str, float], run_id: Optional[str],
                 cfg: HarnessConfig, classes: str = "",
                 pretrain_reused_from: Optional[str] = None) -> None:
    """The trainable-layer table and every result, printed at the end of a run."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        # Piped or logged output has no width to fit; 80 columns would wrap every cell.
        console.width = 160
    if rows:
        table = Table(title="Trainable layers per fine-tune stage")
        for column in rows[0]:
            table.add_column(column, justify="right" if column != "layer" else "left")
        for row in rows:
            table.add_row(*(tracking.format_cell(row[c]) for c in row))
        console.print(table)
    if classes:
        console.print(classes.strip())
    if pretrain_reused_from:
        console.print(f"Pretraining reused from run {pretrain_reused_from} (pretrain_cache="
                      f"{cfg.pretrain_cache}): its pretrain/* metrics are on that run")
    summary = Table(title="Results")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for key in sorted(metrics):
        summary.add_row(key, f"{metrics[key]:.6g}")
    console.print(summary)
    if run_id:
        console.print(f"MLflow run {run_id} in experiment '{cfg.tracking.experiment}' at "
                      f"{cfg.tracking.uri}")
