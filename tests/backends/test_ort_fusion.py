"""The rules for which DQ -> Conv -> [Relu/Clip] -> Q units onnxruntime fuses into QLinearConv."""

from __future__ import annotations

import numpy as np

from slimgraph.backends.ort_fusion import (
    activation_fuses,
    bias_on_grid,
    clamp_redundant,
    clamps_redundant,
    weight_fuses,
)


def test_activations_fuse_as_uint8_or_int8_shifted_to_uint8():
    assert activation_fuses(np.uint8, False) and activation_fuses(np.int8, True)
    assert not activation_fuses(np.int8, False)


def test_weights_fuse_as_symmetric_int8():
    assert weight_fuses(np.int8, np.zeros(4, np.int8)) and weight_fuses(np.int8, None)
    assert not weight_fuses(np.int8, np.int8(3)) and not weight_fuses(np.uint8, np.uint8(0))


def test_bias_scale_is_the_float32_product_to_a_relative_1e_6():
    x, w = np.float32(0.02), np.array([0.01, 0.03], np.float32)
    step = x * w
    assert bias_on_grid(step, x, w) and bias_on_grid(np.nextafter(step, np.float32(1)), x, w)
    assert not bias_on_grid(step * np.float32(1.001), x, w) and not bias_on_grid(step[:1], x, w[:1] * 2)


def test_relu_is_redundant_where_the_zero_point_is_the_lowest_level():
    assert clamp_redundant("relu", 0.0, None, 0.05, 0, np.uint8, True)
    assert clamp_redundant("relu", 0.0, None, 0.05, -128, np.int8, True)
    assert not clamp_redundant("relu", 0.0, None, 0.05, 0, np.int8, True)


def test_clip_is_redundant_by_clip_quant_fusion_anywhere():
    s = 0.05
    assert clamp_redundant("clip", 1e-8, None, s, 0, np.uint8, False)  # within FLT_EPSILON of the lowest level
    assert not clamp_redundant("clip", 1e-6, None, s, 0, np.uint8, True)  # rounds to it, but no max: kept


def test_clip_next_to_the_conv_is_also_redundant_by_rounding():
    s = 0.05
    assert clamp_redundant("clip", 0.0, 254.6 * s, s, 0, np.uint8, True)  # rint(254.6) = 255
    assert not clamp_redundant("clip", 0.0, 254.6 * s, s, 0, np.uint8, False)
    assert not clamp_redundant("clip", 0.0, 254.4 * s, s, 0, np.uint8, True)
    assert clamps_redundant([("clip", 0.0, 254.6 * s), ("relu", 0.0, None)], s, 0, np.uint8)
    assert not clamps_redundant([("relu", 0.0, None), ("clip", 0.0, 254.6 * s)], s, 0, np.uint8)
