"""The export's parts that need no pipeline: preprocessing as layers, and the choice of run."""

import numpy as np
import pytest

from transferlab import backbones, export, images


@pytest.mark.parametrize("name", sorted(backbones.REGISTRY))
@pytest.mark.parametrize("variant", backbones.VARIANTS)
def test_preprocessing_layers_reproduce_the_pipeline_bit_for_bit(name, variant):
    import keras

    record = backbones.preprocessing_record(backbones.get(name), variant, 40)
    inputs = keras.Input((None, None, 3), dtype="uint8")
    layers = keras.Model(inputs, export.preprocessing_layers(inputs, record))
    rng = np.random.default_rng(0)
    for shape in [(300, 300), (40, 40), (17, 63)]:  # down, same size, up with another aspect ratio
        batch = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
        expected = backbones.normalise(images.resize(batch, record), record).numpy()
        np.testing.assert_array_equal(layers(batch).numpy(), expected)


def candidate(name, accuracy, loss):
    return {"run_name": name, "val_accuracy": accuracy, "val_loss": loss}


def test_the_best_validation_accuracy_wins_then_the_lower_loss_then_the_name():
    found = [
        candidate("train_head/b-native", 0.70, 0.5),
        candidate("finetune_top/b-native", 0.75, 0.9),
        candidate("frozen_end_to_end/b-native", 0.75, 0.6),
        candidate("train_head/a-native", 0.75, 0.6),
    ]
    assert export.choose(found, None)["run_name"] == "frozen_end_to_end/b-native"
    assert export.choose(found[::-1], None)["run_name"] == "frozen_end_to_end/b-native"  # order does not matter
    found.append(candidate("finetune_top/nan", 0.75, None))  # a NaN loss never wins a tie
    assert export.choose(found, None)["run_name"] == "frozen_end_to_end/b-native"


def test_a_named_run_is_exported_and_an_unknown_one_is_refused_naming_the_choices():
    found = [candidate("train_head/b-native", 0.70, 0.5), candidate("finetune_top/b-native", 0.75, 0.9)]
    assert export.choose(found, "train_head/b-native")["run_name"] == "train_head/b-native"
    with pytest.raises(export.ExportError, match="'nope'.*train_head/b-native, finetune_top/b-native"):
        export.choose(found, "nope")
    with pytest.raises(export.ExportError, match="nothing to export"):
        export.choose([], None)


def test_model_name_per_dataset():
    assert export.model_name({"source": "elpv", "folder": None}, None) == "transferlab-elpv"
    assert export.model_name({"source": "folder", "folder": "/data/my cells/"}, None) == "transferlab-my-cells"
    assert export.model_name({"source": "elpv", "folder": None}, "mine") == "mine"
