"""One table of what each Keras layer class means to every tf_pfq pass.

A layer matters to five passes, each asking its own question:

* pruning (`tf_pfq.prune`, paper §3.2): does the layer make output channels of its
  own (a producer, whose filters can go), map channel c of its input to channel c of
  its output (a pass-through, across which a constant channel stays constant and a
  removed channel is removed from its input too), join several inputs channel by
  channel (a merge), or stop the walk? And how does a constant input channel cross
  it or get absorbed into it (`Absorb`)?
* BN folding (`tf_pfq.fold`, paper eq. 5-6) and DFQ (`tf_pfq.dfq`): which kernel
  holds the weights and which of its axes are the output channels (`Kernel`).
* quantization (`tf_pfq.quantize`, `tf_pfq.quantizers`): which of its tensors carry
  a quantizer (`Quant`) and whether its output stays on its input's grid.
* integer export (`tf_pfq.export.convert`): which handler lowers it and to which
  TFLite op (`Lowering`), or why it is refused.
* cost (`tf_pfq.cost`): its multiply-accumulates per sample.

Every entry first says what the layer is, its `Family` (a BN, a transposed conv, a
global average pooling, ...): a pass that needs to know that asks `family_of`
(`exact_family` where a subclass must not count, `family_named` for a config's
class name) rather than testing classes or inferring it from another pass's field.

Before this table each pass kept its own tuple of classes, and the tuples drifted
apart. Now every pass asks `entry_for(layer)` (or `lookup`, which refuses unknown
layers) and reads the field it needs; what stays in a pass is the arithmetic. No
module outside this table and `tf_pfq.compat.keras3` tests a layer's class
(`tests/test_architecture_rules.py`).

Adding a layer is one `LayerEntry` in `_ENTRIES` plus one equivalence test (float
vs pruned / folded / exported model) next to the pass that gains it;
`tests/test_layer_table.py` checks that the table stays consistent with the passes.

Classes are found along the layer's method resolution order, so a subclass of a
listed class is treated like it, as `isinstance` did before (the exporter still
lowers only exact Conv2D). Op layers (`TFOpLambda`, `SlicingOpLambda`, `Lambda`)
are matched by class name: tf_keras does not export the first two. The op layers
integer inference computes with one rounding (`x + 3.0`, `x * (1 / 6)`, `x / 6.0`,
`x * y`, `tf.nn.relu6(x)`, ...) are rewritten into `tf_pfq.layers.ops.ElementwiseOp`
layers by `tf_pfq.apply` (`replace_op_layers`); an ElementwiseOp means what its op
computes, so its entry is resolved per layer (`LayerEntry.resolve`) and it is
quantized and lowered like the Keras layer doing the same (Add, Multiply, ReLU). Any
other op layer keeps its class entry, which every pass but pruning refuses by name.

Where today's passes disagree about a class the entry says so rather than hiding it:
e.g. nearest UpSampling2D keeps the quantization grid (quantize, export) but
pruning does not carry constants across it yet (`Channels.STOP`);
GaussianDropout and the 1-D poolings are known to pruning only; and a
SeparableConv2D is split into its two halves by `split_separable` before pruning
and folding see it.
"""

# Long: one entry per Keras layer class, each with every pass's fields side by side, so
# that what a layer means is read in one place; splitting the entries from the
# enums would put half of each entry's meaning in another file.

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tf_pfq.compat import keras
from tf_pfq.layers.ops import ElementwiseOp, elementwise_op

__all__ = [
    "Absorb",
    "Channels",
    "Family",
    "Kernel",
    "LayerEntry",
    "Lowering",
    "Quant",
    "UNKNOWN",
    "UnknownLayerError",
    "activation_name",
    "by_name",
    "entries",
    "entry_for",
    "exact_family",
    "family_named",
    "family_of",
    "lookup",
    "op_entries",
    "op_refusal",
]

L = keras.layers


