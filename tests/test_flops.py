import keras
import pytest

import keras_sfp
from conftest import tiny_resnet

L = keras.layers


def test_macs_of_a_tiny_net_match_hand_computation():
    inputs = keras.Input((10, 10, 3))
    x = L.Conv2D(4, 3, padding="same")(inputs)  # 10*10*3*3*3*4 = 10800
    x = L.Conv2D(6, 3, strides=2, padding="valid")(x)  # 4*4*3*3*4*6 = 3456
    x = L.DepthwiseConv2D(3, padding="same")(x)  # 4*4*3*3*6 = 864
    x = L.SeparableConv2D(8, 3, padding="same")(x)  # 864 + 4*4*6*8 = 1632
    x = L.Conv2D(8, 1, groups=2)(x)  # 4*4*1*1*4*8 = 512
    x = L.BatchNormalization()(x)
    x = L.MaxPooling2D()(x)  # 2x2x8
    x = L.Flatten()(x)
    x = L.Dense(5)(x)  # 32*5 = 160
    model = keras.Model(inputs, x)
    assert keras_sfp.count_flops(model) == 10800 + 3456 + 864 + 1632 + 512 + 160


def test_dense_on_a_4d_tensor_counts_every_position():
    inputs = keras.Input((3, 3, 4))
    model = keras.Model(inputs, L.Dense(2)(inputs))
    assert keras_sfp.count_flops(model) == 9 * 4 * 2


def test_wrapped_model_counts_like_the_original_and_nested_models_count():
    model = tiny_resnet()
    pruned = keras_sfp.prune_filters(model)
    assert keras_sfp.count_flops(pruned) == keras_sfp.count_flops(model)
    inputs = keras.Input((12, 12, 3))
    outer = keras.Model(inputs, L.Dense(3)(model(inputs)))
    assert keras_sfp.count_flops(outer) == keras_sfp.count_flops(model) + 5 * 3


def test_resnet20_macs_match_the_papers_count():
    import models

    macs = keras_sfp.count_flops(models.get_model("resnet20", (32, 32, 3)))
    # Paper: 4.06e7 with option-A shortcuts; our projections add 2 1x1 convs.
    projections = 16 * 16 * 16 * 32 + 8 * 8 * 32 * 64
    assert macs - projections == pytest.approx(4.06e7, rel=0.01)


def test_dynamic_spatial_size_is_rejected():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, L.Conv2D(2, 3)(inputs))
    with pytest.raises(ValueError, match="fixed input dimensions"):
        keras_sfp.count_flops(model)
