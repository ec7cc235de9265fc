"""Config composition and validation: real Hydra, no TensorFlow."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

import tfharness
from tfharness.config import (
    CnnConfig,
    DigitsDataConfig,
    MlpConfig,
    NpzDataConfig,
    SyntheticDataConfig,
    flatten,
    to_typed,
    validate,
)
from tfharness.errors import ConfigError

PRESETS = ["transfer_digits", "seed_example1", "seed_example2", "seed_example3"]


def typed(overrides):
    cfg = tfharness.compose(["output_dir=/tmp/unused", *overrides])
    return to_typed(cfg)


def test_default_is_the_transfer_digits_story():
    cfg = typed([])
    assert isinstance(cfg.data, DigitsDataConfig)
    assert cfg.data.pretrain_classes == [0, 1, 2, 3, 4]
    assert cfg.data.finetune_classes == [5, 6, 7, 8, 9]
    assert isinstance(cfg.model, MlpConfig)
    assert cfg.save_format.name == "savedmodel"
    assert cfg.finetune.enabled and cfg.finetune.head.num_classes == 5
    assert cfg.finetune.freeze == ["@base"]
    assert cfg.tracking.uri == "sqlite:///mlflow.db"
    assert flatten(typed(["experiment=transfer_digits"])) == flatten(cfg)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    cfg = typed([f"experiment={preset}"])
    validate(cfg)
    if preset.startswith("seed_example"):
        assert isinstance(cfg.data, SyntheticDataConfig) and cfg.data.shape == [784]
        assert cfg.model.units == [10] and cfg.data.num_classes == 10
        assert cfg.save_format.name == "savedmodel"
        assert cfg.trainer.epochs == 0


def test_seed_presets_say_what_the_seed_does():
    assert not typed(["experiment=seed_example1"]).finetune.enabled
    two = typed(["experiment=seed_example2"])
    assert two.finetune.head.num_classes == 5 and two.finetune.freeze == []
    assert two.finetune.epochs == 5
    three = typed(["experiment=seed_example3"])
    assert three.finetune.freeze == ["0"] and three.finetune.head.num_classes == 5


def test_command_line_keys_users_type_most():
    cfg = typed(["trainer.epochs=3", "trainer.batch_size=8", "trainer.learning_rate=0.01",
                 "trainer.seed=7", "finetune.epochs=2", "finetune.learning_rate=1e-4",
                 "finetune.freeze=[0,dense_*]", "finetune.head.num_classes=7",
                 "tracking.uri=http://127.0.0.1:5005", "tracking.experiment=exp",
                 "data=npz", "data.path=/data/x.npz", "model=cnn", "save_format=h5"])
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.seed) == (3, 8, 7)
    assert cfg.trainer.learning_rate == 0.01 and cfg.finetune.learning_rate == 1e-4
    assert cfg.finetune.freeze == ["0", "dense_*"] and cfg.finetune.head.num_classes == 7
    assert cfg.tracking.experiment == "exp" and cfg.tracking.uri.endswith(":5005")
    assert isinstance(cfg.data, NpzDataConfig) and cfg.data.path == "/data/x.npz"
    assert isinstance(cfg.model, CnnConfig) and cfg.save_format.name == "h5"


def test_continue_keeps_the_output_layer_unless_a_head_is_asked_for():
    kept = typed(["finetune=continue"])
    assert kept.finetune.new_head() is None
    validate(kept)
    swapped = typed(["finetune=continue", "finetune.head.num_classes=3"])
    assert swapped.finetune.new_head().num_classes == 3
    with pytest.raises(ConfigError, match="'finetune.head.pop': got 1; allowed: 0 when"):
        validate(typed(["finetune=continue", "finetune.head.pop=1"]))


def test_flatten_gives_dotted_params():
    flat = flatten(typed([]))
    assert flat["model.units"] == "[64]"
    assert flat["finetune.head.num_classes"] == "5"
    assert flat["trainer.learning_rate"] == "0.001"
    assert flat["finetune.optimizer"] == "null"


def test_unknown_group_option_is_a_composition_error():
    with pytest.raises(ConfigCompositionException, match="model/transformer"):
        typed(["model=transformer"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as info:
        typed(["trainer.epochs=ten"])
    assert isinstance(info.value.__cause__, ValidationError)
    assert "full_key: trainer.epochs" in str(info.value.__cause__)


def test_misspelt_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="trainer.epoch"):
        typed(["trainer.epoch=3"])


def test_default_run_with_another_model_composes():
    cfg = typed(["model=cnn"])
    assert isinstance(cfg.model, CnnConfig) and cfg.finetune.freeze == ["@base"]


@pytest.mark.parametrize("override,key", [
    ("trainer.epochs=-1", "trainer.epochs"),
    ("finetune.epochs=-2", "finetune.epochs"),
    ("finetune.head.num_classes=0", "finetune.head.num_classes"),
    ("trainer.learning_rate=0", "trainer.learning_rate"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.optimizer=adamax", "trainer.optimizer"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("tracking=server tracking.uri=ftp://x", "tracking.uri"),
])
def test_range_errors_name_key_value_and_what_is_allowed(override, key):
    cfg = typed(override.split())
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert f"'{key}'" in message and "allowed:" in message and "got" in message


def test_composing_and_validating_does_not_import_tensorflow():
    code = ("import sys, tfharness\n"
            "from tfharness.config import to_typed, validate\n"
            "validate(to_typed(tfharness.compose(['output_dir=/tmp/x'])))\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
