"""tfharness against the references a user would pick instead, measured side by side.

For each workload it runs, alternating A, B, C, A, B, C, ...: a plain Keras script doing the same
work (``plain_keras.py``), the same script with ``mlflow.tensorflow.autolog()``, and ``tfharness``.
Each run is a fresh process, timed from start to exit as a user would feel it, with its peak RSS
from ``wait4``. Then, in this process: ``tf.data`` against NumPy input, achieved GFLOP/s against a
matmul peak, save formats, the cost of logging one epoch, start-up, and an 8-job sweep in one
process against 8 separate invocations. Writes ``benchmarks/results.md``; the last line printed is
``ratio harness/plain=<x> harness/autolog=<y>`` for the large workload.

Usage: scripts/bench [--repeats N] [--quick]
                     [--only save-formats|surgery|speed|tracking|pretrain-cache|default|large|mobilenet|images|csv|data]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

WORKLOADS = {
    # The default experiment (transfer_digits) exactly as `tfharness` runs it with no overrides.
    "default": {
        "data_name": "digits", "data": {}, "units": [64], "epochs": 15, "batch_size": 32,
        "learning_rate": 1e-3, "finetune_epochs": 30, "finetune_learning_rate": 1e-2,
        "head_classes": 5, "seed": 42, "overrides": [],
    },
    # Training dominates: two 512-wide layers on 60,000 synthetic 784-feature samples.
    "large": {
        "data_name": "synthetic",
        "data": {"shape": [784], "num_samples": 60000, "num_classes": 10,
                 "finetune_num_samples": 20000, "finetune_num_classes": 5},
        "units": [512, 512], "epochs": 3, "batch_size": 128, "learning_rate": 1e-3,
        "finetune_epochs": 2, "finetune_learning_rate": 1e-3, "head_classes": 5, "seed": 42,
        "overrides": ["data=synthetic", "data.shape=[784]", "data.num_samples=60000",
                      "data.num_classes=10", "data.finetune_num_samples=20000",
                      "data.finetune_num_classes=5", "model.units=[512,512]",
                      "trainer.epochs=3", "trainer.batch_size=128", "finetune.epochs=2",
                      "finetune.learning_rate=1e-3", "finetune.head.num_classes=5"],
    },
    # Fine-tuning a MobileNetV2-sized backbone (keras.applications, alpha 1.0, random weights)
    # at 32x32: pretrain one epoch, new head, the base frozen but for its last 20 layers.
    "mobilenet": {
        "data_name": "synthetic",
        "data": {"shape": [32, 32, 3], "num_samples": 3000, "num_classes": 10,
                 "finetune_num_samples": 3000, "finetune_num_classes": 5},
        "application": "MobileNetV2", "unfrozen": 20, "units": [], "epochs": 1,
        "batch_size": 64, "learning_rate": 1e-3, "finetune_epochs": 2,
        "finetune_learning_rate": 1e-4, "head_classes": 5, "seed": 42,
        # The comparison is fit throughput against plain Keras; autolog adds nothing here.
        "ways": ["plain", "harness"],
        "overrides": ["data=synthetic", "data.shape=[32,32,3]", "data.num_samples=3000",
                      "data.num_classes=10", "data.finetune_num_samples=3000",
                      "data.finetune_num_classes=5", "model=keras_application",
                      "model.weights=null", "trainer.epochs=1", "trainer.batch_size=64",
                      "finetune.epochs=2", "finetune.learning_rate=1e-4",
                      "finetune.head.num_classes=5", "finetune.freeze=[base/0:-20]",
                      # The plain script runs TensorFlow's default kernels: so does this.
                      "trainer.deterministic=false"],
    },
}
TINY = ["data=synthetic", "data.shape=[16]", "data.num_samples=60", "data.finetune_num_samples=40",
        "data.num_classes=4", "data.finetune_num_classes=3", "finetune.head.num_classes=3",
        "model.units=[8]", "trainer.epochs=1", "finetune.epochs=1", "print_report=false",
        "pretrain_cache=off"]
# Repeated runs of one config in one store would reuse the first one's pretraining (the default
# pretrain_cache=auto): a benchmark that compares each run's work against plain Keras turns it off.
EVERY_RUN_PRETRAINS = ["pretrain_cache=off"]


def _descendant_peaks(root: int, peaks: dict) -> None:
    """Records in ``peaks`` the peak RSS (VmHWM, KiB) of each process under ``root`` now."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    family, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        family.add(pid)
        frontier += [child for child, parent in parents.items() if parent == pid]
    for pid in family - {root}:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks[pid] = max(peaks.get(pid, 0), int(line.split()[1]))
        except OSError:
            continue


