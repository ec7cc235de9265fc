"""Freeze selectors, head replacement, and the frozen-weights proof, on real Keras models."""

from __future__ import annotations

import numpy as np
import pytest

from tfharness import finetune as ft
from tfharness.config import CnnConfig, HeadConfig, MlpConfig
from tfharness.errors import ConfigError, VerificationError
from tfharness.models import build_model, compile_model

NAMES = ["flatten", "dense_0", "dense_1", "head"]


@pytest.fixture(scope="module")
def tuned():
    """An MLP (flatten, dense_0, dense_1, output) with its output swapped for a new head."""
    model = build_model(MlpConfig(units=[8, 6]), (4, 4, 1), 3)
    tuned, head_names = ft.attach_head(model, HeadConfig(pop=1, num_classes=5))
    assert head_names == ["head"]
    return model, tuned


@pytest.mark.parametrize("selectors,expected", [
    (["0"], {0}),
    (["-1"], {3}),
    (["-2", "1"], {1, 2}),
    (["0:2"], {0, 1}),
    ([":-1"], {0, 1, 2}),
    (["dense_1"], {2}),
    (["dense_*"], {1, 2}),
    (["@base"], {0, 1, 2}),
])
def test_selectors_pick_layers_by_index_slice_name_glob_and_base(tuned, selectors, expected):
    chosen = ft.resolve_selectors(selectors, tuned[1], ["head"], key="finetune.freeze")
    assert chosen == {NAMES[i] for i in expected}


@pytest.mark.parametrize("selector", ["7", "-9", "conv*", "dense_9", "5:"])
def test_a_selector_matching_nothing_lists_the_layers(tuned, selector):
    with pytest.raises(ConfigError) as info:
        ft.resolve_selectors(["0", selector], tuned[1], ["head"], key="finetune.freeze")
    message = str(info.value)
    assert "'finetune.freeze[1]'" in message and repr(selector) in message
    assert "0:flatten, 1:dense_0, 2:dense_1, 3:head" in message


def test_attach_head_rebuilds_on_the_graph_sharing_the_pretrained_layers(tuned):
    model, new = tuned
    assert [layer.name for layer in ft.layertree.visible_layers(new)] == NAMES
    assert new.output_shape == (None, 5)
    # The kept layers are the pretrained ones, weights and all.
    assert new.get_layer("dense_0") is model.get_layer("dense_0")
    with pytest.raises(ConfigError, match="'finetune.head.pop': got 5; allowed: at most 3"):
        ft.attach_head(model, HeadConfig(pop=5))


def _fit_stage(model, frozen, epochs=2):
    ft.apply_freeze(model, frozen)
    compile_model(model, "adam", 0.05)
    rng = np.random.default_rng(1)
    x = rng.random((48, *model.input_shape[1:]), dtype=np.float32)
    y = rng.integers(0, model.output_shape[-1], 48)
    before = ft.snapshot(model)
    model.fit(x, y, epochs=epochs, batch_size=8, verbose=0)
    return before, ft.snapshot(model)


def test_frozen_layers_do_not_move_batchnorm_statistics_included():
    import keras

    keras.utils.set_random_seed(0)
    base = build_model(CnnConfig(filters=[4, 4], dense_units=8), (8, 8, 1), 4)
    model, head_names = ft.attach_head(base, HeadConfig(pop=1, num_classes=3))
    frozen = ft.resolve_selectors(["conv_*", "bn_*"], model, head_names, "finetune.freeze")
    before, after = _fit_stage(model, frozen)
    report = ft.stage_report(model, "s", before, after)
    assert report.frozen_weight_change_max == 0.0
    rows = {row["layer"]: row for row in report.rows}
    assert rows["bn_0"]["trainable"] is False and rows["bn_0"]["relative_weight_change"] == 0.0
    assert rows["bn_0"]["non_trainable_params"] == 16  # gamma, beta, mean, variance of 4
    assert rows["head"]["trainable"] is True and rows["head"]["relative_weight_change"] > 0
    assert rows["dense"]["relative_weight_change"] > 0
    assert rows["flatten"]["relative_weight_change"] is None
    assert set(rows["head"]) == {"stage", "index", "layer", "class", "trainable",
                                 "trainable_params", "non_trainable_params", "output_shape",
                                 "relative_weight_change"}
    assert report.trainable_params == sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_a_frozen_layer_that_moved_fails_the_check():
    model = build_model(MlpConfig(units=[5]), (3,), 2)
    before = ft.snapshot(model)
    ft.apply_freeze(model, {"dense_0"})
    model.get_layer("dense_0").kernel.assign(np.asarray(model.get_layer("dense_0").kernel) + 1)
    with pytest.raises(VerificationError, match="dense_0"):
        ft.stage_report(model, "s", before, ft.snapshot(model))


def test_stages_default_to_one_stage_from_the_top_level_keys():
    from tfharness.config import FinetuneConfig, StageConfig

    single = ft.stages_of(FinetuneConfig(freeze=["0"], learning_rate=0.1, epochs=4))
    assert [(s.name, s.freeze, s.learning_rate, s.epochs) for s in single] == [
        ("finetune", ["0"], 0.1, 4)]
    staged = FinetuneConfig(stages=[StageConfig(name="a"), StageConfig(name="b")])
    assert [s.name for s in ft.stages_of(staged)] == ["a", "b"]
    assert ft.stage_key(staged, 1) == "finetune.stages[1].freeze"
