"""Small MobileNetV1/V2-style classifiers for the embedded data and the benchmarks.

`tf_keras.applications` builds the same blocks, but its smallest input is 32x32 with
a 5-stride stem, too coarse for 32x32 digits; these keep the block structure
(Conv-BN-ReLU6, depthwise separable blocks, inverted residuals with Add) and let
the width, depth and input size be chosen.
"""

from __future__ import annotations

from collections.abc import Callable

from tf_pfq.compat import keras

__all__ = ["mobilenet_v1", "mobilenet_v2", "build"]

L = keras.layers


def _conv_bn_relu(x, filters, kernel, strides, name, regularizer, epsilon):
    x = L.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_regularizer=regularizer,
        name=name,
    )(x)
    x = L.BatchNormalization(epsilon=epsilon, name=f"{name}_bn")(x)
    return L.ReLU(6.0, name=f"{name}_relu")(x)


def _dw_bn_relu(x, strides, name, regularizer, epsilon):
    # `regularizer` here is the depthwise one: MobileNet training leaves depthwise
    # kernels undecayed (they have few weights and decay would shrink them for nothing).
    x = L.DepthwiseConv2D(
        3,
        strides=strides,
        padding="same",
        use_bias=False,
        depthwise_regularizer=regularizer,
        name=name,
    )(x)
    x = L.BatchNormalization(epsilon=epsilon, name=f"{name}_bn")(x)
    return L.ReLU(6.0, name=f"{name}_relu")(x)


def _regularizers(l2: float, depthwise_l2: float | None):
    """(conv and dense kernel regularizer, depthwise kernel regularizer)."""
    depthwise_l2 = l2 if depthwise_l2 is None else depthwise_l2
    return (
        keras.regularizers.L2(l2) if l2 else None,
        keras.regularizers.L2(depthwise_l2) if depthwise_l2 else None,
    )


def _head(x, num_classes, dropout, regularizer):
    x = L.GlobalAveragePooling2D(name="pool")(x)
    if dropout:
        x = L.Dropout(dropout, name="dropout")(x)
    return L.Dense(num_classes, kernel_regularizer=regularizer, name="logits")(x)


def mobilenet_v1(
    input_shape=(32, 32, 3),
    num_classes: int = 10,
    widths=(32, 64, 128, 128, 256, 256, 512, 512),
    strides=(1, 1, 2, 1, 2, 1, 2, 1),
    l2: float = 0.0,
    dropout: float = 0.0,
    name: str = "mobilenet_v1",
    bn_epsilon: float = 1e-3,
    depthwise_l2: float | None = None,
):
    """A MobileNetV1-style net: a 3x3 stem, then depthwise separable blocks.

    Args:
      input_shape: (H, W, C) of one image.
      num_classes: logits (no softmax: train with `from_logits=True`).
      widths: output channels of the stem and then of each separable block.
      strides: stride of the stem and then of each depthwise conv.
      l2: L2 regularization on conv and dense kernels (weight decay). A strong
        value lets BN channels die during pretraining, which PfQ then removes.
      dropout: dropout rate before the classifier.
      name: model name.
      bn_epsilon: every BatchNormalization's epsilon (Keras' default 1e-3; the
        paper's framework, NNabla, uses 1e-5, under which a dead channel's folded
        weights `gamma / sqrt(V + eps) * w` can grow 10x larger).
      depthwise_l2: L2 on the depthwise kernels; None uses `l2` (MobileNet's own
        training uses 0: no decay on depthwise kernels or BN parameters).

    Returns:
      A functional `tf_keras.Model` producing logits.

    Example:
      >>> model = mobilenet_v1(widths=(8, 16), strides=(1, 2))
      >>> model.output_shape
      (None, 10)
    """
    if len(widths) != len(strides):
        raise ValueError(
            f"`widths` and `strides` must have the same length. Received: "
            f"{len(widths)} widths and {len(strides)} strides"
        )
    reg, dw_reg = _regularizers(l2, depthwise_l2)
    eps = bn_epsilon
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn_relu(inputs, widths[0], 3, strides[0], "conv1", reg, eps)
    for i, (width, stride) in enumerate(zip(widths[1:], strides[1:]), start=1):
        x = _dw_bn_relu(x, stride, f"conv_dw_{i}", dw_reg, eps)
        x = _conv_bn_relu(x, width, 1, 1, f"conv_pw_{i}", reg, eps)
    return keras.Model(inputs, _head(x, num_classes, dropout, reg), name=name)