class Family(enum.Enum):
    """What the layer is: the question every pass asks first (`family_of`).

    One family per kind of computation; the Keras classes of a family are the ones
    the table lists with it (a subclass takes its nearest listed base class's). The
    other fields say how each pass treats the family; a pass that needs to know what
    a layer is (a BN to fold, a global average pooling to export as one conv, a max
    pooling hiding zero padding) reads this field instead of testing classes.
    """

    INPUT = "input"  # InputLayer
    CONV = "conv"  # Conv2D
    TRANSPOSED_CONV = "transposed-conv"  # Conv2DTranspose: kernel (kh, kw, out, in)
    DEPTHWISE_CONV = "depthwise-conv"  # DepthwiseConv2D
    SEPARABLE_CONV = "separable-conv"  # SeparableConv2D (split before the passes)
    DENSE = "dense"  # Dense
    BATCHNORM = "batchnorm"  # BatchNormalization
    RESCALING = "rescaling"  # Rescaling: x * scale + offset
    NORMALIZATION = "normalization"  # Normalization: (x - mean) / std
    RELU = "relu"  # ReLU (with its max_value, negative_slope and threshold)
    LEAKY_RELU = "leaky-relu"  # LeakyReLU
    ELU = "elu"  # ELU
    THRESHOLDED_RELU = "thresholded-relu"  # ThresholdedReLU
    PRELU = "prelu"  # PReLU (a slope per channel, trained)
    ACTIVATION = "activation"  # Activation(fn): the function is in its config
    SOFTMAX = "softmax"  # Softmax
    ADD = "add"  # Add
    MULTIPLY = "multiply"  # Multiply
    CONCAT = "concat"  # Concatenate
    POOL_MAX = "max-pool"  # MaxPooling2D
    POOL_AVERAGE = "average-pool"  # AveragePooling2D
    GLOBAL_POOL_MAX = "global-max-pool"  # GlobalMaxPooling2D
    GLOBAL_POOL_AVERAGE = "global-average-pool"  # GlobalAveragePooling2D
    POOL_MAX_1D = "max-pool-1d"  # MaxPooling1D
    POOL_AVERAGE_1D = "average-pool-1d"  # AveragePooling1D
    GLOBAL_POOL_MAX_1D = "global-max-pool-1d"  # GlobalMaxPooling1D
    GLOBAL_POOL_AVERAGE_1D = "global-average-pool-1d"  # GlobalAveragePooling1D
    PADDING = "zero-padding"  # ZeroPadding2D
    CROPPING = "cropping"  # Cropping2D
    FLATTEN = "flatten"  # Flatten
    RESHAPE = "reshape"  # Reshape
    RESIZE = "resize"  # UpSampling2D
    # The identity at inference: Dropout, SpatialDropout2D, GaussianDropout,
    # GaussianNoise, AlphaDropout.
    DROPOUT = "dropout"
    TF_OP = "tf-op"  # TFOpLambda, SlicingOpLambda: an op of functional code (`x + 3.0`)
    LAMBDA = "lambda"  # Lambda: a Python function
    ELEMENTWISE_OP = "elementwise-op"  # tf_pfq's ElementwiseOp (`replace_op_layers`)
    OTHER = "other"  # a class the table does not list (`UNKNOWN`)


class Channels(enum.Enum):
    """What the layer does to channels, for PfQ's graph walk (`tf_pfq.prune`)."""

    PRODUCER = "producer"  # its own filters / units make the output channels
    DEPTHWISE = "depthwise"  # input channel c feeds only outputs c * m .. c * m + m - 1
    PASS_THROUGH = "pass-through"  # output channel c is a function of input channel c
    RESHAPE = "reshape"  # Flatten / Reshape: channel c becomes rows of the output
    MERGE = "merge"  # Add / Multiply: output channel c reads channel c of every input
    CONCAT = "concat"  # channel c of input k is output channel offset_k + c
    STOP = "stop"  # constants do not cross; pruning keeps the channels reaching it


class Absorb(enum.Enum):
    """How a constant input channel `a_c` crosses the layer or is absorbed into it."""

    KERNEL_SUM = "kernel-sum"  # bias += a_c * sum_{u,v} W[u, v, c, :] (eq. 14)
    TRANSPOSED_KERNEL_SUM = "transposed-kernel-sum"  # the same on a (kh, kw, out, in) kernel
    DEPTHWISE = "depthwise"  # its outputs c * m + j become constants too
    BATCHNORM = "batchnorm"  # the constant goes through BN in inference form
    FUNCTION = "function"  # the constant goes through the layer's per-channel function
    IDENTITY = "identity"  # the constant stays the same (dropout, pooling)
    ZERO_PADDING = "zero-padding"  # the same, exact only where a_c == 0 (border)
    FLATTEN = "flatten"  # channel c becomes several rows, each the constant
    RESHAPE = "reshape"  # Reshape to rank 1 (as Flatten) or keeping the last axis
    SUM = "sum"  # Add: a channel constant on every input stays constant (the sum)
    PRODUCT = "product"  # Multiply: the same with the product
    CONCAT = "concat"  # constants move to their offset in the output
    NONE = "none"  # not supported: the channel is kept, with the reason


class Quant(enum.Enum):
    """Which of the layer's tensors `tf_pfq.apply` quantizes (see its module docstring)."""

    WEIGHTS = "weights"  # kernel and bias in stage W; output unless fused into its consumer
    NORMALIZATION = "normalization"  # BN: output like WEIGHTS; stage W needs it folded
    OUTPUT = "output"  # an activation quantizer of its own on the output
    ADD = "add"  # output at `add_bits`, unless a ReLU consumer fuses it
    CONCAT = "concat"  # one shared range for the output and the inputs reaching only it
    PRESERVES = "preserves"  # output on its input's grid: no quantizer of its own
    # Like PRESERVES, but the layer's number operand is stored on that grid (int8
    # MAXIMUM / MINIMUM with a constant): a quantizer-less wrapper snaps it in QAT.
    CLAMP = "clamp"
    INPUT = "input"  # a model input: tfmot's QuantizeLayer after it
    REFUSED = "refused"  # apply refuses it by name (an op layer)
    # Rescaling / Normalization: a per-channel affine; no quantizer of its own in
    # stage A, and stage W needs it folded (`tf_pfq.fold` canonicalizes it).
    PREPROCESSING = "preprocessing"
    NONE = "none"  # no quantizer, and its output is not on a known grid


