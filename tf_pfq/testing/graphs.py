"""Random graphs of every exportable layer, and one seed through the whole chain.

The zoo (`tf_pfq.testing.ZOO`) checks a few fixed architectures; the exporter's
promise (the integer file rounds as the Keras QAT model does) is about every graph
the layer table lets through. `random_graph(seed)` composes those layers at random:
Conv2D (grouped, dilated, strided), DepthwiseConv2D with depth multipliers,
Conv2DTranspose, Dense, BatchNormalization, ReLU / ReLU6 / swish / hard-swish /
sigmoid / tanh, Add and Add + ReLU, Concatenate, Multiply and squeeze-excite
blocks, max and average pooling, UpSampling2D, ZeroPadding2D and Rescaling, with
random widths and strides, live BN statistics and planted dead channels
(`tf_pfq.testing`), and draws a quantization setting: activation and weight bits
2..8, per-tensor or per-channel weights, either weight scheme.

`run_random_graph(seed)` then runs the chain of paper Algorithm 1 on it (prune ->
stage A -> a short fine-tuning on random labels -> strip -> prune -> fold -> stage W
-> a short fine-tuning -> to_tflite) through `tf_pfq.testing.run_chain`, which also
measures the file against the Keras QAT model on XNNPACK. Everything is drawn from
the seed, so a failure reproduces from its seed alone:

    >>> model, description = random_graph(3)  # doctest: +SKIP
    >>> run_random_graph(3).max_steps  # doctest: +SKIP

Graphs are small (inputs of at most 12x12x3, a few channels per layer) so that a
test can run dozens of them in minutes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from tf_pfq.compat import keras
from tf_pfq.layers.table import Family, family_of
from tf_pfq.quantizers import MAX_BITS, MIN_BITS, WEIGHT_SCHEMES
from tf_pfq.testing import chain as testing

__all__ = [
    "GraphDescription",
    "random_graph",
    "run_random_graph",
    "BLOCKS",
    "ACTIVATIONS",
    "MORE_ACTIVATIONS",
]

L = keras.layers
ACTIVATIONS = ("relu", "relu6", "swish", "hard_swish", "sigmoid", "tanh", "linear")
# Drawn only when asked for (`random_graph(seed, activations=...)`), so that the
# default seeds keep building the graphs their recorded results measured:
# LeakyReLU, PReLU (alpha per channel) and `tf.minimum(tf.maximum(x, a), b)`.
MORE_ACTIVATIONS = ("leaky_relu", "prelu", "clamp")
BLOCKS = (
    "conv",
    "grouped_conv",
    "dilated_conv",
    "depthwise",
    "transpose",
    "residual",
    "concat",
    "squeeze_excite",
    "gate",
    "max_pool",
    "average_pool",
    "upsample",
    "zero_pad",
)
NUM_IMAGES = 40  # 24 fine-tune and calibrate, 16 measure
NUM_TEST = 16


@dataclasses.dataclass(frozen=True)
class GraphDescription:
    """What `random_graph(seed)` built: enough to read a failure without rebuilding.

    Attributes:
      seed: the seed it was built from.
      input_shape: (H, W, C).
      blocks: one line per block, e.g. "b2 squeeze_excite(reduce=2, relu, sigmoid)".
      activation_bits, weight_bits, per_channel_weights, weight_scheme: the
        quantization setting (`tf_pfq.apply`'s arguments; the rest are defaults).
      learning_rate: of the short fine-tunings.
      planted: the BN layers that got dead channels.
    """

    seed: int
    input_shape: tuple[int, int, int]
    blocks: tuple[str, ...]
    activation_bits: int
    weight_bits: int
    per_channel_weights: bool
    weight_scheme: str
    learning_rate: float
    planted: tuple[str, ...] = ()

    def settings(self) -> str:
        channel = "per-channel" if self.per_channel_weights else "per-tensor"
        return f"A{self.activation_bits}/W{self.weight_bits} {channel} {self.weight_scheme}"

    def __str__(self) -> str:
        return (
            f"seed {self.seed}: {self.settings()}, input {self.input_shape}, "
            f"blocks [{'; '.join(self.blocks)}], planted {list(self.planted)}"
        )


class _GraphBuilder:
    """Draws one graph block by block; every name holds its block's index."""

    def __init__(self, rng: np.random.Generator, activations: tuple[str, ...] = ACTIVATIONS):
        self.rng = rng
        self.activations = tuple(activations)
        self.blocks: list[str] = []
        self.prefix = "stem"

    # -- draws ------------------------------------------------------------------
    def width(self) -> int:
        return int(self.rng.integers(2, 9))

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def name(self, part: str) -> str:
        return f"{self.prefix}_{part}"

    # -- pieces -----------------------------------------------------------------
    def activation(self, x, kind: str, part: str = "act"):
        if kind == "linear":
            return x
        if kind == "relu":
            return L.ReLU(name=self.name(part))(x)
        if kind == "relu6":
            return L.ReLU(6.0, name=self.name(part))(x)
        if kind == "hard_swish":
            return L.Multiply(name=self.name(part))([x, self.hard_sigmoid(x, part)])
        if kind == "leaky_relu":
            return L.LeakyReLU(float(self.pick((0.01, 0.1, 0.3))), name=self.name(part))(x)
        if kind == "prelu":
            alpha = keras.initializers.RandomUniform(0.0, 0.5, seed=int(self.rng.integers(1 << 30)))
            return L.PReLU(alpha, shared_axes=[1, 2], name=self.name(part))(x)
        if kind == "clamp":
            low = float(self.rng.uniform(-1.0, 0.2))
            return tf.minimum(tf.maximum(x, low), low + float(self.rng.uniform(0.5, 3.0)))
        return L.Activation(kind, name=self.name(part))(x)

    def hard_sigmoid(self, x, part: str):
        # MobileNetV3's form: op layers from functional code, which apply rewrites.
        return L.ReLU(6.0, name=self.name(f"{part}_relu6"))(x + 3.0) * (1.0 / 6.0)

    def conv_bn(self, x, filters: int, part: str, **kwargs):
        """Conv2D -> BatchNormalization (usually) -> an activation; returns (x, label)."""
        use_bias = self.chance(0.3)
        x = L.Conv2D(
            filters,
            padding=kwargs.pop("padding", "same"),
            use_bias=use_bias,
            name=self.name(part),
            **kwargs,
        )(x)
        bn = self.chance(0.85)
        if bn:
            x = L.BatchNormalization(name=self.name(f"{part}_bn"))(x)
        act = self.pick(self.activations)
        x = self.activation(x, act, f"{part}_{act}")
        parts = [str(filters), *(f"{k}={v}" for k, v in kwargs.items())]
        parts += ["bias"] * use_bias + ["bn"] * bn + [act]
        return x, f"conv({', '.join(parts)})"

    # -- blocks -----------------------------------------------------------------
    def block(self, kind: str, x):
        h = int(x.shape[1])
        c = int(x.shape[-1])
        stride = 2 if h >= 6 and self.chance(0.4) else 1
        method: Callable[..., Any] = getattr(self, f"_{kind}")
        x, label = method(x, h, c, stride)
        self.blocks.append(f"{self.prefix} {kind}: {label}")
        return x

    def _conv(self, x, h, c, stride):
        k = self.pick((1, 3))
        return self.conv_bn(x, self.width(), "conv", kernel_size=k, strides=stride)

    def _grouped_conv(self, x, h, c, stride):
        groups = self.pick([g for g in (2, 3, 4) if c % g == 0] or [1])
        filters = groups * int(self.rng.integers(1, 4))
        return self.conv_bn(
            x, filters, "gconv", kernel_size=self.pick((1, 3)), strides=stride, groups=groups
        )

    def _dilated_conv(self, x, h, c, stride):
        return self.conv_bn(x, self.width(), "dconv", kernel_size=3, dilation_rate=2)

    def _depthwise(self, x, h, c, stride):
        multiplier = self.pick((1, 1, 2))
        x = L.DepthwiseConv2D(
            3,
            stride,
            padding="same",
            depth_multiplier=multiplier,
            use_bias=False,
            name=self.name("dw"),
        )(x)
        x = L.BatchNormalization(name=self.name("dw_bn"))(x)
        act = self.pick(self.activations)
        x = self.activation(x, act, f"dw_{act}")
        return x, f"depthwise(3, s={stride}, m={multiplier}, bn, {act})"

    def _transpose(self, x, h, c, stride):
        if h > 8:
            return self._conv(x, h, c, stride)
        filters, k = self.width(), self.pick((2, 3))
        x = L.Conv2DTranspose(filters, k, 2, padding="same", use_bias=False, name=self.name("tc"))(
            x
        )
        x = L.BatchNormalization(name=self.name("tc_bn"))(x)
        act = self.pick(("relu", "relu6", "linear"))
        x = self.activation(x, act, f"tc_{act}")
        return x, f"transpose({filters}, {k}, s=2, bn, {act})"

    def _residual(self, x, h, c, stride):
        y, first = self.conv_bn(x, self.width(), "res_a", kernel_size=3)
        y = L.Conv2D(c, 1, use_bias=False, name=self.name("res_b"))(y)
        y = L.BatchNormalization(name=self.name("res_b_bn"))(y)
        x = L.Add(name=self.name("add"))([x, y])
        relu = self.chance(0.5)
        if relu:
            x = L.ReLU(name=self.name("add_relu"))(x)
        return x, f"residual({first}, conv1x1, Add{' + ReLU' if relu else ''})"

    def _concat(self, x, h, c, stride):
        # The digits nets' branch pair: a 3x3 and a 1x1 Conv-BN-ReLU, both strided.
        a, first = self.conv_bn(x, self.width(), "cat_a", kernel_size=3, strides=stride)
        b, second = self.conv_bn(x, self.width(), "cat_b", kernel_size=1, strides=stride)
        inputs = [a, b]
        if stride == 1 and self.chance(0.3):
            inputs.append(x)  # the block input too, which the branches read as well
        x = L.Concatenate(name=self.name("cat"))(inputs)
        return x, f"concat({first}, {second}{', input' if len(inputs) == 3 else ''})"

    def _squeeze_excite(self, x, h, c, stride):
        reduce = max(1, c // self.pick((2, 4)))
        inner = self.pick(("relu", "swish"))
        gate = self.pick(("sigmoid", "sigmoid", "hard_sigmoid"))
        s = L.GlobalAveragePooling2D(keepdims=True, name=self.name("se_squeeze"))(x)
        fused = self.chance(0.5)  # EfficientNet fuses the activations into the convs
        s = L.Conv2D(reduce, 1, activation=inner if fused else None, name=self.name("se_reduce"))(s)
        if not fused:
            s = self.activation(s, inner, f"se_reduce_{inner}")
        if gate == "hard_sigmoid":
            s = L.Conv2D(c, 1, name=self.name("se_expand"))(s)
            s = self.hard_sigmoid(s, "se_gate")
        else:
            s = L.Conv2D(c, 1, activation="sigmoid", name=self.name("se_expand"))(s)
        x = L.Multiply(name=self.name("se_excite"))([x, s])
        return x, f"squeeze_excite(reduce={reduce}, {inner}, {gate})"

    def _gate(self, x, h, c, stride):
        a, first = self.conv_bn(x, c, "gate_a", kernel_size=1)
        g = L.Conv2D(c, 3, padding="same", name=self.name("gate_b"))(x)
        kind = self.pick(("sigmoid", "tanh"))
        g = L.Activation(kind, name=self.name(f"gate_{kind}"))(g)
        return L.Multiply(name=self.name("gate"))([a, g]), f"gate({first} * {kind}(conv))"

    def _max_pool(self, x, h, c, stride):
        size, padding = self.pick((2, 3)), self.pick(("same", "valid"))
        if padding == "valid" and h < size + 1:
            padding = "same"
        x = L.MaxPooling2D(size, max(stride, 1), padding=padding, name=self.name("maxpool"))(x)
        return x, f"max_pool({size}, s={stride}, {padding})"

    def _average_pool(self, x, h, c, stride):
        size, padding = self.pick((2, 3)), self.pick(("same", "valid"))
        if padding == "valid" and h < size + 1:
            padding = "same"
        x = L.AveragePooling2D(size, stride, padding=padding, name=self.name("avgpool"))(x)
        return x, f"average_pool({size}, s={stride}, {padding})"

    def _upsample(self, x, h, c, stride):
        if h > 6:
            return self._max_pool(x, h, c, 2)
        interpolation = self.pick(("nearest", "bilinear"))
        x = L.UpSampling2D(2, interpolation=interpolation, name=self.name("up"))(x)
        return x, f"upsample(2, {interpolation})"

    def _zero_pad(self, x, h, c, stride):
        x = L.ZeroPadding2D(1, name=self.name("pad"))(x)
        x, label = self.conv_bn(x, self.width(), "pad_conv", kernel_size=3, padding="valid")
        return x, f"zero_pad(1) + {label}"

    # -- the model ----------------------------------------------------------------
    def head(self, x, classes: int):
        if self.chance(0.5) or int(x.shape[1]) > 4:
            x = L.GlobalAveragePooling2D(name="head_pool")(x)
        else:
            x = L.Flatten(name="head_flatten")(x)
        if self.chance(0.3):
            x = L.Dense(self.width() * 2, name="head_hidden")(x)
            x = L.ReLU(name="head_hidden_relu")(x)
        return L.Dense(classes, name="logits")(x)


def _build(seed: int, activations: tuple[str, ...] = ACTIVATIONS):
    """The float model of `seed` and its builder (for the description)."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    size = int(rng.choice((8, 10, 12)))
    channels = int(rng.choice((1, 3)))
    builder = _GraphBuilder(rng, activations)
    inputs = keras.Input((size, size, channels), name="image")
    x = inputs
    if builder.chance(0.3):
        x = L.Rescaling(2.0, offset=-1.0, name="rescale")(x)
        builder.blocks.append("rescaling(2, -1)")
    x, stem = builder.conv_bn(x, builder.width(), "conv", kernel_size=3)
    builder.blocks.append(f"stem: {stem}")
    for i in range(int(rng.integers(2, 6))):
        builder.prefix = f"b{i}"
        x = builder.block(builder.pick(BLOCKS), x)
    logits = builder.head(x, classes=int(rng.integers(3, 11)))
    return keras.Model(inputs, logits, name=f"random_graph_{seed}"), builder, rng


def _plant_dead(model, rng: np.random.Generator, seed: int):
    sizes = [
        int(layer.moving_variance.shape[0])
        for layer in model.layers
        if family_of(layer) is Family.BATCHNORM
    ]
    if not sizes:
        return model, []
    try:
        return testing.with_dead_channels(
            model,
            num_layers=int(rng.integers(1, 4)),
            per_layer=int(rng.integers(1, min(sizes) + 1)),
            seed=seed,
        )
    except ValueError:  # no BN right after a convolution
        return model, []


def random_graph(seed: int, activations: tuple[str, ...] = ACTIVATIONS):
    """A random small functional model of exportable layers, and how to quantize it.

    The model is float, with dead channels planted in one to three BN layers
    (`tf_pfq.testing.with_dead_channels`, sometimes every channel of a layer), random
    BN scales and shifts and the other BN statistics measured on the seed's images
    (`with_live_batchnorm`); its output is logits.

    Args:
      seed: everything (architecture, weights, statistics, setting) is drawn from it.
      activations: the activations conv and depthwise blocks draw from; e.g.
        `ACTIVATIONS + MORE_ACTIVATIONS` (other seeds' graphs then).

    Returns:
      (model, `GraphDescription`).
    """
    model, builder, rng = _build(seed, tuple(activations))
    model, planted = _plant_dead(model, rng, seed)
    model = testing.with_live_batchnorm(model, images(seed), seed=seed)
    description = GraphDescription(
        seed=seed,
        input_shape=tuple(int(d) for d in model.input_shape[1:]),  # type: ignore[arg-type]
        blocks=tuple(builder.blocks),
        activation_bits=int(rng.integers(MIN_BITS, MAX_BITS + 1)),
        weight_bits=int(rng.integers(MIN_BITS, MAX_BITS + 1)),
        per_channel_weights=builder.chance(0.5),
        weight_scheme=str(builder.pick(WEIGHT_SCHEMES)),
        learning_rate=float(builder.pick((1e-3, 1e-2, 5e-2))),
        planted=tuple(planted),
    )
    return model, description


def images(seed: int) -> np.ndarray:
    """The seed's inputs: uniform [0, 1) images of the seed's input shape."""
    rng = np.random.default_rng(seed)
    size = int(rng.choice((8, 10, 12)))
    channels = int(rng.choice((1, 3)))
    data = np.random.default_rng([seed, 1]).uniform(0, 1, (NUM_IMAGES, size, size, channels))
    return data.astype(np.float32)


def run_random_graph(
    seed: int, epochs: int = 1, activations: tuple[str, ...] = ACTIVATIONS
) -> testing.ChainResult:
    """Graph `seed` through the whole chain, measured on XNNPACK (`tf_pfq.testing.run_chain`).

    Both fine-tunings run `epochs` epochs of `tf_pfq.training.fit` (momentum SGD at
    the drawn learning rate) on random labels, batches of 8; a second PfQ runs after
    stage A. Never raises for a failing stage: the result records it.

    Returns:
      The `ChainResult`, its `description` the graph's `GraphDescription`.
    """
    from tf_pfq.training import TrainConfig

    model, description = random_graph(seed, activations)
    data = images(seed)
    classes = int(model.output_shape[-1])
    labels = np.random.default_rng([seed, 2]).integers(0, classes, len(data))
    settings = testing.ChainSettings(
        activation_bits=description.activation_bits,
        weight_bits=description.weight_bits,
        per_channel_weights=description.per_channel_weights,
        weight_scheme=description.weight_scheme,
        train=TrainConfig(epochs=epochs, learning_rate=description.learning_rate),
        second_prune=True,
    )
    keras.utils.set_random_seed(seed)
    result = testing.run_chain(model, data, num_test=NUM_TEST, settings=settings, labels=labels)
    result.description = description
    return result
