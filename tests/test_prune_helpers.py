"""Helpers for the PfQ tests (plant truly dead BN channels, compare outputs), and
tests that the planted channels really are constant."""

from __future__ import annotations

import numpy as np

from tf_pfq import models
from tf_pfq.compat import keras

L = keras.layers

# float32 has a 1.2e-7 relative step; a few hundred accumulated products per output
# and a few layers stay well inside 2e-5 of the output scale. A wrong compensation
# (the negative controls) moves outputs by 1e-2 or more of the scale.
ROUND_OFF = 2e-5


def randomize_bn(model, x=None, seed: int = 0) -> None:
    """Random BN affine terms; statistics random too, or measured on the inputs `x`.

    Measured statistics (one training-mode pass with momentum 0, so the moving values
    become the batch values; variances floored at 10 epsilon) keep the signal alive
    through deep untrained nets.
    """
    rng = np.random.default_rng(seed)
    bns = [layer for layer in model.layers if isinstance(layer, L.BatchNormalization)]
    for layer in bns:
        c = layer.moving_variance.shape[0]
        layer.set_weights(
            [
                rng.uniform(0.5, 1.5, c),
                rng.normal(0.0, 0.5, c),
                rng.normal(0.0, 0.1, c),
                rng.uniform(0.5, 1.5, c),
            ]
        )
    if x is not None:
        momenta = [layer.momentum for layer in bns]
        for layer in bns:
            layer.momentum = 0.0
        model(x, training=True)
        for layer, momentum in zip(bns, momenta):
            layer.momentum = momentum
            # Untrained nets have channels that are (nearly) constant on real inputs;
            # lift them above epsilon so that only the planted channels are dead.
            floor = np.maximum(layer.moving_variance.numpy(), 10 * layer.epsilon)
            layer.moving_variance.assign(floor)


def producer_of(model, bn_name: str):
    return model.get_layer(bn_name).inbound_nodes[0].inbound_layers


def plant_dead(model, bn_name: str, channel: int, beta: float) -> None:
    """Makes BN channel `channel` truly dead: zero filter, so a constant input at the
    moving mean, and a moving variance below epsilon. Its output is then exactly
    `beta` in inference and in training mode."""
    producer = producer_of(model, bn_name)
    weights = producer.get_weights()
    if isinstance(producer, L.DepthwiseConv2D):
        weights[0][:, :, channel, :] = 0.0  # (kh, kw, in, multiplier), multiplier 1
    elif isinstance(producer, L.SeparableConv2D):
        weights[1][..., channel] = 0.0  # [depthwise, pointwise (1, 1, in, out), bias]
    elif isinstance(producer, L.Conv2DTranspose):
        weights[0][:, :, channel, :] = 0.0  # (kh, kw, out, in)
    else:
        weights[0][..., channel] = 0.0  # Conv2D / Dense: output channels last
    constant = 0.0
    if getattr(producer, "use_bias", False):
        constant = float(weights[-1][channel])
    producer.set_weights(weights)
    bn = model.get_layer(bn_name)
    gamma, b, mean, var = bn.get_weights()
    b[channel], mean[channel], var[channel] = beta, constant, bn.epsilon / 1000
    bn.set_weights([gamma, b, mean, var])


def tiny_dead_model(l2: float = 0.0):
    """A tiny MobileNetV1-style net (8x8 input) with 2 genuinely dead channels in conv_dw_1_bn.

    beta < 0 makes relu6(beta) = 0, so PfQ's absorption is exact even across the next
    layer's zero padding. Shared by the workflow and baseline tests.
    """
    keras.utils.set_random_seed(0)
    model = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4, 8), strides=(1, 2), l2=l2)
    for channel in (1, 3):
        plant_dead(model, "conv_dw_1_bn", channel, beta=-0.5)
    return model


def live_threshold(model, bn_name: str):
    """Negative control: a `threshold` under which the most varying (live) channel of
    `bn_name` looks dead, so prune takes the same path as for a dead one.

    The channel's moving variance is lowered to half the layer's smallest, keeping it
    far from saturating the activation; the threshold lies between the two.

    Returns:
      (threshold callable, the flagged channel).
    """
    bn = model.get_layer(bn_name)
    variance = bn.moving_variance.numpy()
    channel, smallest = int(np.argmax(variance)), float(variance.min())
    variance[channel] = smallest / 2
    bn.moving_variance.assign(variance)
    limit = 0.75 * smallest
    return (lambda layer: limit if layer.name == bn_name else 0.0), channel


def outputs(model, x, training: bool = False) -> np.ndarray:
    return np.asarray(model(x, training=training))


def max_change(model, pruned, x, training: bool = False) -> float:
    return float(np.max(np.abs(outputs(model, x, training) - outputs(pruned, x, training))))


def assert_same_outputs(model, pruned, x, training: bool = False) -> None:
    before, after = outputs(model, x, training), outputs(pruned, x, training)
    scale = float(np.max(np.abs(before)))
    assert scale > 0.1, "the test model must produce a non-trivial output"
    np.testing.assert_allclose(after, before, rtol=0, atol=ROUND_OFF * scale)


def all_weights(model) -> dict[str, list[np.ndarray]]:
    return {
        layer.name: [np.copy(w) for w in layer.get_weights()]
        for layer in model.layers
        if not isinstance(layer, L.InputLayer)
    }


def assert_weights_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert len(a[name]) == len(b[name]), name
        for x, y in zip(a[name], b[name]):
            np.testing.assert_array_equal(x, y, err_msg=name)


def test_planted_channel_is_beta_in_both_modes():
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(x))
    randomize_bn(model)
    plant_dead(model, "bn", 2, beta=0.75)
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 3)).astype(np.float32)
    for training in (False, True):
        np.testing.assert_allclose(outputs(model, x, training)[..., 2], 0.75, atol=1e-6)
        assert np.ptp(outputs(model, x, training)[..., 1]) > 0.1  # a live channel varies