class Lowering(enum.Enum):
    """The exporter's handler for the layer (`tf_pfq.export.lowering._Builder`)."""

    INPUT = "input"
    WEIGHTED = "weighted"
    ACTIVATION = "activation"
    LEAKY_RELU = "leaky-relu"  # one int8 LEAKY_RELU (`_Builder._leaky_relu`)
    PRELU = "prelu"  # one int8 PRELU, alpha int8 per tensor (`_Builder._prelu`)
    ADD = "add"
    AVERAGE = "average"
    CONCAT = "concat"
    RESIZE = "resize"
    MULTIPLY = "multiply"
    PASS_THROUGH = "pass-through"
    OP = "op"  # an ElementwiseOp: the op, then its output grid (`_Builder._op`)
    CLAMP = "clamp"  # MAXIMUM / MINIMUM with a number on the input's grid (`_Builder._clamp`)
    REFUSED = "refused"  # a known layer the export cannot lower; `LayerEntry.refusal` says why


@dataclasses.dataclass(frozen=True)
class Kernel:
    """Where a layer's weights are and which axes are its input and output channels.

    Attributes:
      attr: the layer attribute holding the kernel ("kernel" or "depthwise_kernel").
      layout: the kernel shape, for messages and docs, e.g. "(kh, kw, in, out)".
      in_axis: axis of the input channels.
      out_axis: axis of the output channels; for a depthwise kernel (kh, kw, in,
        mult) output channel c * mult + m is `kernel[..., c, m]` (`depthwise`).
      depthwise: the output channels are the (in, mult) pairs of the last two axes.
      per_channel: per-output-channel weight grids are allowed (TFLite's
        FULLY_CONNECTED rejects per-axis weights; a transposed kernel's output
        axis is not last).
    """

    attr: str
    layout: str
    in_axis: int
    out_axis: int
    depthwise: bool = False
    per_channel: bool = True


def _never(layer) -> bool:
    return False


def _always(layer) -> bool:
    return True


# Activation functions that map each channel through the same scalar function.
ELEMENTWISE_ACTIVATIONS = frozenset(
    [
        "linear",
        "relu",
        "relu6",
        "sigmoid",
        "hard_sigmoid",
        "tanh",
        "swish",
        "silu",
        "elu",
        "selu",
        "gelu",
        "softplus",
        "softsign",
        "exponential",
        "mish",
    ]
)
# Activation functions integer inference fuses into the op that produces their
# input (the input tensor then never exists in int8, so it gets no quantizer).
FUSED_ACTIVATIONS = frozenset(["relu", "relu6", "linear", "elu"])


def activation_name(layer) -> str | None:
    """The activation function an activation layer applies ("relu", "softmax", ...), or None.

    Example:
      >>> activation_name(keras.layers.Activation("sigmoid"))
      'sigmoid'
      >>> activation_name(keras.layers.Softmax())
      'softmax'
    """
    if isinstance(layer, L.Softmax):
        return "softmax"
    if isinstance(layer, L.ReLU):
        return "relu"
    if isinstance(layer, L.Activation):
        name = getattr(layer.activation, "__name__", None) or str(layer.get_config()["activation"])
        return "swish" if name == "silu" else name
    if isinstance(layer, ElementwiseOp) and layer.kind in ("relu", "relu6"):
        return layer.kind
    return None


def _layer_itself(layer, kwargs):
    return layer


def _activation_fn(layer, kwargs):
    if keras.activations.serialize(layer.activation) in ELEMENTWISE_ACTIVATIONS:
        return layer
    return None


def _fused_activation(layer) -> bool:
    return activation_name(layer) in FUSED_ACTIVATIONS


def _nearest(layer) -> bool:
    return layer.interpolation == "nearest"


def _kernel_macs(layer, shape: tuple) -> int:
    # Every kernel weight is used once per output position (per group for Conv2D,
    # whose kernel already holds C_in / groups input channels).
    return _positions(shape) * int(np.prod(_kernel_of(layer).shape))


def _separable_macs(layer, shape: tuple) -> int:
    # The depthwise half runs at the output positions too (the pointwise half is 1x1).
    weights = int(np.prod(layer.depthwise_kernel.shape)) + int(
        np.prod(layer.pointwise_kernel.shape)
    )
    return _positions(shape) * weights


def _positions(shape: tuple) -> int:
    spatial = shape[1:-1]
    return int(np.prod(spatial)) if spatial else 1


def _kernel_of(layer):
    return getattr(layer, entry_for(layer).kernel.attr)  # type: ignore[union-attr]


