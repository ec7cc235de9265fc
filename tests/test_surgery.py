"""Head surgery, nested selectors, BatchNormalization and save-format parity on the models users
bring: a functional residual model, the Keras guide's nested base, a keras.applications
backbone."""

from __future__ import annotations

import numpy as np
import pytest

from tfharness import finetune as ft
from tfharness import serialization
from tfharness.finetune import layertree, surgery
from tfharness.config import HeadConfig
from tfharness.errors import ConfigError
from tfharness.models import compile_model

import models_users_bring as users


def _train(model, epochs: int = 2):
    compile_model(model, "adam", 0.05)
    rng = np.random.default_rng(1)
    x = rng.random((32, *model.input_shape[1:]), dtype=np.float32)
    y = rng.integers(0, model.output_shape[-1], 32)
    before = ft.snapshot(model)
    model.fit(x, y, epochs=epochs, batch_size=8, verbose=0)
    return before, ft.snapshot(model)


def test_residual_model_cuts_on_its_graph_and_refuses_cuts_that_drop_a_branch():
    model = users.residual()
    tuned, head_names = ft.attach_head(model, HeadConfig(pop=2, num_classes=3))
    assert head_names == ["head"]
    # The head hangs from the Add: both branches are kept, shared with the pretrained model.
    assert [layer.name for layer in layertree.visible_layers(tuned)] == [
        "stem", "branch", "add", "head"]
    assert tuned.get_layer("branch") is model.get_layer("branch")
    assert tuned.output_shape == (None, 3)
    # Cutting at the stem keeps everything after it hanging from it alone: allowed.
    stem_cut, _ = ft.attach_head(model, HeadConfig(cut="stem", num_classes=3, dropout=0.5))
    assert [layer.name for layer in layertree.visible_layers(stem_cut)] == [
        "stem", "head_dropout", "head"]
    # Popping past the Add has no single layer to hang from; the error names the Add.
    with pytest.raises(ConfigError, match="'finetune.head.pop': got 3; allowed: at most 2: "
                                          "layer 'add' merges 2 inputs"):
        ft.attach_head(model, HeadConfig(pop=3))
    # Cutting inside the residual branch would drop the skip connection: named too.
    with pytest.raises(ConfigError, match="'finetune.head.cut': got 'branch'.*layer 'add' after "
                                          "the cut also reads 'stem'"):
        ft.attach_head(model, HeadConfig(cut="branch"))
    with pytest.raises(ConfigError, match="'finetune.head.cut': got 'nope'.*stem, branch, add"):
        ft.attach_head(model, HeadConfig(cut="nope"))


def test_two_outputs_are_refused_naming_the_key():
    import keras

    inputs = keras.Input((4,))
    two = keras.Model(inputs, [keras.layers.Dense(2)(inputs), keras.layers.Dense(3)(inputs)])
    with pytest.raises(ConfigError, match="'source.path': got 'two.keras'; allowed: a model "
                                          "with one input and one output.*2 output"):
        surgery.check_single_io(two, "source.path", "two.keras")


def test_nested_base_selectors_report_and_batchnorm_in_inference_mode():
    import keras

    keras.utils.set_random_seed(0)
    model = users.guide_nested()
    tuned, head_names = ft.attach_head(model, HeadConfig(cut="base", pooling="max",
                                                         num_classes=3))
    assert head_names == ["head_pool", "head"]
    assert isinstance(tuned.get_layer("head_pool"), keras.layers.GlobalMaxPooling2D)
    pick = lambda selectors: ft.resolve_selectors(selectors, tuned, head_names, "finetune.freeze")
    assert pick(["base/conv_*"]) == {"base/conv_a", "base/conv_b"}
    assert pick(["base/0:2"]) == {"base/conv_a", "base/bn"}
    assert pick(["base/-1"]) == {"base/relu_b"}
    assert pick(["@base"]) == {"base"}
    with pytest.raises(ConfigError, match=r"'finetune.freeze\[0\]': got 'base/dense\*'.*one "
                                          r"layer of base: 0:conv_a, 1:bn, 2:relu_a"):
        pick(["base/dense*"])
    with pytest.raises(ConfigError, match="'finetune.freeze\\[0\\]': got 'top/0'.*nested model "
                                          "of the model: base"):
        pick(["top/0"])

    # Stage 1 of the guide: the base frozen. Its BatchNormalization runs in inference mode
    # (statistics untouched); the head trains.
    ft.apply_freeze(tuned, pick(["@base"]))
    before, after = _train(tuned)
    report = ft.stage_report(tuned, "head", before, after)
    rows = {row["layer"]: row for row in report.rows}
    assert report.frozen_weight_change_max == 0.0
    assert [r["layer"] for r in report.rows] == [
        "base/conv_a", "base/bn", "base/relu_a", "base/conv_b", "base/bn_b", "base/relu_b",
        "head_pool", "head"]
    assert rows["base/bn"]["trainable"] is False
    assert rows["base/bn"]["relative_weight_change"] == 0.0
    assert rows["base/bn"]["non_trainable_params"] == 32  # gamma, beta, mean, variance of 8
    assert rows["head"]["relative_weight_change"] > 0

    # Stage 2: the top of the base unfrozen, BatchNormalization kept frozen as the guide says.
    ft.apply_freeze(tuned, pick(["base/0:3"]), freeze_batchnorm=True)
    before, after = _train(tuned)
    rows = {r["layer"]: r for r in ft.stage_report(tuned, "top", before, after).rows}
    assert rows["base/conv_b"]["trainable"] and rows["base/conv_b"]["relative_weight_change"] > 0
    assert rows["base/bn_b"]["trainable"] is False
    assert rows["base/bn_b"]["relative_weight_change"] == 0.0
    assert rows["base/conv_a"]["relative_weight_change"] == 0.0


