"""The layer table (`tf_pfq.layers.table`) is complete and agrees with the passes.

Every entry has one tiny sample model below; from it the tests check that the
entry's fields describe the real layer (kernel axes match its channel counts, the
MACs match a hand formula through `tf_pfq.cost`, op layers are found by name) and
that the fields agree with each other across passes (a grid-preserving layer is
lowered as a pass-through, a producer has a kernel, ...). A new entry without a
sample fails `test_every_entry_has_a_sample`.
"""

from __future__ import annotations

import importlib
import types

import numpy as np
import pytest

from tf_pfq import cost, quantizers
from tf_pfq.compat import keras
from tf_pfq.layers import table
from tf_pfq.layers.ops import ElementwiseOp
from tf_pfq.layers.table import Absorb, Channels, Family, Lowering, Quant

L = keras.layers
H, W, C = 6, 6, 4
# The modules themselves: `tf_pfq.prune` etc. are also the names of functions.
PASSES = [
    importlib.import_module(f"tf_pfq.{name}")
    for name in (
        "prune",
        "fold",
        "cost",
        "quantize",
        "quantizers",
        "dfq",
        "export.convert",
        "plots",
        # The export's lowering moved out of export.convert into these.
        "export.lowering",
        "export.weighted",
        # Pruning, quantization and export split into modules by job.
        "pruning.plan",
        "pruning.rules",
        "pruning.rewrite",
        "pruning.padding",
        "pruning.context",
        "quant_plan",
        "quant_math",
        "export.plan",
        "export.policies",
        "export.checks",
    )
]
prune_lib, convert = PASSES[0], PASSES[6]


def _image(layer_fn, shape=(H, W, C)):
    inputs = keras.Input(shape, name="x")
    return keras.Model(inputs, layer_fn(inputs))