@dataclasses.dataclass(frozen=True)
class LayerEntry:
    """What one layer class means to every pass (see the module docstring).

    Attributes:
      name: the class name (the key; op layers are matched by it).
      cls: the tf_keras class, or None for op layers matched by name and `UNKNOWN`.
      family: what the layer is (`Family`); `Family.OTHER` only for `UNKNOWN`.
      channels: its role for pruning.
      absorb: how pruning carries a constant input channel across it.
      kernel: its weights' layout, or None for a layer without a kernel.
      quant: which of its tensors `tf_pfq.apply` quantizes.
      grid: True when its output is on its input's grid at inference (a predicate of
        the layer).
      grid_in_training: False when training mode moves its output off that grid
        (dropout rescales the values it keeps), so a consumer may treat its input
        as integers on the grid only at inference (`tf_pfq.wrapper`).
      fuses: True when integer inference fuses it into the op producing its input
        (a predicate of the layer), so that input gets no quantizer.
      lowering: the exporter's handler.
      tflite: the TFLite op(s) it lowers to, for docs and messages.
      refusal: for a known layer the export refuses, a function (layer name, layer)
        giving the message; None for the generic "not supported" one.
      macs: per-sample multiply-accumulates of one call, from its output shape; None
        for 0 (only convolutions and dense layers are counted).
      elementwise: for `Absorb.FUNCTION`, a function (layer, call kwargs) returning the
        per-channel function the layer computes, or None when it is not one.
      cle: a per-channel positive scale crosses it unchanged (`f(s x) = s f(x)`), so
        DFQ's cross-layer equalization may rescale across it (set on the layers
        `tf_pfq.dfq` is tested with; ReLU and Activation are decided per instance
        there, as ReLU6 needs replacing).
      splits_activation: `split_activations` moves a non-fusable fused activation
        of this layer into an Activation layer of its own.
      resolve: for a class whose instances mean different things (ElementwiseOp),
        a function of the layer returning the entry of that instance; `entry_for`
        calls it.
    """

    name: str
    cls: type | None
    family: Family
    channels: Channels = Channels.STOP
    absorb: Absorb = Absorb.NONE
    kernel: Kernel | None = None
    quant: Quant = Quant.NONE
    grid: Callable[[Any], bool] = _never
    grid_in_training: bool = True
    fuses: Callable[[Any], bool] = _never
    lowering: Lowering = Lowering.REFUSED
    tflite: str = ""
    refusal: Callable[[str, Any], str] | None = None
    macs: Callable[[Any, tuple], int] | None = None
    elementwise: Callable[[Any, Mapping[str, Any]], Any] | None = None
    cle: bool = False
    splits_activation: bool = False
    resolve: Callable[[Any], LayerEntry] | None = None

    def preserves_grid(self, layer) -> bool:
        return bool(self.grid(layer))

    def __repr__(self) -> str:
        return f"LayerEntry({self.name})"


def op_refusal(name: str, layer, action: str) -> str:
    """The message refusing op layer `name`: its class, the op it applies, then `action`.

    Example:
      >>> op_refusal("double", keras.layers.Lambda(lambda t: 2 * t), "nothing lowers it.")
      "Layer 'double' (Lambda) applies the op '<lambda>', which nothing lowers it."
    """
    op = getattr(layer, "symbol", None) or getattr(
        getattr(layer, "function", None), "__name__", "?"
    )
    return f"Layer {name!r} ({type(layer).__name__}) applies the op {op!r}, which {action}"


MODELLED_OPS = (
    "tf_pfq models +, - and * with a number or a second tensor, / by a number, "
    "tf.maximum and tf.minimum with a number, tf.nn.relu and tf.nn.relu6"
)


def _export_op_refusal(name: str, layer) -> str:
    return op_refusal(
        name,
        layer,
        f"the integer export cannot lower: {MODELLED_OPS}; write it with Keras layers.",
    )


def _export_bn_refusal(name: str, layer) -> str:
    return (
        f"Layer {name!r} is a BatchNormalization: the integer export needs a stage-W "
        "model. Fold it with tf_pfq.fold_batchnorm and fine-tune with "
        "tf_pfq.apply(..., weight_bits=n) first."
    )


def _export_preprocessing_refusal(name: str, layer) -> str:
    return (
        f"Layer {name!r} ({type(layer).__name__}) is a preprocessing layer: the integer "
        "export needs it folded. Call tf_pfq.fold_batchnorm, which folds it into the next "
        "conv or rewrites it as a per-channel affine, then tf_pfq.apply(..., weight_bits=n)."
    )


_CONV = Kernel("kernel", "(kh, kw, in, out)", in_axis=-2, out_axis=-1)
_DEPTHWISE = Kernel("depthwise_kernel", "(kh, kw, in, mult)", -2, -1, depthwise=True)
_TRANSPOSED = Kernel("kernel", "(kh, kw, out, in)", -1, -2, per_channel=False)
_DENSE = Kernel("kernel", "(in, out)", -2, -1, per_channel=False)

_IDENTITY = {"channels": Channels.PASS_THROUGH, "absorb": Absorb.IDENTITY}
_PRESERVES = {"quant": Quant.PRESERVES, "grid": _always}
_RELU_KIND = {
    "channels": Channels.PASS_THROUGH,
    "absorb": Absorb.FUNCTION,
    "elementwise": _layer_itself,
    "quant": Quant.OUTPUT,
    "fuses": _always,
}