def mobilenet_v2(
    input_shape=(32, 32, 3),
    num_classes: int = 10,
    stem: int = 16,
    blocks=((16, 1, 1), (24, 2, 6), (24, 1, 6), (32, 2, 6), (32, 1, 6), (64, 2, 6), (64, 1, 6)),
    last: int = 256,
    l2: float = 0.0,
    dropout: float = 0.0,
    name: str = "mobilenet_v2",
    bn_epsilon: float = 1e-3,
    depthwise_l2: float | None = None,
):
    """A MobileNetV2-style net: inverted residual blocks with linear bottlenecks.

    Args:
      input_shape: (H, W, C) of one image.
      num_classes: logits (no softmax).
      stem: channels of the 3x3 stem conv.
      blocks: (output channels, stride, expansion) per inverted residual block; a
        block with stride 1 and equal input/output channels gets a residual Add.
      last: channels of the final 1x1 conv before pooling.
      l2: L2 regularization on conv and dense kernels.
      dropout: dropout rate before the classifier.
      name: model name.
      bn_epsilon: every BatchNormalization's epsilon (Keras' default 1e-3; the
        paper's framework, NNabla, uses 1e-5, under which a dead channel's folded
        weights `gamma / sqrt(V + eps) * w` can grow 10x larger).
      depthwise_l2: L2 on the depthwise kernels; None uses `l2` (MobileNet's own
        training uses 0: no decay on depthwise kernels or BN parameters).

    Returns:
      A functional `tf_keras.Model` producing logits.

    Example:
      >>> model = mobilenet_v2(blocks=((8, 1, 1), (8, 1, 4)), last=32)
      >>> model.output_shape
      (None, 10)
    """
    reg, dw_reg = _regularizers(l2, depthwise_l2)
    eps = bn_epsilon
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn_relu(inputs, stem, 3, 2 if input_shape[0] >= 64 else 1, "conv1", reg, eps)
    channels = stem
    for i, (out, stride, expansion) in enumerate(blocks, start=1):
        shortcut = x
        prefix = f"block_{i}"
        if expansion != 1:
            x = _conv_bn_relu(x, channels * expansion, 1, 1, f"{prefix}_expand", reg, eps)
        x = _dw_bn_relu(x, stride, f"{prefix}_dw", dw_reg, eps)
        x = L.Conv2D(out, 1, use_bias=False, kernel_regularizer=reg, name=f"{prefix}_project")(x)
        x = L.BatchNormalization(epsilon=eps, name=f"{prefix}_project_bn")(x)
        if stride == 1 and out == channels:
            x = L.Add(name=f"{prefix}_add")([shortcut, x])
        channels = out
    x = _conv_bn_relu(x, last, 1, 1, "conv_last", reg, eps)
    return keras.Model(inputs, _head(x, num_classes, dropout, reg), name=name)


def build(name: str, **kwargs):
    """Builds a model by name: "mobilenet_v1" or "mobilenet_v2".

    Args:
      name: "mobilenet_v1" or "mobilenet_v2".
      **kwargs: passed to that builder.

    Returns:
      The tf_keras Functional model.

    Raises:
      ValueError: unknown `name`.

    Example:
      >>> build("mobilenet_v1", input_shape=(8, 8, 1), widths=(4, 8), strides=(1, 2)).name
      'mobilenet_v1'
    """
    builders: dict[str, Callable[..., keras.Model]] = {
        "mobilenet_v1": mobilenet_v1,
        "mobilenet_v2": mobilenet_v2,
    }
    if name not in builders:
        raise ValueError(f"`name` must be one of {sorted(builders)}. Received: name={name!r}")
    return builders[name](**kwargs)