# {entry name: (model builder, name of the sample layer or None for the input, MACs)}
SAMPLES = {
    "InputLayer": (lambda: _image(L.ReLU()), "x", 0),
    "Conv2D": (lambda: _image(L.Conv2D(3, 3, padding="same", name="s")), "s", H * W * 9 * C * 3),
    "Conv2DTranspose": (
        lambda: _image(L.Conv2DTranspose(3, 3, strides=2, name="s")),
        "s",
        # Output positions times kernel weights, as cost counts every Conv2D kind.
        13 * 13 * 9 * 3 * C,
    ),
    "DepthwiseConv2D": (
        lambda: _image(L.DepthwiseConv2D(3, depth_multiplier=2, name="s")),
        "s",
        4 * 4 * 9 * C * 2,
    ),
    "Dense": (lambda: _image(L.Dense(5, name="s"), (7, C)), "s", 7 * C * 5),
    "SeparableConv2D": (
        lambda: _image(L.SeparableConv2D(5, 3, padding="same", name="s")),
        "s",
        H * W * (9 * C + C * 5),
    ),
    "BatchNormalization": (lambda: _image(L.BatchNormalization(name="s")), "s", 0),
    "Rescaling": (lambda: _image(L.Rescaling(0.5, name="s")), "s", 0),
    "Normalization": (
        lambda: _image(L.Normalization(mean=[0.0] * C, variance=[1.0] * C, name="s")),
        "s",
        0,
    ),
    "ReLU": (lambda: _image(L.ReLU(6.0, name="s")), "s", 0),
    "LeakyReLU": (lambda: _image(L.LeakyReLU(name="s")), "s", 0),
    "ELU": (lambda: _image(L.ELU(name="s")), "s", 0),
    "ThresholdedReLU": (lambda: _image(L.ThresholdedReLU(name="s")), "s", 0),
    "PReLU": (lambda: _image(L.PReLU(name="s")), "s", 0),
    "Activation": (lambda: _image(L.Activation("tanh", name="s")), "s", 0),
    "Softmax": (lambda: _image(L.Softmax(name="s")), "s", 0),
    "Add": (lambda: _image(lambda x: L.Add(name="s")([x, L.ReLU()(x)])), "s", 0),
    "Multiply": (lambda: _image(lambda x: L.Multiply(name="s")([x, L.ReLU()(x)])), "s", 0),
    "Concatenate": (
        lambda: _image(lambda x: L.Concatenate(name="s")([x, L.ReLU()(x)])),
        "s",
        0,
    ),
    "MaxPooling2D": (lambda: _image(L.MaxPooling2D(name="s")), "s", 0),
    "GlobalMaxPooling2D": (lambda: _image(L.GlobalMaxPooling2D(name="s")), "s", 0),
    "AveragePooling2D": (lambda: _image(L.AveragePooling2D(name="s")), "s", 0),
    "GlobalAveragePooling2D": (lambda: _image(L.GlobalAveragePooling2D(name="s")), "s", 0),
    "MaxPooling1D": (lambda: _image(L.MaxPooling1D(name="s"), (W, C)), "s", 0),
    "AveragePooling1D": (lambda: _image(L.AveragePooling1D(name="s"), (W, C)), "s", 0),
    "GlobalMaxPooling1D": (lambda: _image(L.GlobalMaxPooling1D(name="s"), (W, C)), "s", 0),
    "GlobalAveragePooling1D": (
        lambda: _image(L.GlobalAveragePooling1D(name="s"), (W, C)),
        "s",
        0,
    ),
    "ZeroPadding2D": (lambda: _image(L.ZeroPadding2D(name="s")), "s", 0),
    "Cropping2D": (lambda: _image(L.Cropping2D(1, name="s")), "s", 0),
    "Flatten": (lambda: _image(L.Flatten(name="s")), "s", 0),
    "Reshape": (lambda: _image(L.Reshape((H * W, C), name="s")), "s", 0),
    "UpSampling2D": (lambda: _image(L.UpSampling2D(name="s")), "s", 0),
    "Dropout": (lambda: _image(L.Dropout(0.5, name="s")), "s", 0),
    "SpatialDropout2D": (lambda: _image(L.SpatialDropout2D(0.5, name="s")), "s", 0),
    "GaussianDropout": (lambda: _image(L.GaussianDropout(0.5, name="s")), "s", 0),
    "GaussianNoise": (lambda: _image(L.GaussianNoise(0.5, name="s")), "s", 0),
    "AlphaDropout": (lambda: _image(L.AlphaDropout(0.5, name="s")), "s", 0),
    "TFOpLambda": (lambda: _image(lambda x: x + 3.0), None, 0),
    "SlicingOpLambda": (lambda: _image(lambda x: x[:, :, :, :2]), None, 0),
    "Lambda": (lambda: _image(L.Lambda(lambda t: 2.0 * t, name="s")), "s", 0),
    # The class entry is that of its products; tests/test_op_layers.py checks the others.
    "ElementwiseOp": (lambda: _image(ElementwiseOp("multiply", 0.5, name="s")), "s", 0),
}


def _sample(name):
    build, layer_name, macs = SAMPLES[name]
    model = build()
    layer = model.get_layer(layer_name) if layer_name else model.layers[-1]
    return model, layer, macs


NAMES = [entry.name for entry in table.entries()]


def test_every_entry_has_a_sample():
    assert sorted(SAMPLES) == sorted(NAMES)
    assert len(NAMES) == len(set(NAMES))


@pytest.mark.parametrize("name", NAMES)
def test_entry_is_found_for_its_sample_and_by_name(name):
    _, layer, _ = _sample(name)
    assert type(layer).__name__ == name
    assert table.entry_for(layer) is table.by_name(name) is table.lookup(layer)


@pytest.mark.parametrize("name", NAMES)
def test_macs_agree_with_cost_on_a_tiny_model(name):
    model, layer, expected = _sample(name)
    entry = table.by_name(name)
    assert cost.count_macs(model) == expected
    assert cost.layer_costs(model)[layer.name].macs == expected
    shape = tuple(layer.output_shape)
    assert (entry.macs(layer, shape) if entry.macs else 0) == expected


@pytest.mark.parametrize("name", [e.name for e in table.entries() if e.kernel is not None])
def test_kernel_axes_are_the_channels_of_the_sample(name):
    _, layer, _ = _sample(name)
    layout = table.by_name(name).kernel
    kernel = getattr(layer, layout.attr).numpy()
    c_in, c_out = layer.input_shape[-1], layer.output_shape[-1]
    assert kernel.shape[layout.in_axis] == c_in
    if layout.depthwise:
        assert kernel.shape[-2] * kernel.shape[-1] == c_out
    else:
        assert kernel.shape[layout.out_axis] == c_out


