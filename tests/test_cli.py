"""The command line as users type it: real subprocesses, real Hydra, real MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import TINY_SYNTHETIC

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK = [*TINY_SYNTHETIC, "model.units=[4]", "trainer.epochs=2", "finetune.epochs=1"]


def tfharness(*args, cwd, module=False, env=None):
    command = [sys.executable, "-m", "tfharness"] if module else [str(BIN / "tfharness")]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def runs_of(db: Path):
    if not db.exists():  # no store, so no run (reading it would create one)
        return []
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("tfharness")
    return [] if exp is None else client.search_runs([exp.experiment_id])


# The command line, reporting at exit whether TensorFlow was imported.
WATCH_IMPORTS = ("import atexit, sys\n"
                 "atexit.register(lambda: sys.stderr.write("
                 "'\\ntensorflow imported: %s\\n' % ('tensorflow' in sys.modules)))\n"
                 "sys.argv = ['tfharness', *sys.argv[1:]]\n"
                 "from tfharness.cli import main\n"
                 "main()\n")


def test_help_and_cfg_job_answer_without_tensorflow(tmp_path):
    def watched(*args):
        return subprocess.run([sys.executable, "-c", WATCH_IMPORTS, *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    help_out = watched("--help")
    assert help_out.returncode == 0, help_out.stderr
    assert "data: csv, digits, image_folder, npz, synthetic, tfds" in help_out.stdout
    assert "experiment: seed_example1, seed_example2, seed_example3, transfer_digits" in help_out.stdout
    job = watched("--cfg", "job", "finetune.freeze=[0]", "model=cnn")
    assert job.returncode == 0, job.stderr
    assert "name: cnn" in job.stdout and "- '0'" in job.stdout
    # Neither imported TensorFlow (its import alone takes seconds): scripts/bench times them.
    for done in (help_out, job):
        assert "tensorflow imported: False" in done.stderr, done.stderr[-500:]
    assert not list(tmp_path.iterdir())  # and wrote nothing


def test_fast_help_prints_what_hydras_help_prints(tmp_path):
    hydra_help = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv = ['tfharness', '--help', 'model=cnn']; "
                               "from tfharness.cli import _hydra_main; _hydra_main()"],
        cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "== Configuration groups ==" in hydra_help and "  name: cnn" in hydra_help
    assert tfharness("--help", "model=cnn", cwd=tmp_path).stdout == hydra_help


@pytest.mark.parametrize("args,expected", [
    (["model=transformer"], "Could not find 'model/transformer'"),
    (["trainer.epochs=ten"], "full_key: trainer.epochs"),
    (["trainer.epochs=-1"], "tfharness: Invalid value for 'trainer.epochs': got -1; allowed: "
                            "an integer >= 0."),
    (["finetune.head.num_classes=0"], "'finetune.head.num_classes': got 0"),
    (["data=npz", "data.path=/no/such.npz"], "'data.path': got '/no/such.npz'"),
    (["save_format.signatures=[embeddings]"], "tfharness: Invalid value for "
     "'save_format.signatures[0]': got 'embeddings'; allowed: one of probabilities, logits, "
     "embedding, classes."),
])
def test_bad_input_is_one_clear_error_with_exit_1(tmp_path, args, expected):
    result = tfharness(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert runs_of(tmp_path / "mlflow.db") == []


def test_unmatched_freeze_selector_lists_the_layers_and_leaves_no_run(tmp_path):
    result = tfharness(*QUICK, "finetune.freeze=[conv_*]", cwd=tmp_path)
    assert result.returncode == 1
    assert "'finetune.freeze[0]': got 'conv_*'" in result.stderr
    assert "0:dense_0, 1:head" in result.stderr and "Traceback" not in result.stderr
    assert runs_of(tmp_path / "mlflow.db") == []
    full = tfharness(*QUICK, "finetune.freeze=[conv_*]", cwd=tmp_path,
                     env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr


def test_default_command_runs_from_any_directory_into_local_sqlite(tmp_path):
    result = tfharness(*QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("data=synthetic shape=[12] samples=60")
    assert "Trainable layers per fine-tune stage" in result.stdout
    outputs = list((tmp_path / "outputs").glob("*/*/models/finetuned/saved_model.pb"))
    assert len(outputs) == 1
    assert (tmp_path / "mlartifacts").is_dir()


def test_configs_ship_in_a_regular_install(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    assert (target / "tfharness" / "conf" / "experiment" / "seed_example3.yaml").is_file()
    job = subprocess.run([sys.executable, "-m", "tfharness", "--cfg", "job",
                          "experiment=seed_example3"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(target)}, timeout=120)
    assert job.returncode == 0, job.stderr
    assert "freeze:\n  - '0'" in job.stdout