# Pruning reads every op layer through `ops.elementwise_op` (None: channels kept).
_OP_PRUNING: dict[str, Any] = {
    "channels": Channels.PASS_THROUGH,
    "absorb": Absorb.FUNCTION,
    "elementwise": elementwise_op,
}


def _elementwise_op_fn(layer, kwargs):
    # An ElementwiseOp of one tensor maps each channel through the same function.
    if layer.tensors != 1:
        return None
    return lambda t: layer.apply_op(t)


# The entries of an ElementwiseOp, by its op, each quantized like the Keras layer
# computing the same: `*` and `/` as Multiply (an output grid of its own: a product
# or a scaled grid is off the input's; the class entry), `+` / `-` as Add (at
# `add_bits`, or fused into a ReLU consumer: ADD with a fused RELU6 is MobileNetV3's
# hard-sigmoid), relu / relu6 as ReLU. The export applies the op and rounds once
# onto the same grid (`convert._Builder._op`).
_ELEMENTWISE: dict[str, Any] = {
    "channels": Channels.PASS_THROUGH,
    "absorb": Absorb.FUNCTION,
    "elementwise": _elementwise_op_fn,
}
_OP_ADD = LayerEntry(
    "ElementwiseOp(add)",
    ElementwiseOp,
    Family.ELEMENTWISE_OP,
    **_ELEMENTWISE,
    quant=Quant.ADD,
    lowering=Lowering.OP,
    tflite="ADD / SUB",
)
_OP_RELU = LayerEntry(
    "ElementwiseOp(relu)",
    ElementwiseOp,
    Family.ELEMENTWISE_OP,
    **_ELEMENTWISE,
    quant=Quant.OUTPUT,
    fuses=_always,
    lowering=Lowering.ACTIVATION,
    tflite="RELU / RELU6 (fused)",
)


# `tf.maximum(x, c)` / `tf.minimum(x, c)`: the int8 op keeps its input's scale and
# stores c on that grid, so the output takes no rounding (the same integers, and c
# as the file stores it: `tf_pfq.wrapper` snaps it in QAT, `_Builder._clamp` writes
# it already snapped).
_OP_CLAMP = LayerEntry(
    "ElementwiseOp(maximum / minimum)",
    ElementwiseOp,
    Family.ELEMENTWISE_OP,
    **_ELEMENTWISE,
    quant=Quant.CLAMP,
    grid=_always,
    lowering=Lowering.CLAMP,
    tflite="MAXIMUM / MINIMUM",
)


# `x + y` and `x * y` of two tensors merge channel c of both, as Add and Multiply do
# (`x - y` stays opaque to pruning: no absorption rule takes a difference).
_OP_SUM = dataclasses.replace(
    _OP_ADD,
    name="ElementwiseOp(add, two tensors)",
    channels=Channels.MERGE,
    absorb=Absorb.SUM,
    elementwise=None,
)


def _resolve_op(layer) -> LayerEntry:
    if layer.kind in ("add", "subtract"):
        return _OP_SUM if layer.kind == "add" and layer.tensors == 2 else _OP_ADD
    if layer.kind in ("relu", "relu6"):
        return _OP_RELU
    if layer.kind in ("maximum", "minimum"):
        return _OP_CLAMP
    if layer.tensors == 2:
        return _OP_PRODUCT
    return _BY_NAME["ElementwiseOp"]


def op_entries() -> tuple[LayerEntry, ...]:
    """The entries an ElementwiseOp resolves to: its class entry (products), add, relu..."""
    return (_BY_NAME["ElementwiseOp"], _OP_PRODUCT, _OP_ADD, _OP_SUM, _OP_RELU, _OP_CLAMP)


def _entry(cls, family: Family, **fields) -> LayerEntry:
    return LayerEntry(cls.__name__, cls, family, **fields)


