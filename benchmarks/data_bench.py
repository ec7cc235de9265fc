"""Data-source workloads: a generated folder of JPEGs and a 100,000-row CSV, tfharness against
the plain Keras script a user would write for the same files (``plain_images.py``,
``plain_csv.py``).

* images: ``data=image_folder`` with the ``cnn`` (and a MobileNetV2, ``weights=None``, when
  ``model=keras_application`` exists) against ``image_dataset_from_directory`` + ``fit``, on the
  same files: wall time of the whole process, images/s of ``fit``, peak memory; and the harness
  on folders of two sizes, to show that peak memory does not grow with the number of images.
* csv: ``data=csv`` against ``pandas.read_csv`` + ``fit``: load (reading the file to split
  arrays) and the first epoch.

Run by ``scripts/bench --only images|csv|data``; replaces the "Data sources" section of
``benchmarks/results.md``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SECTION = "## Data sources"

IMAGES = {"classes": 4, "size": 48, "epochs": 2, "batch_size": 32, "counts": (1000, 3000)}
CSV = {"rows": 100_000, "features": 16, "classes": 4, "units": [64], "batch_size": 128}


def make_images(root: Path, count: int, classes: int, size: int, seed: int = 0) -> Path:
    """``count`` JPEGs of mixed sizes around ``size`` in ``classes`` folders (PIL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for n in range(count):
        label = n % classes
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        side = size + int(rng.integers(-8, 9))
        base = np.zeros(3)
        base[label % 3] = 60 + 60 * (label // 3)
        pixels = base + rng.integers(0, 120, (side, side + 4, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(folder / f"{n}.jpg",
                                                                       quality=90)
    return root


def make_csv(path: Path, rows: int, features: int, classes: int, seed: int = 0) -> Path:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    x = rng.standard_normal((rows, features)) * 3 + labels[:, None] * 0.5 + 10
    frame = pd.DataFrame(x.round(4), columns=[f"f{i}" for i in range(features)])
    frame["label"] = [f"kind_{k}" for k in labels]
    frame.to_csv(path, index=False)
    return path


def _metrics(uri: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("tfharness")
    run = client.search_runs([exp.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    return run.data.metrics


def _first_epoch_end(uri: str) -> float:
    """When the latest run logged its first epoch (``pretrain/loss`` at step 0), Unix time."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("tfharness")
    run = client.search_runs([exp.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    points = client.get_metric_history(run.info.run_id, "pretrain/loss")
    return min(p.timestamp for p in points if p.step == 0) / 1000.0


def has_keras_application() -> bool:
    return (HERE.parent / "src" / "tfharness" / "conf" / "model" / "keras_application.yaml").exists()


def images(root: Path, repeats: int, timed, prepare_store) -> dict:
    """Median wall, images/s and peak memory per (model, way), and the harness' peak memory
    on each folder size."""
    work = IMAGES
    folders = {n: make_images(root / f"images_{n}", n, work["classes"], work["size"])
               for n in work["counts"]}
    big = max(folders)
    size = work["size"]
    models = {"cnn": ["model=cnn"]}
    if has_keras_application():
        models["mobilenetv2"] = ["model=keras_application", "model.name=MobileNetV2",
                                 "model.weights=null", "+model.kwargs.alpha=0.35"]
    uri = f"sqlite:///{root / 'harness.db'}"
    prepare_store(uri, "tfharness")
    out, metrics_file = {}, root / "plain.json"
    for model, model_overrides in models.items():
        ways = {
            "plain": [sys.executable, str(HERE / "plain_images.py"), "--dir", str(folders[big]),
                      "--image-size", str(size), str(size), "--epochs", str(work["epochs"]),
                      "--batch-size", str(work["batch_size"]), "--model", model,
                      "--metrics-out", str(metrics_file)],
            "harness": harness_images(folders[big], model_overrides, uri),
        }
        samples = {way: [] for way in ways}
        for repeat in range(repeats):
            for way, command in ways.items():
                measured = timed(command, root)
                measured["images_per_s"] = (
                    json.loads(metrics_file.read_text())["images_per_second"] if way == "plain"
                    else _metrics(uri)["pretrain/samples_per_second"])
                samples[way].append(measured)
                print(f"  images {model} #{repeat + 1} {way}: {measured['wall']:.2f} s, "
                      f"{measured['images_per_s']:.0f} images/s, "
                      f"{measured['total_rss_mib']:.0f} MiB", flush=True)
        out[model] = {way: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
                      for way, runs in samples.items()}
    scaling = {}
    for count, folder in folders.items():
        if count == big:
            # Already measured above, on the same folder and command.
            scaling[count] = out["cnn"]["harness"]["total_rss_mib"]
            continue
        runs = [timed(harness_images(folder, models["cnn"], uri), root) for _ in range(repeats)]
        scaling[count] = statistics.median(r["total_rss_mib"] for r in runs)
        print(f"  images harness on {count} images: {scaling[count]:.0f} MiB", flush=True)
    return {"models": out, "scaling": scaling, "images": big}


def harness_images(folder: Path, model_overrides: list, uri: str) -> list:
    work = IMAGES
    return [str(BIN / "tfharness"), "data=image_folder", f"data.pretrain_dir={folder}",
            f"data.image_size=[{work['size']},{work['size']}]", "data.val_fraction=0.15",
            "data.test_fraction=0.15", *model_overrides, "finetune=none",
            f"trainer.epochs={work['epochs']}", f"trainer.batch_size={work['batch_size']}",
            "print_report=false", f"tracking.uri={uri}"]


def csv(root: Path, repeats: int, timed, prepare_store) -> dict:
    work = CSV
    path = make_csv(root / "table.csv", work["rows"], work["features"], work["classes"])
    uri = f"sqlite:///{root / 'csv.db'}"
    prepare_store(uri, "tfharness")
    metrics_file = root / "plain_csv.json"
    ways = {
        "plain": [sys.executable, str(HERE / "plain_csv.py"), "--path", str(path),
                  "--batch-size", str(work["batch_size"]), "--units",
                  *map(str, work["units"]), "--metrics-out", str(metrics_file)],
        "harness": [str(BIN / "tfharness"), "data=csv", f"data.path={path}",
                    "data.label_column=label", "model=mlp",
                    f"model.units=[{','.join(map(str, work['units']))}]", "finetune=none",
                    "trainer.epochs=1", f"trainer.batch_size={work['batch_size']}",
                    "print_report=false", f"tracking.uri={uri}"],
    }
    samples = {way: [] for way in ways}
    for repeat in range(repeats):
        for way, command in ways.items():
            launched = time.time()
            measured = timed(command, root)
            if way == "plain":
                plain = json.loads(metrics_file.read_text())
                measured["load_s"] = plain["load_seconds"]
                measured["epoch_s"] = plain["first_epoch_seconds"]
                epoch_end = plain["first_epoch_end_unix"]
            else:
                metrics = _metrics(uri)
                measured["load_s"] = metrics["data/load_seconds"]
                measured["epoch_s"] = metrics["pretrain/train_seconds"]
                epoch_end = _first_epoch_end(uri)
            # From the command's start (imports included) to the end of the first epoch.
            measured["to_epoch_s"] = epoch_end - launched
            samples[way].append(measured)
            print(f"  csv #{repeat + 1} {way}: first epoch ended {measured['to_epoch_s']:.2f} s "
                  f"after start (load {measured['load_s']:.2f} s, epoch "
                  f"{measured['epoch_s']:.2f} s); process {measured['wall']:.2f} s", flush=True)
    return {way: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
            for way, runs in samples.items()}


def section(image_results: dict | None, csv_results: dict | None, repeats: int,
            verdict, load: tuple = ()) -> list:
    busy = (f" 1-minute load average {load[0]:.1f} before and {load[1]:.1f} after, on "
            f"{os.cpu_count()} cores; alternating the ways spreads a busy moment over both."
            if load else "")
    lines = [SECTION, "",
             f"Median of {repeats} alternated runs each; wall is the whole process, start to "
             f"exit; CPU is the user + system time of the process and the child processes it "
             f"waited for; peak memory is the sum of the peak RSS of the process and its "
             f"children."
             + busy]
    if image_results:
        work = IMAGES
        lines += ["", f"Images: {image_results['images']} generated JPEGs ({work['classes']} "
                  f"classes, mixed sizes around {work['size']} px, read at {work['size']}x"
                  f"{work['size']}), {work['epochs']} epochs, batch {work['batch_size']}, no "
                  f"fine-tuning; plain is `image_dataset_from_directory` + `fit` + export and "
                  f"check (`benchmarks/plain_images.py`).", "",
                  "| model | way | wall s | CPU s | images/s | peak MiB |",
                  "|---|---|---|---|---|---|"]
        for model, ways in image_results["models"].items():
            for way, m in ways.items():
                lines.append(f"| {model} | {way} | {m['wall']:.2f} | {m['cpu_s']:.1f} | "
                             f"{m['images_per_s']:.0f} | {m['total_rss_mib']:.0f} |")
        lines += ["", "| target | measured | |", "|---|---|---|"]
        for model, ways in image_results["models"].items():
            ratio = ways["harness"]["wall"] / ways["plain"]["wall"]
            lines.append(f"| images, {model}: harness/plain wall <= 1.00 | {ratio:.3f} | "
                         f"{verdict(ratio <= 1.0)} |")
        scaling = image_results["scaling"]
        small, large = min(scaling), max(scaling)
        growth = scaling[large] / scaling[small]
        lines.append(f"| images: harness peak memory on {large} vs {small} images (streamed: "
                     f"<= 1.05) | {scaling[large]:.0f} vs {scaling[small]:.0f} MiB "
                     f"({growth:.3f}) | {verdict(growth <= 1.05)} |")
    if csv_results:
        work = CSV
        plain, harness = csv_results["plain"], csv_results["harness"]
        ratio = harness["to_epoch_s"] / plain["to_epoch_s"]
        lines += ["", f"CSV: {work['rows']:,} rows, {work['features']} numeric features and a "
                  f"string label ({work['classes']} classes), MLP {work['units']}, batch "
                  f"{work['batch_size']}; both read with `pandas.read_csv`; plain is "
                  f"`benchmarks/plain_csv.py`. Load and first epoch: from the command's start "
                  f"(imports included) to the end of the first epoch (the harness: the timestamp "
                  f"of its first `pretrain/loss` point). Load s and epoch s are measured inside "
                  f"each (the harness reads the file while TensorFlow imports on another "
                  f"thread, so its load overlaps that import).", "",
                  "| way | start to first epoch end s | load s | epoch s | process wall s | "
                  "process CPU s |", "|---|---|---|---|---|---|",
                  *(f"| {way} | {m['to_epoch_s']:.2f} | {m['load_s']:.2f} | {m['epoch_s']:.2f} "
                    f"| {m['wall']:.2f} | {m['cpu_s']:.1f} |" for way, m in csv_results.items()),
                  "", "| target | measured | |", "|---|---|---|",
                  f"| csv: harness/plain load + first epoch (start to first epoch end) <= 1.10 "
                  f"| {ratio:.3f} | {verdict(ratio <= 1.10)} |"]
    return lines


def replace_section(text: str, lines: list) -> str:
    """``text`` (results.md) with its data-source section replaced by ``lines`` (or added)."""
    head, marker, rest = text.partition(SECTION)
    if not marker:
        return text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    following = rest.find("\n## ")
    tail = rest[following:] if following >= 0 else "\n"
    return head + "\n".join(lines) + tail
