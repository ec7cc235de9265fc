"""Plots a run logs as artifacts: the learning curves of pretraining and fine-tuning on one axis.

MLflow's charts draw each metric on its own, over its own steps; a learning curve needs training
and validation overlaid, and pretraining and every fine-tune stage on one epoch axis with the
stage boundaries marked. Drawn by the tracker's delivery thread, at the end of the run, so no
epoch waits for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

LEARNING_CURVES = "plots/learning_curves.png"
# The epoch metrics drawn, per panel: (panel title, training key, validation key).
PANELS = (("loss", "loss", "val_loss"), ("accuracy", "accuracy", "val_accuracy"))


def learning_curve_data(points: Sequence[Sequence], pretrain_epochs: int,
                        stages: Sequence[tuple]) -> Dict:
    """What :func:`draw_learning_curves` needs, from a run's ``[key, value, step]`` points.

    Args:
        points: every metric point of the run (one per epoch for the epoch metrics).
        pretrain_epochs: epochs of pretraining (0 when the run started from a source).
        stages: ``(name, epochs)`` of each fine-tune stage, in order.
    """
    wanted = {f"{phase}/{key}" for phase in ("pretrain", "finetune")
              for _, train, val in PANELS for key in (train, val)}
    curves: Dict[str, Dict[int, float]] = {}
    for key, value, step in points:
        if key in wanted:
            curves.setdefault(key, {})[int(step)] = float(value)
    return {"curves": {k: sorted(v.items()) for k, v in curves.items()},
            "pretrain_epochs": int(pretrain_epochs),
            "stages": [(str(name), int(epochs)) for name, epochs in stages]}


def draw_learning_curves(data: Dict, path: Path) -> Path:
    """Loss and accuracy panels, training solid and validation dashed, over one epoch axis:
    pretraining epochs 1..E, then fine-tuning E+1.., with a line where each stage begins."""
    # A Figure on the Agg canvas, not pyplot: no display, no global state, and
    # less to import than pyplot (this runs at the end of every run).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    offset = {"pretrain": 0, "finetune": data["pretrain_epochs"]}
    colors = {"pretrain": "tab:blue", "finetune": "tab:orange"}
    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for ax, (title, train, val) in zip(axes, PANELS):
        for phase in ("pretrain", "finetune"):
            for key, style, label in ((train, "-", "train"), (val, "--", "val")):
                series = data["curves"].get(f"{phase}/{key}")
                if series:
                    ax.plot([offset[phase] + step + 1 for step, _ in series],
                            [value for _, value in series], style, marker="o", markersize=3,
                            color=colors[phase], label=f"{phase} {label}")
        _mark_stages(ax, data)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (pretraining, then fine-tuning)")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    return path


def preload() -> None:
    """Imports what drawing needs, ahead of the end of the run (called on a spare thread)."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except Exception:  # drawing will report it, where it is needed
        pass


def _mark_stages(ax, data: Dict) -> None:
    """A vertical line before the first epoch of each fine-tune stage, labelled with its name."""
    start = data["pretrain_epochs"]
    several = len(data["stages"]) > 1
    for name, epochs in data["stages"]:
        ax.axvline(start + 0.5, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"fine-tune stage {name}" if several else "fine-tuning", xy=(start + 0.5, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(2, -12), textcoords="offset points", fontsize=7, color="dimgrey")
        start += epochs


def mark_best(ax, xs: List[float], ys: List[float], best_index: int, label: str) -> None:
    """Circles the best trial's point on a sweep plot and names it."""
    ax.scatter([xs[best_index]], [ys[best_index]], s=160, facecolors="none",
               edgecolors="tab:red", linewidths=2, zorder=3, label=label)
    ax.legend(fontsize=8)


DRAWERS = {"learning_curves": draw_learning_curves}
