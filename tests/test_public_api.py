import importlib.util

import pytest

import keras_sfp


def test_every_published_name_resolves():
    names = set(keras_sfp.__all__)
    assert {"prune_filters", "SoftFilterPrune", "strip_pruning", "shrink"} <= names
    assert {"count_flops", "describe", "register_layer"} <= names
    assert {"export_saved_model", "export_tflite"} <= names
    assert names <= set(dir(keras_sfp))
    for name in names - {"export_saved_model", "export_tflite"}:
        assert getattr(keras_sfp, name) is not None


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="export needs TensorFlow"
)
def test_export_functions_import_on_first_use():
    from keras_sfp import export

    assert keras_sfp.export_tflite is export.export_tflite
    assert keras_sfp.export_saved_model is export.export_saved_model


def test_unknown_attributes_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        keras_sfp.nothing  # noqa: B018