@pytest.mark.parametrize("name", NAMES)
def test_fields_agree_across_passes(name):
    _, layer, _ = _sample(name)
    e = table.by_name(name)
    # Pruning: the channel role and the absorption rule go together.
    allowed = {
        Channels.PRODUCER: {Absorb.KERNEL_SUM, Absorb.TRANSPOSED_KERNEL_SUM},
        Channels.DEPTHWISE: {Absorb.DEPTHWISE},
        Channels.PASS_THROUGH: {
            Absorb.BATCHNORM,
            Absorb.FUNCTION,
            Absorb.IDENTITY,
            Absorb.ZERO_PADDING,
        },
        Channels.RESHAPE: {Absorb.FLATTEN, Absorb.RESHAPE},
        Channels.MERGE: {Absorb.SUM, Absorb.PRODUCT},
        Channels.CONCAT: {Absorb.CONCAT},
        Channels.STOP: {Absorb.NONE},
    }
    assert e.absorb in allowed[e.channels]
    assert (e.absorb is Absorb.FUNCTION) == (e.elementwise is not None)
    # Producers own a kernel, are quantized with it, are lowered with it and cost MACs.
    if e.channels in (Channels.PRODUCER, Channels.DEPTHWISE):
        assert e.kernel is not None and e.macs is not None
    assert (e.quant is Quant.WEIGHTS) == (e.kernel is not None)
    assert (e.lowering is Lowering.WEIGHTED) == (e.kernel is not None)
    # Quantization: a grid-preserving output carries no quantizer of its own, and the
    # export keeps the input's grid for it.
    if e.preserves_grid(layer):
        assert e.quant in (Quant.PRESERVES, Quant.OUTPUT)
        assert e.lowering in (Lowering.PASS_THROUGH, Lowering.RESIZE)
    if e.quant is Quant.PRESERVES:
        assert e.preserves_grid(layer) and e.lowering is Lowering.PASS_THROUGH
    assert quantizers.preserves_grid(layer) == e.preserves_grid(layer)
    # A layer the export lowers is one `apply` knows (none is left unquantized by accident).
    if e.lowering is not Lowering.REFUSED:
        assert e.quant is not Quant.NONE and e.quant is not Quant.REFUSED
    if e.lowering is Lowering.REFUSED and e.refusal is not None:
        assert layer.name in e.refusal(layer.name, layer)


def test_nearest_upsampling_keeps_the_grid_bilinear_does_not():
    entry = table.by_name("UpSampling2D")
    assert entry.preserves_grid(L.UpSampling2D(interpolation="nearest"))
    assert not entry.preserves_grid(L.UpSampling2D(interpolation="bilinear"))


def test_elementwise_functions_compute_the_layer_channel_by_channel():
    values = np.array([[-2.0, -0.5, 0.5, 3.0]], np.float32)
    for layer in (L.ReLU(), L.ELU(), L.Activation("tanh")):
        fn = table.entry_for(layer).elementwise(layer, {})
        np.testing.assert_allclose(fn(values), layer(values))
    assert table.entry_for(L.Activation("softmax")).elementwise(L.Activation("softmax"), {}) is None


def test_subclass_is_found_through_its_base_class():
    class MyConv(L.Conv2D):
        pass

    assert table.entry_for(MyConv(2, 1)) is table.by_name("Conv2D")
    assert table.by_name("MyConv") is None


# Registered so that passes rebuilding the model from its config can recreate it.
@keras.utils.register_keras_serializable(package="test_layer_table")
class _Scale(L.Layer):
    def call(self, x):
        return 2.0 * x