_ENTRIES: tuple[LayerEntry, ...] = (
    _entry(
        L.InputLayer, Family.INPUT, quant=Quant.INPUT, lowering=Lowering.INPUT, tflite="(input)"
    ),
    # -- weighted layers ------------------------------------------------------------
    _entry(
        L.Conv2D,
        Family.CONV,
        channels=Channels.PRODUCER,
        absorb=Absorb.KERNEL_SUM,
        kernel=_CONV,
        quant=Quant.WEIGHTS,
        lowering=Lowering.WEIGHTED,
        tflite="CONV_2D",
        macs=_kernel_macs,
        splits_activation=True,
    ),
    _entry(
        L.Conv2DTranspose,
        Family.TRANSPOSED_CONV,
        channels=Channels.PRODUCER,
        absorb=Absorb.TRANSPOSED_KERNEL_SUM,
        kernel=_TRANSPOSED,
        quant=Quant.WEIGHTS,
        lowering=Lowering.WEIGHTED,
        tflite="TRANSPOSE_CONV",
        macs=_kernel_macs,
    ),
    _entry(
        L.DepthwiseConv2D,
        Family.DEPTHWISE_CONV,
        channels=Channels.DEPTHWISE,
        absorb=Absorb.DEPTHWISE,
        kernel=_DEPTHWISE,
        quant=Quant.WEIGHTS,
        lowering=Lowering.WEIGHTED,
        tflite="DEPTHWISE_CONV_2D",
        macs=_kernel_macs,
        splits_activation=True,
    ),
    _entry(
        L.Dense,
        Family.DENSE,
        channels=Channels.PRODUCER,
        absorb=Absorb.KERNEL_SUM,
        kernel=_DENSE,
        quant=Quant.WEIGHTS,
        lowering=Lowering.WEIGHTED,
        tflite="FULLY_CONNECTED",  # a 1x1 CONV_2D with per-channel weights
        macs=_kernel_macs,
        splits_activation=True,
    ),
    # Two kernels; `split_separable` rewrites it into DepthwiseConv2D + 1x1 Conv2D
    # before pruning and folding, so only its MACs are read from here.
    _entry(L.SeparableConv2D, Family.SEPARABLE_CONV, macs=_separable_macs),
    _entry(
        L.BatchNormalization,
        Family.BATCHNORM,
        channels=Channels.PASS_THROUGH,
        absorb=Absorb.BATCHNORM,
        quant=Quant.NORMALIZATION,
        refusal=_export_bn_refusal,
    ),
    # Preprocessing (`y = a_c x + b_c` per channel): `tf_pfq.fold_batchnorm` folds it
    # into the next conv where that is exact, else writes it as a 1x1 DepthwiseConv2D.
    # Pruning stops at it (it sits at the model input, where nothing is pruned).
    _entry(
        L.Rescaling,
        Family.RESCALING,
        quant=Quant.PREPROCESSING,
        refusal=_export_preprocessing_refusal,
    ),
    _entry(
        L.Normalization,
        Family.NORMALIZATION,
        quant=Quant.PREPROCESSING,
        refusal=_export_preprocessing_refusal,
    ),
    # -- activations ----------------------------------------------------------------
    _entry(
        L.ReLU,
        Family.RELU,
        **_RELU_KIND,
        lowering=Lowering.ACTIVATION,
        tflite="RELU / RELU6 (fused)",
    ),
    # LEAKY_RELU fuses into no op: its producer keeps a grid of its own, and QAT
    # rounds as the file's int8 kernel does (`tf_pfq.int8_kernels.int8_leaky_relu`).
    _entry(
        L.LeakyReLU,
        Family.LEAKY_RELU,
        **{**_RELU_KIND, "fuses": _never},
        lowering=Lowering.LEAKY_RELU,
        tflite="LEAKY_RELU",
    ),
    _entry(L.ELU, Family.ELU, **_RELU_KIND),
    _entry(L.ThresholdedReLU, Family.THRESHOLDED_RELU, **_RELU_KIND),
    # PRELU fuses into no op. Its alpha is stored int8 per tensor whatever the weight
    # bits, so QAT keeps alpha on that grid and rounds as the builtin kernel does
    # (`tf_pfq.int8_kernels`); pruning keeps the channels reaching it (STOP).
    _entry(L.PReLU, Family.PRELU, quant=Quant.OUTPUT, lowering=Lowering.PRELU, tflite="PRELU"),
    _entry(
        L.Activation,
        Family.ACTIVATION,
        channels=Channels.PASS_THROUGH,
        absorb=Absorb.FUNCTION,
        elementwise=_activation_fn,
        quant=Quant.OUTPUT,
        fuses=_fused_activation,
        lowering=Lowering.ACTIVATION,
        tflite="fused RELU / SOFTMAX / LOGISTIC / TANH / hard_sigmoid as DEPTHWISE_CONV_2D "
        "/ swish as LOGISTIC + MUL",
    ),
    _entry(
        L.Softmax,
        Family.SOFTMAX,
        quant=Quant.OUTPUT,
        lowering=Lowering.ACTIVATION,
        tflite="SOFTMAX",
    ),
    # -- merges -----------------------------------------------------------------------
    _entry(
        L.Add,
        Family.ADD,
        channels=Channels.MERGE,
        absorb=Absorb.SUM,
        quant=Quant.ADD,
        lowering=Lowering.ADD,
        tflite="ADD",
    ),
    _entry(
        L.Multiply,
        Family.MULTIPLY,
        channels=Channels.MERGE,
        absorb=Absorb.PRODUCT,
        quant=Quant.OUTPUT,
        lowering=Lowering.MULTIPLY,
        tflite="MUL",
    ),
    _entry(
        L.Concatenate,
        Family.CONCAT,
        channels=Channels.CONCAT,
        absorb=Absorb.CONCAT,
        quant=Quant.CONCAT,
        lowering=Lowering.CONCAT,
        tflite="CONCATENATION",
    ),
    # -- pooling ('same' max/avg pooling in TF ignores padded positions) -----------------
    _entry(
        L.MaxPooling2D,
        Family.POOL_MAX,
        **_IDENTITY,
        **_PRESERVES,
        lowering=Lowering.PASS_THROUGH,
        tflite="MAX_POOL_2D",
        cle=True,
    ),
    _entry(
        L.GlobalMaxPooling2D,
        Family.GLOBAL_POOL_MAX,
        **_IDENTITY,
        **_PRESERVES,
        lowering=Lowering.PASS_THROUGH,
        tflite="REDUCE_MAX",
        cle=True,
    ),
    _entry(
        L.AveragePooling2D,
        Family.POOL_AVERAGE,
        **_IDENTITY,
        quant=Quant.OUTPUT,
        lowering=Lowering.AVERAGE,
        tflite="DEPTHWISE_CONV_2D (1/(kh*kw) weights)",
        cle=True,
    ),
    _entry(
        L.GlobalAveragePooling2D,
        Family.GLOBAL_POOL_AVERAGE,
        **_IDENTITY,
        quant=Quant.OUTPUT,
        lowering=Lowering.AVERAGE,
        tflite="MEAN",
        cle=True,
    ),
    _entry(L.MaxPooling1D, Family.POOL_MAX_1D, **_IDENTITY),
    _entry(L.AveragePooling1D, Family.POOL_AVERAGE_1D, **_IDENTITY),
    _entry(L.GlobalMaxPooling1D, Family.GLOBAL_POOL_MAX_1D, **_IDENTITY),
    _entry(L.GlobalAveragePooling1D, Family.GLOBAL_POOL_AVERAGE_1D, **_IDENTITY),
    # -- shape and identity layers --------------------------------------------------------
    _entry(
        L.ZeroPadding2D,
        Family.PADDING,
        channels=Channels.PASS_THROUGH,
        absorb=Absorb.ZERO_PADDING,
        **_PRESERVES,  # 0 is on every grid
        lowering=Lowering.PASS_THROUGH,
        tflite="PAD",
        cle=True,
    ),
    _entry(
        L.Cropping2D,
        Family.CROPPING,
        **_IDENTITY,  # a crop of a constant channel is the constant (NASNet's adjust path)
        **_PRESERVES,
        lowering=Lowering.PASS_THROUGH,
        tflite="STRIDED_SLICE",
    ),
    _entry(
        L.Flatten,
        Family.FLATTEN,
        channels=Channels.RESHAPE,
        absorb=Absorb.FLATTEN,
        **_PRESERVES,
        lowering=Lowering.PASS_THROUGH,
        tflite="RESHAPE",
    ),
    _entry(
        L.Reshape,
        Family.RESHAPE,
        channels=Channels.RESHAPE,
        absorb=Absorb.RESHAPE,
        **_PRESERVES,
        lowering=Lowering.PASS_THROUGH,
        tflite="RESHAPE",
    ),
    _entry(
        L.UpSampling2D,
        Family.RESIZE,
        quant=Quant.OUTPUT,
        grid=_nearest,  # nearest copies values; bilinear interpolates off the grid
        lowering=Lowering.RESIZE,
        tflite="RESIZE_NEAREST_NEIGHBOR (bilinear: + DEPTHWISE_CONV_2D)",
    ),
    # Identity at inference time.
    _entry(
        L.Dropout,
        Family.DROPOUT,
        **_IDENTITY,
        **_PRESERVES,
        grid_in_training=False,
        lowering=Lowering.PASS_THROUGH,
        tflite="(none)",
        cle=True,
    ),
    _entry(
        L.SpatialDropout2D,
        Family.DROPOUT,
        **_IDENTITY,
        **_PRESERVES,
        grid_in_training=False,
        lowering=Lowering.PASS_THROUGH,
        tflite="(none)",
    ),
    _entry(L.GaussianDropout, Family.DROPOUT, **_IDENTITY),
    _entry(L.GaussianNoise, Family.DROPOUT, **_IDENTITY),
    _entry(L.AlphaDropout, Family.DROPOUT, **_IDENTITY),
    # -- op layers from functional code (`x + 3.0`, `tf.nn.relu6(x)`), see layers.ops ----
    LayerEntry(
        "TFOpLambda",
        None,
        Family.TF_OP,
        **_OP_PRUNING,
        quant=Quant.REFUSED,
        refusal=_export_op_refusal,
    ),
    LayerEntry(
        "SlicingOpLambda",
        None,
        Family.TF_OP,
        **_OP_PRUNING,
        quant=Quant.REFUSED,
        refusal=_export_op_refusal,
    ),
    LayerEntry("Lambda", L.Lambda, Family.LAMBDA, quant=Quant.REFUSED, refusal=_export_op_refusal),
    # What `replace_op_layers` makes of the op layers it models; this is the entry of
    # its products (`*`, `/`), `_resolve_op` gives the others theirs.
    _entry(
        ElementwiseOp,
        Family.ELEMENTWISE_OP,
        **_ELEMENTWISE,
        quant=Quant.OUTPUT,
        lowering=Lowering.OP,
        tflite="MUL",
        resolve=_resolve_op,
    ),
)
_OP_PRODUCT = dataclasses.replace(
    _ENTRIES[-1],
    name="ElementwiseOp(multiply, two tensors)",
    channels=Channels.MERGE,
    absorb=Absorb.PRODUCT,
    elementwise=None,
    resolve=None,
)

