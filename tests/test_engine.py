"""`FilterPruner` (the engine the callback drives) and `spec_of`."""

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import random_data, tiny_resnet
from keras_sfp.core.prune import wrappers


def test_the_engine_prunes_what_the_callback_prunes():
    model = tiny_resnet(widths=(16, 32))
    a = keras_sfp.prune_filters(model, rate=0.5, round_to=1)
    b = keras_sfp.prune_filters(model, rate=0.5, round_to=1)
    entries = keras_sfp.FilterPruner(a).prune(0)
    x, y = random_data(b, n=8)
    b.compile("sgd", "mse")
    callback = keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True)
    callback.set_model(b)
    assert callback.prune(0) == entries
    assert entries["sfp_rate"] == 0.5 and entries["sfp_pruned"] > 0
    for wa, wb in zip(wrappers(a), wrappers(b)):
        np.testing.assert_array_equal(wa.mask, wb.mask)
        assert wa.last_event == wb.last_event == 0.0
    # Each group loses half its channels, zeroed in the weights too.
    for w in wrappers(a):
        kernel = keras.ops.convert_to_numpy(w.kernel)
        assert np.all(kernel[..., w.mask == 0] == 0)
        assert w.mask.sum() == len(w.mask) // 2


def test_the_engine_rescales_the_schedule_and_keeps_masks_without_rescoring():
    pruned = keras_sfp.prune_filters(
        tiny_resnet(widths=(16, 32)), rate=0.5, schedule="asymptotic", round_to=1
    )
    pruner = keras_sfp.FilterPruner(pruned)
    assert pruner.never_pruned
    assert pruner.rate(0, epochs=4) < pruner.rate(3, epochs=4)
    assert pruner.rate(3, epochs=4) == pytest.approx(0.5)
    assert pruner.rate(9, epochs=4) == pruner.rate(3, epochs=4)  # the last one
    pruner.prune(3, epochs=4)
    masks = [w.mask.copy() for w in wrappers(pruned)]
    for w in wrappers(pruned):  # training moves the weights
        w.kernel.assign(keras.ops.convert_to_numpy(w.kernel) + 1.0)
    assert pruner.prune(4, rescore=False, epochs=4)["sfp_revived"] == 0
    for w, mask in zip(wrappers(pruned), masks):
        np.testing.assert_array_equal(w.mask, mask)
    assert not pruner.never_pruned


def test_the_engine_refuses_a_model_without_wrappers():
    with pytest.raises(ValueError, match="prepared by keras_sfp.prune_filters"):
        keras_sfp.FilterPruner(tiny_resnet())


def test_spec_of_reads_the_settings_and_survives_a_keras_file(tmp_path):
    pruned = keras_sfp.prune_filters(
        tiny_resnet(), rate=0.25, criterion="fpgm", coupling="layer", round_to=4
    )
    spec = keras_sfp.spec_of(pruned)
    assert spec == keras_sfp.PruningSpec(0.25, "fpgm", None, "layer", 4)
    pruned.save(tmp_path / "p.keras")
    assert keras_sfp.spec_of(keras.saving.load_model(tmp_path / "p.keras")) == spec


def test_spec_of_refuses_wrappers_that_disagree():
    pruned = keras_sfp.prune_filters(tiny_resnet(), rate=0.25)
    wrappers(pruned)[1].round_to = 1
    with pytest.raises(ValueError, match="disagree on `round_to`"):
        keras_sfp.spec_of(pruned)
    with pytest.raises(ValueError, match="disagree on `round_to`"):
        keras_sfp.FilterPruner(pruned)


def test_a_callback_warns_once_over_several_fits():
    import warnings

    pruned = keras_sfp.prune_filters(tiny_resnet(), rate=0.5, round_to=1)
    pruned.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    x, y = random_data(pruned, n=8)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=0, reset_momentum=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            pruned.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    slots = [w for w in caught if "found no optimizer slot" in str(w.message)]
    assert len(slots) == 1