def _custom_model():
    inputs = keras.Input((4, 4, 2), name="x")
    x = L.Conv2D(3, 1, use_bias=False, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = _Scale(name="scale")(x)
    return keras.Model(inputs, L.Conv2D(2, 1, name="head")(x))


def test_unknown_custom_layer_is_refused_naming_layer_and_class():
    model = _custom_model()
    layer = model.get_layer("scale")
    assert table.entry_for(layer) is table.UNKNOWN
    with pytest.raises(table.UnknownLayerError, match=r"'scale' of class _Scale"):
        table.lookup(layer, "the integer export")
    # The export meets it first when it follows the input (a conv would need grids).
    inputs = keras.Input((4, 4, 2), name="x")
    plan = convert.ExportPlan(model=keras.Model(inputs, _Scale(name="scale")(inputs)), layers={})
    with pytest.raises(ValueError, match=r"'scale' of class _Scale.*integer export"):
        convert.simulate(plan, np.ones((1, 4, 4, 2), np.float32))


def test_prune_keeps_channels_reaching_an_unknown_layer_and_says_why():
    model = _custom_model()
    model.get_layer("bn").moving_variance.assign([1.0, 0.0, 1.0])
    pruned, report = prune_lib.prune(model)
    row = next(r for r in report.layers if r.name == "bn")
    assert row.removed == [] and pruned.get_layer("conv").filters == 3
    assert "_Scale 'scale'" in row.kept[1]


def test_builder_needs_a_policy_object():
    model = _custom_model()
    with pytest.raises(TypeError, match="policy"):
        convert._Builder(convert.ExportPlan(model, {}), "export", clamp_signed=True)


@pytest.mark.parametrize("module", PASSES, ids=lambda m: m.__name__)
def test_passes_keep_no_class_list_of_their_own(module: types.ModuleType):
    # A module-level tuple or set of layer classes (or of their names) is what the
    # table replaced; one would drift from it again.
    def names_a_layer(value) -> bool:
        name = value.__name__ if isinstance(value, type) else value
        return isinstance(name, str) and table.by_name(name) is not None

    for attr, value in vars(module).items():
        # A dict keyed by class names is such a list too (a registry keys by `Family`).
        if isinstance(value, (tuple, list, set, frozenset, dict)):
            assert not any(names_a_layer(v) for v in value), f"{module.__name__}.{attr}"


@pytest.mark.parametrize("name", NAMES)
def test_family_is_found_for_its_sample(name):
    _, layer, _ = _sample(name)
    family = table.by_name(name).family
    assert family is not Family.OTHER
    assert table.family_of(layer) is table.exact_family(layer) is table.family_named(name) is family


def test_every_family_names_some_layer():
    used = {e.family for e in table.entries()} | {e.family for e in table.op_entries()}
    assert used == set(Family) - {Family.OTHER}
    assert table.UNKNOWN.family is Family.OTHER
    assert {e.family for e in table.op_entries()} == {Family.ELEMENTWISE_OP}


def test_family_agrees_with_the_fields_passes_read_it_from():
    # Passes ask the family where they used to infer it from another pass's field.
    for e in table.entries():
        assert (e.absorb is Absorb.BATCHNORM) == (e.family is Family.BATCHNORM), e
        assert (e.absorb is Absorb.ZERO_PADDING) == (e.family is Family.PADDING), e
        preprocessing = e.family in (Family.RESCALING, Family.NORMALIZATION)
        assert (e.quant is Quant.PREPROCESSING) == preprocessing, e
        transposed = e.kernel is not None and e.kernel.out_axis == -2
        assert transposed == (e.family is Family.TRANSPOSED_CONV), e
        assert (e.tflite == "FULLY_CONNECTED") == (e.family is Family.DENSE), e
        assert (e.tflite == "TRANSPOSE_CONV") == (e.family is Family.TRANSPOSED_CONV), e


def test_export_registries_cover_their_lowering():
    pass_through = importlib.import_module("tf_pfq.export.pass_through")
    weighted = importlib.import_module("tf_pfq.export.weighted")
    for e in table.entries():
        if e.lowering is Lowering.WEIGHTED:
            assert e.family in weighted._OPS, e
        if e.lowering is Lowering.PASS_THROUGH:
            assert e.family in pass_through.PASS_THROUGH, e


def test_exact_family_ignores_subclasses_family_of_does_not():
    class MyPool(L.MaxPooling2D):
        pass

    class MyDropout(L.SpatialDropout2D):
        pass

    assert table.family_of(MyPool()) is Family.POOL_MAX
    assert table.exact_family(MyPool()) is Family.OTHER
    # The nearest listed class decides: SpatialDropout2D is a Dropout too.
    assert table.family_of(MyDropout(0.5)) is Family.DROPOUT
    assert table.family_of(L.Conv2DTranspose(2, 1)) is Family.TRANSPOSED_CONV
    assert table.family_of(L.LayerNormalization()) is Family.OTHER
    assert table.family_named("MyPool") is Family.OTHER