def test_a_feature_map_needs_pooling_before_the_head():
    model = users.guide_nested()
    with pytest.raises(ConfigError, match="'finetune.head.pooling': got None; allowed: one of "
                                          "avg, max, flatten: the output of 'base' is a feature "
                                          r"map of shape \(None, 8, 8, 8\)"):
        ft.attach_head(model, HeadConfig(cut="base"))


def test_keras_application_preprocesses_inside_and_nests_its_backbone():
    import keras

    model = users.mobilenet()
    assert [layer.name for layer in layertree.visible_layers(model)] == [
        "preprocess", "base", "pool", "output"]
    # MobileNetV2's preprocess_input, as a built-in layer: raw pixels in, [-1, 1] inside.
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = keras.applications.mobilenet_v2.preprocess_input(pixels.copy())
    np.testing.assert_allclose(model.get_layer("preprocess")(pixels), expected, atol=1e-5)
    assert type(model.get_layer("preprocess")).__name__ == "Rescaling"
    tuned, head_names = ft.attach_head(model, HeadConfig(pop=1, num_classes=3))
    frozen = ft.resolve_selectors(["base/0:-20", "preprocess"], tuned, head_names, "k")
    assert "base/block_1_expand" in frozen and "base/block_16_project" not in frozen
    assert len(layertree.leaves(tuned)) > 150


def test_a_channel_swapping_preprocess_input_is_a_saved_affine_layer(tmp_path):
    """ResNet50's (and VGG's) preprocess_input swaps RGB to BGR and subtracts the ImageNet mean:
    not a per-channel scale, so it becomes tfharness' AffinePixels, which saves and reloads;
    EfficientNet preprocesses inside itself, so it gets no layer."""
    import keras

    from tfharness.models import applications

    layer = applications.preprocessing_layer(keras.applications.ResNet50, 3)
    assert type(layer).__name__ == "AffinePixels"
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    expected = keras.applications.resnet50.preprocess_input(pixels.copy())
    np.testing.assert_allclose(layer(pixels), expected, atol=1e-3)
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, layer(inputs))
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(reloaded(pixels), expected, atol=1e-3)
    assert applications.preprocessing_layer(keras.applications.EfficientNetB0, 3) is None


@pytest.mark.parametrize("make", [users.residual, users.guide_nested, users.mobilenet],
                         ids=["residual", "nested", "keras_application"])
def test_every_format_reloads_functional_and_nested_models_exactly(make, tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = make()
    users.stir_statistics(model)
    probe = np.random.default_rng(2).uniform(0, 2, (8, *model.input_shape[1:])).astype("float32")
    for fmt in ("savedmodel", "keras", "h5"):
        trip = serialization.save_reload_verify(
            model, serialization.artifact_path(tmp_path, fmt, fmt), fmt, probe, 0.0)
        assert trip.max_abs_diff == 0.0, fmt
        assert trip.serving_max_abs_diff in (None, 0.0), fmt
        # BatchNormalization statistics included: every weight is back, bit for bit.
        for saved, loaded in zip(model.weights, trip.model.weights):
            np.testing.assert_array_equal(np.asarray(saved), np.asarray(loaded))
