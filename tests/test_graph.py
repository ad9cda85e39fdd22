import keras

import keras_sfp
import models
from conftest import tiny_resnet, tiny_vgg

L = keras.layers


def _groups_by_members(graph):
    return {
        tuple(sorted(p.name for p in g.producers)): g
        for g in graph.groups()
        if g.producers
    }


def test_resnet_groups_join_convs_that_meet_at_residual_adds():
    graph = keras_sfp.ChannelGraph(models.get_model("resnet20", (32, 32, 3)))
    groups = _groups_by_members(graph)
    stage1 = ("stem_conv",) + tuple(f"stage1_block{b}_conv2" for b in range(3))
    assert tuple(sorted(stage1)) in groups
    stage2 = ["stage2_block0_shortcut_conv"] + [
        f"stage2_block{b}_conv2" for b in range(3)
    ]
    assert tuple(sorted(stage2)) in groups
    # nine inner convs, each alone, plus three stage groups
    prunable = [g for g in graph.groups() if g.prunable]
    assert len(prunable) == 12
    assert sum(len(g.producers) for g in prunable) == 21  # every conv


def test_inputs_outputs_and_unknown_layers_are_boundaries():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = L.Lambda(lambda t: t * 2.0, name="lam")(a)
    c = L.Conv2D(4, 3, padding="same", name="c")(b)
    d = L.Conv2D(5, 3, padding="same", name="d")(c)
    model = keras.Model(inputs, [L.GlobalAveragePooling2D()(c), d])
    graph = keras_sfp.ChannelGraph(model)
    groups = _groups_by_members(graph)
    assert not groups[("a",)].prunable
    assert any("lam (Lambda)" in r for r in groups[("a",)].blocked)
    assert not groups[("c",)].prunable  # reaches an output through pooling
    assert groups[("c",)].blocked == ["reaches a model output"]
    assert not groups[("d",)].prunable
    input_group = [g for g in graph.groups() if "model input" in g.blocked]
    assert len(input_group) == 1


def test_sigmoid_after_a_conv_blocks_its_group():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="a")(inputs)
    x = L.Activation("sigmoid")(x)
    x = L.Conv2D(4, 3, name="b", activation="sigmoid")(x)
    x = L.Conv2D(4, 3, name="c", activation="swish")(x)
    x = L.GlobalAveragePooling2D()(x)
    graph = keras_sfp.ChannelGraph(keras.Model(inputs, L.Dense(2)(x)))
    groups = _groups_by_members(graph)
    assert not groups[("a",)].prunable and not groups[("b",)].prunable
    assert groups[("c",)].prunable


def test_flatten_and_concatenate_layouts():
    graph = keras_sfp.ChannelGraph(tiny_vgg())
    model = graph.model
    flat = graph.tensors[id(model.get_layer("flatten").output)]
    assert flat.spatial == 3 * 3 and flat.length == 10
    resnet = tiny_resnet()
    graph = keras_sfp.ChannelGraph(resnet, skip=["s0b0_r1"])
    groups = _groups_by_members(graph)
    assert not groups[("s0b0_c1",)].prunable
    assert "is in `skip`" in groups[("s0b0_c1",)].blocked[0]


def test_unknown_activations_and_division_by_tensors_are_boundaries():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a", activation=lambda t: t * 2)(inputs)
    b = L.Conv2D(4, 3, padding="same", name="b")(a)
    c = L.Conv2D(4, 3, padding="same", name="c")(inputs)
    x = L.Conv2D(4, 3, name="d")(b / (keras.ops.abs(c) + 1.0))
    graph = keras_sfp.ChannelGraph(keras.Model(inputs, L.Dense(2)(L.Flatten()(x))))
    groups = _groups_by_members(graph)
    assert "is not known to act channel by channel" in groups[("a",)].blocked[0]
    assert "TrueDivide): 2 tensor arguments" in groups[("b",)].blocked[0]
    assert not groups[("c",)].prunable and groups[("d",)].prunable


def test_sigmoid_gate_is_pruned_with_the_channels_it_gates():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="x")(inputs)
    gate = L.Conv2D(6, 1, activation="sigmoid", name="gate")(x)
    plus = L.Conv2D(6, 1, activation="sigmoid", name="plus")(x)
    y = L.Conv2D(4, 3, name="y")(L.Multiply()([x, gate]))
    z = L.Conv2D(4, 3, name="z")(L.Add()([x, plus]))
    model = keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(y + z)))
    groups = _groups_by_members(keras_sfp.ChannelGraph(model))
    # x * sigmoid(0) is zero where x is; x + sigmoid(0) is not.
    group = groups[("gate", "plus", "x")]
    assert group.blocked == [
        "pruned channels would not be zero where z consumes them "
        "(plus does not map 0 to 0)"
    ]
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="x")(inputs)
    gate = L.Conv2D(6, 1, activation="sigmoid", name="gate")(x)
    y = L.Conv2D(4, 3, name="y")(L.Multiply()([x, gate]))
    model = keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(y)))
    groups = _groups_by_members(keras_sfp.ChannelGraph(model))
    assert groups[("gate", "x")].prunable
