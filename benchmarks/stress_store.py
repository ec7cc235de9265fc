"""Concurrent runs on one tracking store (``scripts/stress-store``; see its --help).

Each round starts ``--processes`` ``tfharness`` processes at the same moment against a fresh
store, waits for all of them, then checks through ``MlflowClient`` what a user would see: one
FINISHED run per process, each with every epoch of every training metric. The summary line is
JSON, for the test that runs this script with a small count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_EPOCHS, FINETUNE_EPOCHS = 3, 2
RUN = ["data=synthetic", "data.shape=[12]", "data.num_samples=60", "data.finetune_num_samples=40",
       "data.num_classes=4", "data.finetune_num_classes=3", "finetune.head.num_classes=3",
       "model.units=[8]", f"trainer.epochs={PRETRAIN_EPOCHS}",
       f"finetune.epochs={FINETUNE_EPOCHS}", "print_report=false"]
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_health(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.3)
    raise RuntimeError(f"mlflow server at {url} did not start: "
                       f"{process.stderr.read() if process.poll() is not None else 'timeout'}")


def _as_postgres_user(command: List[str]) -> List[str]:
    # PostgreSQL refuses to run as root; Debian's package creates the postgres user.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


@contextmanager
def postgres_cluster(folder: Path) -> Iterator[str]:
    """A throwaway cluster listening on a Unix socket in ``folder``; yields its SQLAlchemy URI."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    folder.mkdir(parents=True, exist_ok=True)
    data, sockets = folder / "pgdata", folder / "pgsock"
    sockets.mkdir()
    if os.geteuid() == 0:
        # The postgres user must reach the folder through the temporary folders above it.
        for parent in [folder, *folder.parents]:
            if parent == Path(tempfile.gettempdir()):
                break
            parent.chmod(parent.stat().st_mode | 0o755)
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")

    def postgres(*command: str) -> None:
        done = subprocess.run(_as_postgres_user(list(command)), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-800:]}")

    postgres(str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E",
             "UTF8")
    postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "postgres.log"),
             "-o", f"-k {sockets} -c listen_addresses='' -c max_connections=200", "start")
    try:
        postgres(str(bin_dir / "createdb"), "-h", str(sockets), "-U", "mlflow", "mlflow")
        yield f"postgresql+psycopg2://mlflow@/mlflow?host={sockets}"
    finally:
        subprocess.run(_as_postgres_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m",
                                          "immediate", "stop"]), capture_output=True)


@contextmanager
def mlflow_server(folder: Path, backend: str) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "mlflow-server"), "--port", str(port),
         "--backend-store-uri", backend, "--artifacts-destination", str(folder / "artifacts"),
         "--workers", "2"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
        # A throwaway server: no MLflow job consumers (tfharness starts no jobs).
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ,
             "TFHARNESS_NO_SETUP": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, process)
        yield url
    finally:
        os.killpg(process.pid, 9)
        process.wait(timeout=30)


@contextmanager
def store(kind: str, folder: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'mlflow.db'}"
    elif kind == "server":
        with mlflow_server(folder, f"sqlite:///{folder / 'server.db'}") as url:
            yield url
    else:
        with postgres_cluster(folder / "pg") as backend, mlflow_server(folder, backend) as url:
            yield url


def poller(uri: str, launch=subprocess.Popen) -> subprocess.Popen:
    """Another MLflow client opening the store over and over while the runs start."""
    code = ("import mlflow, sys, time\n"
            "end = time.time() + 15\n"
            "while time.time() < end:\n"
            "    try:\n"
            "        mlflow.MlflowClient(sys.argv[1]).search_experiments()\n"
            "    except Exception:\n"
            "        pass\n"
            "    time.sleep(0.05)\n")
    return launch([sys.executable, "-c", code, uri], stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)


def check_round(uri: str, expected: int) -> List[str]:
    """What is wrong with the runs in ``uri`` (empty: every run complete)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tfharness")
    if experiment is None:
        return ["no experiment 'tfharness'"]
    runs = client.search_runs([experiment.experiment_id])
    problems = [] if len(runs) == expected else [f"{len(runs)} runs, expected {expected}"]
    for run in runs:
        if run.info.status != "FINISHED":
            problems.append(f"run {run.info.run_id} is {run.info.status}")
        for phase, epochs in (("pretrain", PRETRAIN_EPOCHS), ("finetune", FINETUNE_EPOCHS)):
            for name in EPOCH_METRICS:
                steps = sorted(m.step for m in client.get_metric_history(
                    run.info.run_id, f"{phase}/{name}"))
                if len(steps) != epochs:
                    problems.append(f"run {run.info.run_id}: {phase}/{name} has steps {steps}")
    return problems


def one_round(kind: str, processes: int, poll: bool, folder: Path,
              launch=subprocess.Popen) -> dict:
    folder.mkdir(parents=True)
    with store(kind, folder) as uri:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TFHARNESS_NO_SETUP": "1"}
        start = time.perf_counter()
        side = poller(uri, launch) if poll else None
        jobs = [launch(
            [sys.executable, "-m", "tfharness", *RUN, f"trainer.seed={i}", f"tracking.uri={uri}",
             f"output_dir={folder / f'out{i}'}", f"checkpoint_root={folder / f'ckpt{i}'}",
             f"hydra.run.dir={folder / f'hydra{i}'}"],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]
        errors = []
        for i, job in enumerate(jobs):
            _, stderr = job.communicate()
            (folder / f"stderr{i}.log").write_text(stderr)
            if job.returncode != 0:
                said = [line for line in stderr.splitlines() if line.startswith("tfharness:")]
                errors.append(f"process {i} exited {job.returncode}: "
                              f"{(said[0] if said else stderr.strip())[:600]}")
        if side is not None:
            side.kill()
            side.wait()
        seconds = time.perf_counter() - start
        problems = check_round(uri, processes)
    return {"seconds": round(seconds, 1), "failed_processes": len(errors),
            "errors": errors, "problems": problems}


def main(argv=None, launch=subprocess.Popen) -> int:
    """``launch``: what starts the Python processes (the runs and the poller), called as
    ``subprocess.Popen`` is; the test suite passes one that starts them with TensorFlow and
    MLflow imported already (tests/prewarmed.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=("sqlite", "server", "postgres"), default="sqlite")
    parser.add_argument("--poll", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    top = Path(tempfile.mkdtemp(prefix="tfharness-stress-"))
    rounds = []
    try:
        for number in range(1, args.rounds + 1):
            outcome = one_round(args.store, args.processes, args.poll, top / f"round{number}",
                                launch)
            rounds.append(outcome)
            print(f"round {number}: {args.processes} runs at once, "
                  f"{outcome['failed_processes']} failed, {len(outcome['problems'])} problems, "
                  f"{outcome['seconds']} s", flush=True)
            for line in outcome["errors"] + outcome["problems"]:
                print(f"  {line}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)
    runs = args.processes * args.rounds
    failures = sum(r["failed_processes"] for r in rounds)
    incomplete = sum(len(r["problems"]) for r in rounds)
    summary = {"store": args.store, "poll": args.poll, "processes": args.processes,
               "rounds": args.rounds, "runs": runs, "failures": failures,
               "problems": incomplete,
               "seconds_per_round": [r["seconds"] for r in rounds]}
    print(f"| {args.store}{' + poller' if args.poll else ''} | {args.processes} | {args.rounds} "
          f"| {runs} | {failures} | {incomplete} |")
    print(json.dumps(summary))
    return 0 if failures == 0 and incomplete == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