UNKNOWN = LayerEntry("unknown", None, Family.OTHER)
"""The entry of a layer class the table does not list: every pass treats it as opaque.

Pruning keeps the channels that reach it (the report names the layer and its
class), folding keeps a BN after it, quantization gives it no quantizer (stage W
refuses it when it has weights), cost counts 0 MACs, and the export refuses it.
"""

_BY_NAME: dict[str, LayerEntry] = {entry.name: entry for entry in _ENTRIES}
_BY_CLASS: dict[type, LayerEntry] = {e.cls: e for e in _ENTRIES if e.cls is not None}
_MATCHED_BY_NAME = frozenset(e.name for e in _ENTRIES if e.cls is None)


class UnknownLayerError(ValueError):
    """A layer whose class has no entry in the table (and so no meaning to a pass)."""


def entries() -> tuple[LayerEntry, ...]:
    """Every entry of the table, in its order."""
    return _ENTRIES


def by_name(class_name: str) -> LayerEntry | None:
    """The entry of the class named exactly `class_name` (a model config's class_name).

    Example:
      >>> by_name("DepthwiseConv2D").kernel.layout
      '(kh, kw, in, mult)'
      >>> by_name("MyLayer") is None
      True
    """
    return _BY_NAME.get(class_name)


def entry_for(layer) -> LayerEntry:
    """The layer's entry (its class, or the nearest listed base class), else `UNKNOWN`.

    Example:
      >>> entry_for(keras.layers.Conv2DTranspose(2, 3)).kernel.layout
      '(kh, kw, out, in)'
      >>> entry_for(keras.layers.LayerNormalization()) is UNKNOWN
      True
    """
    for cls in type(layer).__mro__:
        entry = _BY_CLASS.get(cls)
        if entry is None and cls.__name__ in _MATCHED_BY_NAME:
            entry = _BY_NAME[cls.__name__]
        if entry is not None:
            return entry.resolve(layer) if entry.resolve is not None else entry
    return UNKNOWN


