"""Training speed options on this machine: XLA, mixed precision, steps per execution, batch size.

Run through ``scripts/bench --only speed`` (``--quick``: one round). In one process, alternating
the variants round by round so a busy moment on a shared machine hits them all, it measures:

- the large workload's MLP (784-512-512-10, Adam, batch 128) trained with the harness's own
  builder, compile and input pipeline, one epoch after a warm-up epoch, under each option;
- the same model's training FLOPs as achieved GFLOP/s against the float32 matmul peak (a
  2048x2048 product), per CPU second of this process (steady on a loaded machine: other
  processes' time is not counted), and how many cores the loop kept busy;
- the eight matmuls of one training step at the model's shapes, alone, in one compiled
  function: the most any training loop could reach at that batch size;
- an image workload: the shipped CNN on synthetic 32x32x3 images under the same options.

Writes (or replaces) the "Speed options" section of ``benchmarks/results.md``.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List

LARGE = {"units": [512, 512], "features": 784, "classes": 10, "batch": 128, "samples": 20000}
IMAGES = {"shape": (32, 32, 3), "classes": 10, "batch": 128, "samples": 4000,
          "filters": [32, 64], "dense_units": 128}
MLP_VARIANTS = {
    "float32 (default)": {},
    "jit_compile=true": {"jit_compile": True},
    "precision=mixed_bfloat16": {"precision": "mixed_bfloat16"},
    "precision=mixed_float16": {"precision": "mixed_float16"},
    "steps_per_execution=16": {"steps_per_execution": 16},
    "mixed_bfloat16 + steps_per_execution=16": {"precision": "mixed_bfloat16",
                                                "steps_per_execution": 16},
    "batch_size=512": {"batch": 512},
    "batch_size=512 + mixed_bfloat16": {"batch": 512, "precision": "mixed_bfloat16"},
    "batch_size=512 + mixed_bfloat16 + steps_per_execution=16": {
        "batch": 512, "precision": "mixed_bfloat16", "steps_per_execution": 16},
}
IMAGE_VARIANTS = {
    "float32 (default)": {},
    "jit_compile=true": {"jit_compile": True},
    "precision=mixed_bfloat16": {"precision": "mixed_bfloat16"},
    "steps_per_execution=16": {"steps_per_execution": 16},
}
SECTION = "Speed options ("
END = "<!-- end of the speed options section -->"


def mlp_flops_per_sample(work: Dict = LARGE) -> int:
    """Dense layers: 2*in*out FLOPs per sample forward, the backward pass about twice that."""
    widths = [work["features"], *work["units"], work["classes"]]
    return 3 * sum(2 * a * b for a, b in zip(widths, widths[1:]))


def _train_rate(build: Callable, x, y, batch: int, jit_compile=False, precision="float32",
                steps_per_execution: int = 1) -> Dict[str, float]:
    """samples/s per wall second and per CPU second of one epoch, after a warm-up epoch."""
    import keras

    from tfharness.data import make_dataset
    from tfharness.models import compile_model, restoring_policy, set_policy

    with restoring_policy():
        keras.backend.clear_session()
        set_policy(precision)
        keras.utils.set_random_seed(0)
        model = build()
        compile_model(model, "adam", 1e-3, jit_compile=jit_compile,
                      steps_per_execution=steps_per_execution)
        dataset = make_dataset((x, y), batch, shuffle=True, seed=0)
        model.fit(dataset, epochs=1, verbose=0, shuffle=False)  # trace, compile, warm up
        wall, cpu = time.perf_counter(), time.process_time()
        model.fit(dataset, epochs=1, verbose=0, shuffle=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": len(x) / wall, "cpu": len(x) / cpu}


def matmul_peak() -> Dict[str, float]:
    """Best float32 GFLOP/s of a 2048x2048 matmul, per wall and per CPU second."""
    import tensorflow as tf

    n, reps = 2048, 4
    a, b = tf.random.normal((n, n)), tf.random.normal((n, n))
    tf.matmul(a, b).numpy()
    best_wall = best_cpu = float("inf")
    for _ in range(5):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(reps):
            c = tf.matmul(a, b)
        c.numpy()
        best_wall = min(best_wall, (time.perf_counter() - wall) / reps)
        best_cpu = min(best_cpu, (time.process_time() - cpu) / reps)
    return {"wall": 2 * n ** 3 / best_wall / 1e9, "cpu": 2 * n ** 3 / best_cpu / 1e9}


def step_matmuls(batch: int, dtype: str = "float32", work: Dict = LARGE) -> Dict[str, float]:
    """GFLOP/s of one training step's matmuls alone (forward, weight and input gradients) at
    the MLP's shapes, 20 steps per call of one compiled function: no optimizer, activation,
    loss, input pipeline or per-step dispatch."""
    import tensorflow as tf

    widths = [work["features"], *work["units"], work["classes"]]
    kind = getattr(tf, dtype)
    ws = [tf.cast(tf.random.normal((a, b)), kind) for a, b in zip(widths, widths[1:])]
    x = tf.cast(tf.random.normal((batch, widths[0])), kind)

    @tf.function
    def steps(x):
        total = tf.zeros((), kind)
        for _ in range(20):
            acts = [x]
            for w in ws:
                acts.append(tf.matmul(acts[-1], w))
            grad = acts[-1]
            for i in reversed(range(len(ws))):
                total += tf.reduce_sum(tf.matmul(acts[i], grad, transpose_a=True)[:1, :1])
                if i:
                    grad = tf.matmul(grad, ws[i], transpose_b=True)
            x = x + tf.cast(total, kind) * 0
        return total

    steps(x).numpy()
    best_wall = best_cpu = float("inf")
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        steps(x).numpy()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    flops = 20 * batch * mlp_flops_per_sample(work)
    return {"wall": flops / best_wall / 1e9, "cpu": flops / best_cpu / 1e9}


def _medians(samples: Dict[str, List[Dict[str, float]]]) -> Dict[str, Dict[str, float]]:
    return {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            for name, runs in samples.items()}


def measure(rounds: int) -> Dict:
    """Every variant of both workloads, plus the peaks, alternated over ``rounds`` rounds."""
    import numpy as np

    from tfharness.config import CnnConfig, MlpConfig
    from tfharness.models import build_model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((LARGE["samples"], LARGE["features"])).astype(np.float32)
    y = rng.integers(0, LARGE["classes"], LARGE["samples"]).astype(np.int32)
    images = rng.standard_normal((IMAGES["samples"], *IMAGES["shape"])).astype(np.float32)
    labels = rng.integers(0, IMAGES["classes"], IMAGES["samples"]).astype(np.int32)
    mlp = lambda: build_model(MlpConfig(units=LARGE["units"]), (LARGE["features"],),  # noqa: E731
                              LARGE["classes"])
    cnn = lambda: build_model(CnnConfig(filters=IMAGES["filters"],  # noqa: E731
                                        dense_units=IMAGES["dense_units"]),
                              IMAGES["shape"], IMAGES["classes"])
    samples = {key: [] for key in ("peak", "matmuls@128", "matmuls@512", "bf16 matmuls@128",
                                   *(f"mlp {v}" for v in MLP_VARIANTS),
                                   *(f"cnn {v}" for v in IMAGE_VARIANTS))}
    load_before = os.getloadavg()[0]
    for round_ in range(rounds):
        samples["peak"].append(matmul_peak())
        samples["matmuls@128"].append(step_matmuls(128))
        samples["matmuls@512"].append(step_matmuls(512))
        samples["bf16 matmuls@128"].append(step_matmuls(128, "bfloat16"))
        for name, options in MLP_VARIANTS.items():
            options = dict(options)
            batch = options.pop("batch", LARGE["batch"])
            samples[f"mlp {name}"].append(_train_rate(mlp, x, y, batch, **options))
            print(f"  speed round {round_ + 1}: mlp {name}: "
                  f"{samples[f'mlp {name}'][-1]['wall']:.0f} samples/s", flush=True)
        for name, options in IMAGE_VARIANTS.items():
            samples[f"cnn {name}"].append(_train_rate(cnn, images, labels, IMAGES["batch"],
                                                      **options))
            print(f"  speed round {round_ + 1}: cnn {name}: "
                  f"{samples[f'cnn {name}'][-1]['wall']:.0f} samples/s", flush=True)
    return {"medians": _medians(samples), "rounds": rounds,
            "load": (load_before, os.getloadavg()[0]), "cpus": os.cpu_count()}


def section(result: Dict) -> List[str]:
    """The results.md lines for ``result`` (from :func:`measure`).

    A wall-clock peak measured on a loaded machine is meaningless (the long matmul is
    descheduled), so efficiency is given per CPU second of this process; "cores busy" (CPU
    seconds per wall second) says how much of the machine the loop used.
    """
    m, flops = result["medians"], mlp_flops_per_sample()
    peak = m["peak"]
    lines = [f"{SECTION}median of {result['rounds']} alternated rounds, one epoch each after a "
             f"warm-up epoch, in one process; 1-minute load average {result['load'][0]:.1f} "
             f"before, {result['load'][1]:.1f} after, on {result['cpus']} cores. The float32 "
             f"matmul peak (2048x2048): {peak['cpu']:.1f} GFLOP/s per CPU second, "
             f"{peak['wall']:.1f} per wall second at that load):", "",
             f"Large workload's MLP (784-512-512-10, {LARGE['samples']} samples, Adam):", "",
             "| variant | samples/s | GFLOP/s | GFLOP per CPU s | % of peak per CPU s | "
             "cores busy |", "|---|---|---|---|---|---|"]

    def row(name: str, rate: Dict[str, float]) -> str:
        wall, cpu = rate["wall"] * flops / 1e9, rate["cpu"] * flops / 1e9
        return (f"| {name} | {rate['wall']:.0f} | {wall:.1f} | {cpu:.1f} | "
                f"{100 * cpu / peak['cpu']:.0f}% | {wall / cpu:.2f} |")

    for name in MLP_VARIANTS:
        lines.append(row(name, m[f"mlp {name}"]))
    for key, label in (("matmuls@128", "the step's 8 matmuls alone, batch 128"),
                       ("matmuls@512", "the step's 8 matmuls alone, batch 512"),
                       ("bf16 matmuls@128", "the step's 8 matmuls alone, batch 128, bfloat16")):
        # As samples/s: the rate a training loop doing only these matmuls would reach.
        lines.append(row(label, {k: v / flops * 1e9 for k, v in m[key].items()}))
    lines += ["", f"Image workload (the shipped cnn, filters {IMAGES['filters']}, dense "
                  f"{IMAGES['dense_units']}, on {IMAGES['samples']} synthetic "
                  f"{'x'.join(map(str, IMAGES['shape']))} images, batch {IMAGES['batch']}):", "",
              "| variant | samples/s | samples per CPU s | cores busy |", "|---|---|---|---|",
              *(f"| {name} | {m[f'cnn {name}']['wall']:.0f} | {m[f'cnn {name}']['cpu']:.0f} | "
                f"{m[f'cnn {name}']['wall'] / m[f'cnn {name}']['cpu']:.2f} |"
                for name in IMAGE_VARIANTS)]
    return lines


def replace_section(text: str, lines: List[str]) -> str:
    """``text`` (a results.md) with its speed-options section replaced by ``lines`` (appended
    when it has none); the section ends at its :data:`END` line."""
    head, marker, rest = text.partition(SECTION)
    if not marker:
        return text.rstrip("\n") + "\n\n" + "\n".join([*lines, END]) + "\n"
    _, end, tail = rest.partition(END)
    return head + "\n".join([*lines, END]) + (tail if end else "\n")
