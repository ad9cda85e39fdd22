"""keras.applications models through the whole pipeline (a fast subset).

`bench/applications.py` runs every family; these three cover what the others
add to plain ResNets: squeeze-and-excitation gates built from 1x1 convs and
keras.ops (MobileNetV3), Reshape and sigmoid gates with input Rescaling and
Normalization (EfficientNet), and nested models, grouped depthwise convs,
LayerNormalization, Dense on 4-D tensors and LayerScale (ConvNeXt).
"""

import pytest

from bench.applications import check_application


@pytest.mark.parametrize(
    "family,prunable,max_macs_kept",
    [
        # All groups but the input's and the logits'.
        ("MobileNetV3", "all but 2", 0.55),
        ("EfficientNet", "all but 2", 0.55),
        # Each block's MLP hidden units (3 + 3 + 9 + 3 blocks), no more: the
        # residual stream passes through LayerNormalization.
        ("ConvNeXt", 18, 0.75),
    ],
)
def test_application_shrinks_exactly(family, prunable, max_macs_kept):
    result = check_application(family)
    if prunable == "all but 2":
        prunable = result.groups - 2
    assert result.prunable_groups == prunable
    assert result.max_diff <= 1e-3
    assert result.max_diff64 <= 1e-9  # exact, up to float64 rounding
    assert result.reload_diff == 0.0
    assert 0.3 < result.macs_kept <= max_macs_kept