def family_of(layer) -> Family:
    """What the layer is: its entry's family (`Family.OTHER` for an unlisted class).

    A subclass of a listed class is of that class's family, as for `entry_for`.

    Example:
      >>> family_of(keras.layers.GlobalAveragePooling2D())
      <Family.GLOBAL_POOL_AVERAGE: 'global-average-pool'>
      >>> family_of(keras.layers.LayerNormalization())
      <Family.OTHER: 'other'>
    """
    return entry_for(layer).family


def exact_family(layer) -> Family:
    """The layer's family when its own class is the listed one, else `Family.OTHER`.

    For the checks that want the exact class rather than a subclass, which may
    compute something else (e.g. only MaxPooling2D itself is known to skip padded
    positions). Op layers are matched by their class name, as in `entry_for`.

    Example:
      >>> class MyPool(keras.layers.MaxPooling2D):
      ...     pass
      >>> family_of(MyPool()), exact_family(MyPool())
      (<Family.POOL_MAX: 'max-pool'>, <Family.OTHER: 'other'>)
    """
    entry = entry_for(layer)
    cls = type(layer)
    exact = cls is entry.cls if entry.cls is not None else cls.__name__ == entry.name
    return entry.family if exact else Family.OTHER


def family_named(class_name: str) -> Family:
    """The family of the class named exactly `class_name` (a model config's class_name).

    `Family.OTHER` for a name the table does not list (a subclass under its own name).

    Example:
      >>> family_named("Conv2DTranspose")
      <Family.TRANSPOSED_CONV: 'transposed-conv'>
      >>> family_named("MyLayer")
      <Family.OTHER: 'other'>
    """
    entry = _BY_NAME.get(class_name)
    return Family.OTHER if entry is None else entry.family


def lookup(layer, purpose: str = "tf_pfq") -> LayerEntry:
    """The layer's entry; raises for a class the table does not list.

    Args:
      layer: a Keras layer.
      purpose: what needs the entry, for the message (e.g. "the integer export").

    Raises:
      UnknownLayerError: the class has no entry; the message names the layer and
        its class.

    Example:
      >>> lookup(keras.layers.ReLU()).channels
      <Channels.PASS_THROUGH: 'pass-through'>
      >>> lookup(keras.layers.LayerNormalization(name="ln"), "the integer export")
      Traceback (most recent call last):
      ...
      tf_pfq.layers.table.UnknownLayerError: Layer 'ln' of class LayerNormalization ...
    """
    entry = entry_for(layer)
    if entry is UNKNOWN:
        raise UnknownLayerError(
            f"Layer {layer.name!r} of class {type(layer).__name__} is not supported by "
            f"{purpose}: tf_pfq's layer table (tf_pfq.layers.table) has no entry for it."
        )
    return entry