def timed(command, cwd) -> dict:
    """Runs ``command``; returns wall seconds, its own peak RSS and the sum of the peak RSS of
    it and every process it started, in MiB.

    The sum of peaks counts each helper process at its own peak even if those peaks came at
    different moments: an upper bound on the memory the run needed at once.
    """
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    peaks: dict = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            _descendant_peaks(process.pid, peaks)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # Read stderr while waiting so a chatty child never blocks on a full pipe.
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({process.returncode}):\n"
                           f"{stderr.decode()[-3000:]}")
    own = usage.ru_maxrss / 1024
    # CPU seconds of the process and the helpers it waited for: what the work cost, whatever
    # else the machine was running.
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall": wall, "cpu": cpu, "cpu_s": cpu, "rss_mib": own,
            "helpers_rss_mib": sum(peaks.values()) / 1024,
            "total_rss_mib": own + sum(peaks.values()) / 1024}


def prepare_store(uri: str, experiment: str) -> None:
    """Creates the SQLite store and experiment up front, as a user's existing store would be."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=(Path(uri[10:]).parent /
                                                                "mlartifacts").as_uri())


def harness_throughput(uri: str) -> dict:
    """Pretraining and fine-tuning samples/s of the latest harness run in ``uri``."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("tfharness")
    run = client.search_runs([exp.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    return {"samples_per_s": run.data.metrics["pretrain/samples_per_second"],
            "finetune_samples_per_s": run.data.metrics.get("finetune/samples_per_second",
                                                           float("nan"))}


def compare(name: str, work: dict, repeats: int, root: Path) -> dict:
    folder = root / name
    folder.mkdir()
    plain_json = json.dumps({k: v for k, v in work.items() if k != "overrides"})
    autolog_uri = f"sqlite:///{folder / 'autolog.db'}"
    harness_uri = f"sqlite:///{folder / 'harness.db'}"
    prepare_store(autolog_uri, "plain-autolog")
    prepare_store(harness_uri, "tfharness")
    metrics_file = folder / "plain.json"
    ways = {
        "plain": [sys.executable, str(HERE / "plain_keras.py"), "--workload", plain_json,
                  "--metrics-out", str(metrics_file)],
        "autolog": [sys.executable, str(HERE / "plain_keras.py"), "--workload", plain_json,
                    "--autolog", "--tracking-uri", autolog_uri, "--metrics-out",
                    str(metrics_file)],
        "harness": [str(BIN / "tfharness"), *work["overrides"], *EVERY_RUN_PRETRAINS,
                    f"tracking.uri={harness_uri}"],
    }
    ways = {way: command for way, command in ways.items() if way in work.get("ways", ways)}
    samples = {way: [] for way in ways}
    for repeat in range(repeats):
        for way, command in ways.items():
            measured = timed(command, folder)
            if way == "harness":
                measured.update(harness_throughput(harness_uri))
            else:
                plain = json.loads(metrics_file.read_text())
                measured["samples_per_s"] = plain["pretrain/samples_per_second"]
                measured["finetune_samples_per_s"] = plain["finetune/samples_per_second"]
            samples[way].append(measured)
            print(f"  {name} #{repeat + 1} {way}: {measured['wall']:.2f} s, "
                  f"{measured['samples_per_s']:.0f} samples/s, {measured['rss_mib']:.0f} MiB "
                  f"(+{measured['helpers_rss_mib']:.0f} MiB in helper processes)",
                  flush=True)
    return {way: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
            for way, runs in samples.items()}


def input_pipeline_and_flops(work: dict) -> dict:
    """samples/s of fit on NumPy vs the harness's tf.data pipeline; GFLOP/s vs a matmul peak."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tfharness.config import MlpConfig, SyntheticDataConfig
    from tfharness.data import load_data, make_dataset
    from tfharness.models import build_model, compile_model

    split = load_data(SyntheticDataConfig(**work["data"])).pretrain
    x, y = split.train
    batch = work["batch_size"]

    def throughput(feed) -> float:
        keras.utils.set_random_seed(0)
        model = build_model(MlpConfig(units=work["units"]), x.shape[1:], split.num_classes)
        compile_model(model, "adam", 1e-3)
        feed(model, 1)  # trace and warm up
        start = time.perf_counter()
        feed(model, 2)
        return 2 * len(x) / (time.perf_counter() - start)

    dataset = make_dataset((x, y), batch, shuffle=True, seed=0)
    numpy_rates, tfdata_rates = [], []
    # Alternate and take medians: one pair is too noisy on a small shared machine.
    for _ in range(3):
        numpy_rates.append(throughput(
            lambda m, e: m.fit(x, y, batch_size=batch, epochs=e, verbose=0)))
        tfdata_rates.append(throughput(
            lambda m, e: m.fit(dataset, epochs=e, verbose=0, shuffle=False)))
    numpy_rate, tfdata_rate = statistics.median(numpy_rates), statistics.median(tfdata_rates)

    # Dense layers: 2*in*out FLOPs per sample forward; the backward pass costs about twice that.
    widths = [int(np.prod(x.shape[1:])), *work["units"], split.num_classes]
    flops_per_sample = 3 * sum(2 * a * b for a, b in zip(widths, widths[1:]))
    n = 2048
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    tf.matmul(a, b).numpy()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            c = tf.matmul(a, b)
        c.numpy()
        best = min(best, (time.perf_counter() - start) / 4)
    return {"numpy_samples_per_s": numpy_rate, "tfdata_samples_per_s": tfdata_rate,
            "flops_per_sample": flops_per_sample, "matmul_peak_gflops": 2 * n ** 3 / best / 1e9}


SAVE_FORMAT_ROUNDS = 5
SIGNATURES = ["probabilities", "logits", "embedding", "classes"]


def save_formats(work: dict, folder: Path, rounds: int = SAVE_FORMAT_ROUNDS) -> list:
    """Median save time, reload-and-verify time and size of each format, on disk and in memory.

    Reload-and-verify is what ``save_reload_verify`` does after saving: load, rebuild the Keras
    model, compare outputs on 64 samples (and, for a SavedModel, call ``serving_default`` too).
    """
    import numpy as np

    from tfharness.artifacts import inmemory, serialization
    from tfharness.config import MlpConfig
    from tfharness.models import build_model

    model = build_model(MlpConfig(units=work["units"]), (784,), 10)
    probe = np.random.default_rng(0).standard_normal((64, 784)).astype(np.float32)
    ways = {
        "savedmodel": lambda: serialization.save_reload_verify(
            model, folder / "bench-savedmodel", "savedmodel", probe, 1e-6),
        f"savedmodel + {len(SIGNATURES)} signatures": lambda: serialization.save_reload_verify(
            model, folder / "bench-signatures", "savedmodel", probe, 1e-6, SIGNATURES),
        "keras": lambda: serialization.save_reload_verify(
            model, folder / "bench.keras", "keras", probe, 1e-6),
        "h5": lambda: serialization.save_reload_verify(model, folder / "bench.h5", "h5", probe,
                                                       1e-6),
        "in memory, keras bytes": lambda: inmemory.save_reload_verify(model, "keras", probe, 1e-6),
        "in memory, savedmodel bytes": lambda: inmemory.save_reload_verify(
            model, "savedmodel", probe, 1e-6),
    }
    load_before = os.getloadavg()[0]
    for trip in ways.values():
        trip()  # the first export traces functions once per process: keep it out of the medians
    samples = {way: [] for way in ways}
    # Alternate the ways round by round so a noisy moment on a shared machine hits them all.
    for _ in range(rounds):
        for way, trip in ways.items():
            start = time.perf_counter()
            result = trip()
            total = time.perf_counter() - start
            samples[way].append((result.save_seconds, total - result.save_seconds,
                                 result.size_bytes))
    # A busy machine slows every row: the load average says how busy it was.
    load = (load_before, os.getloadavg()[0])
    return [{"format": way, "save_s": statistics.median(s[0] for s in runs),
             "reload_verify_s": statistics.median(s[1] for s in runs),
             "size_kib": runs[-1][2] / 1024, "rounds": rounds, "load": load}
            for way, runs in samples.items()]


def save_format_lines(formats: list) -> list:
    return [f"Save formats (the large workload's model, 784-512-512-10; median of "
            f"{formats[0]['rounds']} alternated rounds after one warm-up each; in memory means "
            f"`tfharness.inmemory`, no file written; 1-minute load average "
            f"{formats[0]['load'][0]:.1f} before, {formats[0]['load'][1]:.1f} after, on "
            f"{os.cpu_count()} cores):", "",
            "| format | save s | reload + verify s | size KiB |", "|---|---|---|---|",
            *(f"| {r['format']} | {r['save_s']:.3f} | {r['reload_verify_s']:.3f} | "
              f"{r['size_kib']:.0f} |" for r in formats)]


def replace_save_formats(text: str, lines: list, marker: str = "Save formats (") -> str:
    """``text`` (a results.md) with its save-format section (or the section starting with
    ``marker``) replaced by ``lines``."""
    head, marker, rest = text.partition(marker)
    if not marker:
        return text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    # The section ends at the first blank line after its table.
    table_end = rest.find("\n\n", rest.find("|---"))
    tail = rest[table_end:] if table_end >= 0 else "\n"
    return head + "\n".join(lines) + tail


def logging_cost(folder: Path) -> dict:
    """Wall time the training loop pays per epoch for tfharness' metric logging."""
    import mlflow

    from tfharness.config import TrackingConfig
    from tfharness.tracking import make_tracker

    uri = f"sqlite:///{folder / 'logging.db'}"
    epoch = {"pretrain/loss": 0.5, "pretrain/accuracy": 0.9, "pretrain/val_loss": 0.6,
             "pretrain/val_accuracy": 0.8}
    calls = 200
    # The default tracker: calls are queued for its delivery thread, which logs in the background.
    tracker = make_tracker(TrackingConfig(uri=uri, experiment="logging-cost"))
    tracker.start("background", {"p": "1"}, {})
    start = time.perf_counter()
    for step in range(calls):
        tracker.log_metrics(epoch, step=step)
    in_loop = (time.perf_counter() - start) / calls
    start = time.perf_counter()
    tracker.finish()  # waits until every point is in the store
    drain = time.perf_counter() - start
    client = mlflow.MlflowClient(uri)
    points = len(client.get_metric_history(tracker.run_id, "pretrain/loss"))
    # For comparison: the same points written synchronously, one log_batch per epoch.
    run = client.create_run(client.get_experiment_by_name("logging-cost").experiment_id)
    start = time.perf_counter()
    for step in range(calls):
        client.log_batch(run.info.run_id, metrics=[
            mlflow.entities.Metric(k, v, 0, step) for k, v in epoch.items()])
    synchronous = (time.perf_counter() - start) / calls
    client.set_terminated(run.info.run_id)
    return {"in_loop_ms_per_epoch": in_loop * 1e3, "drain_s": drain,
            "sync_ms_per_epoch": synchronous * 1e3, "points_delivered": points,
            "points_expected": calls}


def startup(folder: Path, repeats: int) -> dict:
    commands = {
        "tfharness --help": ["--help"],
        "tfharness --cfg job": ["--cfg", "job"],
        "config error (trainer.epochs=-1)": ["trainer.epochs=-1"],
    }
    result = {}
    for label, args in commands.items():
        walls = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([str(BIN / "tfharness"), *args], cwd=folder, capture_output=True)
            walls.append(time.perf_counter() - start)
        result[label] = statistics.median(walls)
    return result


def sweeps(folder: Path, jobs: int = 8) -> dict:
    uri = f"sqlite:///{folder / 'sweep.db'}"
    prepare_store(uri, "tfharness")
    seeds = ",".join(str(s) for s in range(jobs))
    one = timed([str(BIN / "tfharness"), "-m", *TINY, f"tracking.uri={uri}",
                 f"trainer.seed={seeds}"], folder)["wall"]
    separate = 0.0
    for seed in range(jobs):
        separate += timed([str(BIN / "tfharness"), *TINY, f"tracking.uri={uri}",
                           f"trainer.seed={seed}"], folder)["wall"]
    return {"jobs": jobs, "one_process_s": one, "separate_s": separate}


# A sweep over fine-tune settings, pretraining keys fixed (issue 16).
CACHE_SWEEP = "finetune.learning_rate=3e-2,1e-2,3e-3,1e-3,3e-4,1e-4"
CACHE_SECTION = "## Pretrain once, fine-tune many"
CACHE_WORKLOADS = {
    "default experiment": [],
    # Pretraining dominates: 60 pretraining epochs, 5 of fine-tuning.
    "pretraining dominates": ["trainer.epochs=60", "finetune.epochs=5"],
}


def cache_sweeps(folder: Path) -> dict:
    """Each workload's 6-trial fine-tune sweep, in one process (the basic launcher), with
    ``pretrain_cache=off`` and then ``auto``, each in a fresh store; also the time its trials
    spent in fine-tuning (``finetune/train_seconds``, from MLflow)."""

    results = {}
    for name, overrides in CACHE_WORKLOADS.items():
        measured = {}
        for mode in ("off", "auto"):
            store = folder / f"cache-{len(results)}-{mode}"
            store.mkdir()
            uri = f"sqlite:///{store / 'mlflow.db'}"
            prepare_store(uri, "tfharness")
            wall = timed([str(BIN / "tfharness"), "-m", *overrides, CACHE_SWEEP,
                          f"pretrain_cache={mode}", "print_report=false",
                          f"tracking.uri={uri}"], store)["wall"]
            measured[mode] = {"wall": wall, **cache_store_figures(uri)}
            print(f"  {name}, pretrain_cache={mode}: {wall:.1f} s, "
                  f"{measured[mode]['pretrained']} of {measured[mode]['trials']} trials "
                  f"pretrained", flush=True)
        results[name] = measured
    return results


def cache_store_figures(uri: str) -> dict:
    """What a cache sweep's store says: trials, how many pretrained, seconds in each phase."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tfharness").experiment_id],
                              filter_string="tags.`tfharness.pretrain` != ''")
    return {"trials": len(runs),
            "pretrained": sum(r.data.tags.get("tfharness.pretrain") == "trained" for r in runs),
            "finetune_s": sum(r.data.metrics.get("finetune/train_seconds", 0.0) for r in runs),
            "pretrain_s": sum(r.data.metrics.get("pretrain/train_seconds", 0.0) for r in runs),
            # From each run's start to its end in MLflow: the trials without the sweep's start,
            # its end, and each job's preparation before its run opens.
            "runs_s": sum((r.info.end_time - r.info.start_time) / 1000 for r in runs)}


def cache_lines(results: dict) -> list:
    load = os.getloadavg()[0]
    lines = [CACHE_SECTION, "",
             f"A 6-trial sweep over fine-tune settings (`tfharness -m {CACHE_SWEEP}`), pretraining "
             f"keys fixed, in one process (Hydra's basic launcher), each mode in a fresh store. "
             f"With `pretrain_cache=auto` the first trial pretrains and the other five reuse its "
             f"model. Fine-tune and pretrain seconds are the trials' `finetune/train_seconds` and "
             f"`pretrain/train_seconds` summed; in runs, the trials' MLflow runs from start to "
             f"end, summed (the wall less the sweep's start and end and each job's preparation "
             f"before its run opens). One run each (1-minute load average {load:.1f} after, on "
             f"{os.cpu_count()} cores).", "",
             "| workload | pretrain_cache | wall s | in runs s | trials pretrained | pretrain s | "
             "fine-tune s |", "|---|---|---|---|---|---|---|"]
    for name, modes in results.items():
        for mode, m in modes.items():
            lines.append(f"| {name} | {mode} | {m['wall']:.1f} | {m['runs_s']:.1f} | "
                         f"{m['pretrained']} of {m['trials']} | {m['pretrain_s']:.1f} | "
                         f"{m['finetune_s']:.1f} |")
    default = results["default experiment"]
    ratio = default["auto"]["wall"] / default["off"]["wall"]
    dominated = results["pretraining dominates"]
    share = default["off"]["pretrain_s"] / default["off"]["wall"]
    lines += ["", "| target | measured | |", "|---|---|---|",
              f"| default experiment: auto/off wall <= 0.6 | {ratio:.2f} | "
              f"{verdict(ratio <= 0.6)} |",
              f"| default experiment: pretraining `fit` share of the off sweep's wall (what "
              f"the cache removes besides the pretrained model's evaluation, save, reload and "
              f"logging; the rest is fine-tuning and per-trial work) | "
              f"{100 * share:.0f}% | reported |",
              f"| in runs: auto/off, default experiment; pretraining dominates | "
              f"{default['auto']['runs_s'] / default['off']['runs_s']:.2f}; "
              f"{dominated['auto']['runs_s'] / dominated['off']['runs_s']:.2f} | reported |",
              f"| pretraining dominates: auto wall against off | "
              f"{dominated['auto']['wall']:.1f} s vs {dominated['off']['wall']:.1f} s "
              f"({dominated['auto']['wall'] / dominated['off']['wall']:.2f}); fine-tuning "
              f"{dominated['auto']['finetune_s']:.1f} s, one pretraining "
              f"{dominated['auto']['pretrain_s']:.1f} s | reported |"]
    return lines


# Where MLflow runs (a tracking process of its own, or the training process) and how a run
# delivers its logging calls (tfharness' delivery thread, or MLflow's own asynchronous logging).
TRACKING_VARIANTS = {
    "process (harness)": ["tracking.process=true", "tracking.async_backend=harness"],
    "thread (harness)": ["tracking.process=false", "tracking.async_backend=harness"],
    "mlflow async": ["tracking.process=false", "tracking.async_backend=mlflow"],
}
TRACKING_SECTION = "Tracking variants ("


def tracking_variants(root: Path, rounds: int) -> dict:
    """Wall, CPU (all processes) and peak RSS (sum of processes) of each tracking variant on
    the default run, the large run and an 8-job sweep in one process; the variants alternate
    within each round so a busy moment of a shared machine hits all of them."""
    folder = root / "tracking"
    folder.mkdir()
    seeds = ",".join(str(s) for s in range(8))
    workloads = {
        "default": WORKLOADS["default"]["overrides"],
        "large": WORKLOADS["large"]["overrides"],
        "sweep of 8": ["-m", *TINY, f"trainer.seed={seeds}"],
    }
    samples = {(w, v): [] for w in workloads for v in TRACKING_VARIANTS}
    loads = [os.getloadavg()[0]]
    for number in range(rounds):
        for workload, overrides in workloads.items():
            for variant, switches in TRACKING_VARIANTS.items():
                uri = f"sqlite:///{folder / (workload.split()[0] + '-' + variant.split()[0])}.db"
                prepare_store(uri, "tfharness")
                measured = timed([str(BIN / "tfharness"), *overrides, *switches,
                                  *EVERY_RUN_PRETRAINS, f"tracking.uri={uri}"], folder)
                samples[(workload, variant)].append(measured)
                print(f"  round {number + 1} {workload} / {variant}: {measured['wall']:.2f} s "
                      f"wall, {measured['cpu']:.2f} s CPU, {measured['total_rss_mib']:.0f} MiB, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        loads.append(os.getloadavg()[0])
    medians = {key: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
               for key, runs in samples.items()}
    return {"medians": medians, "rounds": rounds, "loads": loads,
            "refused": refused_call_waits()}


REFUSED_CALL = """
import os, socket, sys, time
probe = socket.socket(); probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]; probe.close()
import mlflow
from mlflow.entities import Metric
client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
start = time.perf_counter()
try:
    client.log_batch("0" * 32, metrics=[Metric("m", 1.0, 0, 0)])
except Exception:
    print(time.perf_counter() - start)
"""


def refused_call_waits() -> dict:
    """How long one synchronous MLflow call waits on a server that refuses connections (a
    stopped server) before it raises: with MLflow's own HTTP retry settings, and with the ones
    tfharness' delivery thread sets (it retries by itself, without holding training)."""
    settings = {"MLflow's defaults": {},
                "tfharness (0 retries, 10 s timeout)": {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}}
    waits = {}
    for label, extra in settings.items():
        environment = {k: v for k, v in os.environ.items()
                       if not k.startswith("MLFLOW_HTTP_REQUEST")}
        done = subprocess.run([sys.executable, "-c", REFUSED_CALL], capture_output=True,
                              text=True, env={**environment, **extra})
        waits[label] = float(done.stdout.strip().splitlines()[-1])
    return waits


def tracking_variant_lines(result: dict) -> list:
    loads = ", ".join(f"{load:.1f}" for load in result["loads"])
    lines = [f"{TRACKING_SECTION}median of {result['rounds']} rounds, the variants alternated "
             f"within each round; wall and CPU of the whole command, CPU summed over its "
             f"processes (`wait4`), peak RSS summed over its processes; 1-minute load average "
             f"at the start and after each round: {loads}, on {os.cpu_count()} cores):", "",
             "| workload | variant | wall s | CPU s | peak RSS MiB (sum) | training process MiB "
             "|", "|---|---|---|---|---|---|"]
    for (workload, variant), m in result["medians"].items():
        lines.append(f"| {workload} | {variant} | {m['wall']:.2f} | {m['cpu']:.2f} | "
                     f"{m['total_rss_mib']:.0f} | {m['rss_mib']:.0f} |")
    if result.get("refused"):
        lines += ["", "One synchronous MLflow call to a server that refuses connections waits, "
                  "before it raises:", ""]
        lines += [f"- {label}: {seconds:.1f} s" for label, seconds in result["refused"].items()]
    return lines


def fine_tune_lines(name: str, work: dict, ways: dict, repeats: int) -> list:
    """The results.md section of a fine-tune workload (harness against plain Keras only)."""
    plain, harness = ways["plain"], ways["harness"]
    ratio = harness["finetune_samples_per_s"] / plain["finetune_samples_per_s"]
    return [f"Fine-tune workload `{name}` ({work['application']} at "
            f"{'x'.join(map(str, work['data']['shape']))}, random weights; pretrain "
            f"{work['epochs']} epoch, then a new head with all but the last {work['unfrozen']} "
            f"layers of the base frozen, {work['finetune_epochs']} epochs; median of {repeats} "
            f"alternated runs; `scripts/bench --only {name}`):", "",
            "| way | wall s | pretrain samples/s | fine-tune samples/s |", "|---|---|---|---|",
            *(f"| {way} | {m['wall']:.2f} | {m['samples_per_s']:.0f} | "
              f"{m['finetune_samples_per_s']:.0f} |" for way, m in ways.items()),
            "", "| target | measured | |", "|---|---|---|",
            f"| fine-tune `fit` throughput harness/plain >= 0.95 | {ratio:.3f} | "
            f"{verdict(ratio >= 0.95)} |"]


def surgery_timing(rounds: int = 5) -> list:
    """Head surgery, selector resolution and the layer report on MobileNetV2 (alpha 1.0): the
    work tfharness adds around a fine-tune of a ~150-layer backbone, timed in this process."""
    from tfharness import finetune as ft
    from tfharness.config import FinetuneConfig, HeadConfig, StageConfig
    from tfharness.models.applications import build_keras_application

    model = build_keras_application((32, 32, 3), 10, name="MobileNetV2", weights=None)
    cfg = FinetuneConfig(head=HeadConfig(pop=1, num_classes=5), stages=[
        StageConfig(name="head", freeze=["@base"]),
        StageConfig(name="top", freeze=["preprocess", "base/0:-20", "base/*_BN"])])
    walls = {"surgery + selectors (plan)": [], "head, freeze, snapshots, report": []}
    for _ in range(rounds):
        start = time.perf_counter()
        frozen = ft.plan(model, cfg)
        walls["surgery + selectors (plan)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        tuned, _ = ft.prepare(model, cfg)
        ft.apply_freeze(tuned, frozen[1], freeze_batchnorm=True)
        before = ft.snapshot(tuned)
        report = ft.stage_report(tuned, "top", before, ft.snapshot(tuned))
        walls["head, freeze, snapshots, report"].append(time.perf_counter() - start)
    layers = len(ft.leaves(tuned))
    medians = {k: statistics.median(v) for k, v in walls.items()}
    total = sum(medians.values())
    return [f"Head surgery, selectors and report on MobileNetV2 at 32x32 ({layers} layers in "
            f"the report, {len(report.rows)} rows; median of {rounds}; "
            f"`scripts/bench --only surgery`):", "",
            "| step | seconds |", "|---|---|",
            *(f"| {k} | {v:.3f} |" for k, v in medians.items()),
            f"| together (target < 1 s) | {total:.3f} {verdict(total < 1.0)} |"]


def write_section(output: Path, lines: list) -> None:
    """Replaces the section of ``output`` whose first line starts like ``lines[0]``."""
    text = output.read_text() if output.exists() else "# tfharness benchmark\n"
    key = lines[0].split("(")[0]
    head, marker, rest = text.partition(key)
    if not marker:
        output.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")
        return
    # The section runs to the first line of text after its tables.
    lines_after = rest.split("\n")
    seen_table, cut = False, len(lines_after)
    for index, line in enumerate(lines_after[1:], start=1):
        seen_table = seen_table or line.startswith("|")
        if seen_table and line and not line.startswith("|"):
            cut = index
            break
    tail = "\n".join(lines_after[cut:])
    output.write_text(head + "\n".join(lines) + ("\n\n" + tail if tail else "\n"))


DATA_WORKLOADS = ("images", "csv", "data")


def run_data_workloads(which: str, root: Path, repeats: int, output: Path) -> None:
    """The data-source workloads of ``data_bench.py``; replaces their section in ``output``
    (with ``images`` or ``csv`` alone, the section holds that workload only)."""
    sys.path.insert(0, str(HERE))
    import data_bench

    load_before = os.getloadavg()[0]
    image_results = (data_bench.images(root, repeats, timed, prepare_store)
                     if which in ("images", "data") else None)
    csv_results = (data_bench.csv(root, repeats, timed, prepare_store)
                   if which in ("csv", "data") else None)
    lines = data_bench.section(image_results, csv_results, repeats, verdict,
                               (load_before, os.getloadavg()[0]))
    output.write_text(data_bench.replace_section(
        output.read_text() if output.exists() else "# tfharness benchmark\n", lines))
    print("\n".join(lines))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    import keras
    import mlflow
    import tensorflow as tf

    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {platform.system()} "
            f"{platform.machine()}, Python {platform.python_version()}, TensorFlow "
            f"{tf.__version__}, Keras {keras.__version__}, MLflow {mlflow.__version__}")


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="one repeat of each, for checking that the script works")
    parser.add_argument("--output", default=str(HERE / "results.md"))
    parser.add_argument("--only", choices=["save-formats", "surgery", "speed", "tracking",
                                           "pretrain-cache", *WORKLOADS, *DATA_WORKLOADS],
                        help="save-formats, surgery, speed (XLA, mixed precision, steps per "
                             "execution, batch size: speed_bench.py), tracking (the delivery "
                             "backends), pretrain-cache, images, csv or data (images and csv): "
                             "run only that section and replace it in --output; a workload: "
                             "compare on it only and print the medians (mobilenet: and replace "
                             "its section)")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    root = Path(tempfile.mkdtemp(prefix="tfharness-bench-"))
    if args.only == "speed":
        sys.path.insert(0, str(HERE))
        import speed_bench

        lines = speed_bench.section(speed_bench.measure(1 if args.quick else 3))
        output = Path(args.output)
        output.write_text(speed_bench.replace_section(
            output.read_text() if output.exists() else "# tfharness benchmark\n", lines))
        print("\n".join(lines))
        return
    if args.only == "tracking":
        lines = tracking_variant_lines(tracking_variants(root, 1 if args.quick else args.repeats))
        output = Path(args.output)
        text = output.read_text() if output.exists() else "# tfharness benchmark\n"
        if TRACKING_SECTION not in text:
            # Under a heading of its own: sections rewritten up to the next heading (the
            # pretrain-cache one) must not take it with them.
            text = text.rstrip("\n") + "\n\n## Tracking variants\n"
        output.write_text(replace_save_formats(text, lines, TRACKING_SECTION))
        print("\n".join(lines))
        return
    if args.only == "pretrain-cache":
        lines = cache_lines(cache_sweeps(root))
        output = Path(args.output)
        text = output.read_text() if output.exists() else "# tfharness benchmark\n"
        head, marker, rest = text.partition(CACHE_SECTION)
        following = rest.find("\n## ")
        output.write_text(
            head + "\n".join(lines) + (rest[following:] if following >= 0 else "\n")
            if marker else text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    if args.only in DATA_WORKLOADS:
        run_data_workloads(args.only, root, repeats, Path(args.output))
        return
    if args.only == "save-formats":
        lines = save_format_lines(save_formats(WORKLOADS["large"], root,
                                               1 if args.quick else SAVE_FORMAT_ROUNDS))
        output = Path(args.output)
        output.write_text(replace_save_formats(
            output.read_text() if output.exists() else "# tfharness benchmark\n", lines))
        print("\n".join(lines))
        return
    if args.only == "surgery":
        lines = surgery_timing(1 if args.quick else 5)
        write_section(Path(args.output), lines)
        print("\n".join(lines))
        return
    if args.only in WORKLOADS:
        ways = compare(args.only, WORKLOADS[args.only], repeats, root)
        for way, m in ways.items():
            print(f"{way}: {m['wall']:.2f} s, {m['samples_per_s']:.0f} samples/s, "
                  f"{m['rss_mib']:.0f} + {m['helpers_rss_mib']:.0f} MiB")
        if "autolog" not in ways:
            lines = fine_tune_lines(args.only, WORKLOADS[args.only], ways, repeats)
            write_section(Path(args.output), lines)
            print("\n".join(lines))
            return
        print(f"ratio harness/plain={ways['harness']['wall'] / ways['plain']['wall']:.3f} "
              f"harness/autolog={ways['harness']['wall'] / ways['autolog']['wall']:.3f} "
              f"rss={ways['harness']['total_rss_mib'] / ways['plain']['total_rss_mib']:.3f} "
              f"extra={ways['harness']['wall'] - ways['plain']['wall']:+.2f} s")
        return
    results = {}
    for name, work in WORKLOADS.items():
        print(f"workload {name}: {repeats} x (plain, autolog, harness)", flush=True)
        results[name] = compare(name, work, repeats, root)
    large = WORKLOADS["large"]
    print("input pipeline, FLOP/s, save formats, logging cost, start-up, sweeps", flush=True)
    pipeline = input_pipeline_and_flops(large)
    formats = save_formats(large, root)
    logging = logging_cost(root)
    start = startup(root, repeats)
    sweep = sweeps(root)

    big, small = results["large"], results["default"]
    ratio_plain = big["harness"]["wall"] / big["plain"]["wall"]
    ratio_autolog = big["harness"]["wall"] / big["autolog"]["wall"]
    rss_ratio = big["harness"]["total_rss_mib"] / big["plain"]["total_rss_mib"]
    default_extra = small["harness"]["wall"] - small["plain"]["wall"]
    gflops = big["harness"]["samples_per_s"] * pipeline["flops_per_sample"] / 1e9

    lines = [f"# tfharness benchmark", "",
             f"Machine: {machine()}.", "",
             f"Median of {repeats} runs each, alternated plain, autolog, harness. Wall time is "
             f"the whole process, start to exit (imports included); throughput is pretraining "
             f"samples/s measured around `fit`; peak RSS of the process from `wait4`, plus the peak of "
             f"each process it started (sampled every 0.2 s), and "
             f"their sum, which the memory target is checked on.", ""]
    lines += ["| workload | way | wall s | samples/s | peak RSS MiB | helper processes MiB "
              "| sum MiB |", "|---|---|---|---|---|---|---|"]
    for name, ways in results.items():
        if name == "mobilenet":
            continue  # its own table below: its target is fine-tune throughput
        for way, m in ways.items():
            lines.append(f"| {name} | {way} | {m['wall']:.2f} | {m['samples_per_s']:.0f} | "
                         f"{m['rss_mib']:.0f} | {m['helpers_rss_mib']:.0f} | "
                         f"{m['total_rss_mib']:.0f} |")
    lines += ["", "| target | measured | |", "|---|---|---|",
              f"| large: harness/plain wall <= 1.10 | {ratio_plain:.3f} | "
              f"{verdict(ratio_plain <= 1.10)} |",
              f"| large: harness/autolog wall < 1.0 | {ratio_autolog:.3f} | "
              f"{verdict(ratio_autolog < 1.0)} |",
              f"| large: harness/plain peak RSS (sum of processes) <= 1.15 | {rss_ratio:.3f} | "
              f"{verdict(rss_ratio <= 1.15)} |",
              f"| default: harness - plain wall <= 2 s | {default_extra:+.2f} s | "
              f"{verdict(default_extra <= 2.0)} |",
              f"| tf.data >= NumPy fit throughput | {pipeline['tfdata_samples_per_s']:.0f} vs "
              f"{pipeline['numpy_samples_per_s']:.0f} samples/s | "
              f"{verdict(pipeline['tfdata_samples_per_s'] >= pipeline['numpy_samples_per_s'])} |",
              f"| large: training GFLOP/s vs matmul peak | {gflops:.1f} of "
              f"{pipeline['matmul_peak_gflops']:.1f} GFLOP/s "
              f"({100 * gflops / pipeline['matmul_peak_gflops']:.0f}%) | reported |",
              f"| logging one epoch, cost inside the training loop | "
              f"{logging['in_loop_ms_per_epoch']:.3f} ms (written synchronously instead: "
              f"{logging['sync_ms_per_epoch']:.2f} ms; background delivery of "
              f"{logging['points_expected']} epochs finished {logging['drain_s']:.2f} s after; "
              f"{logging['points_delivered']}/{logging['points_expected']} delivered) | "
              f"{verdict(logging['points_delivered'] == logging['points_expected'])} |"]
    for label, seconds in start.items():
        lines.append(f"| start-up: {label} < 1 s | {seconds:.2f} s | {verdict(seconds < 1.0)} |")
    lines.append(f"| sweep of {sweep['jobs']} jobs in one process <= half of {sweep['jobs']} "
                 f"invocations | {sweep['one_process_s']:.1f} s vs {sweep['separate_s']:.1f} s | "
                 f"{verdict(sweep['one_process_s'] <= sweep['separate_s'] / 2)} |")
    lines += ["", *fine_tune_lines("mobilenet", WORKLOADS["mobilenet"], results["mobilenet"],
                                   repeats)]
    lines += ["", *surgery_timing()]
    lines += ["", *save_format_lines(formats)]
    lines += ["", "Logged models carry explicit pip requirements: no requirement inference."]
    lines += ["", *tracking_variant_lines(tracking_variants(root, min(repeats, 3)))]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"ratio harness/plain={ratio_plain:.3f} harness/autolog={ratio_autolog:.3f}")


if __name__ == "__main__":
    main()
