"""Logical axis names for parameters, and the initializers that carry them.

Every parameter in flexvision is created through :func:`param_init` (or a flax layer given its
``kernel_init``/``bias_init`` from here), so each one carries logical axis names
(``nn.with_logical_partitioning``). Sharding rules in a config map these names to mesh axes;
model code never names a mesh axis.

Logical axes used by the models:
    embed     the residual-stream / channel width of a token or feature map
    mlp       hidden units of an MLP (tensor-parallel axis)
    heads     attention heads (tensor-parallel axis)
    kv        per-head feature dimension
    classes   the classifier's outputs
    conv_h, conv_w   spatial taps of a convolution kernel
    conv_in, conv_out  input / output channels of a convolution (conv_out is tensor-parallel)
    tokens    positions of a position embedding or learned token table
    norm      scale/bias of a normalization layer
    relpos    entries of a relative-position table
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax

Initializer = Callable[..., jax.Array]

DENSE_AXES = ("embed", "mlp")
CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def param_init(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    """``init`` whose parameters carry the logical axis names ``axes``."""
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(features: int, *, axes: Sequence[str | None] = DENSE_AXES, use_bias: bool = True,
          kernel_init: Initializer = nn.initializers.xavier_uniform(),
          bias_init: Initializer = nn.initializers.zeros, dtype=None, name: str | None = None,
          ) -> nn.Dense:
    """``nn.Dense`` with logically named kernel (``axes``) and bias (``axes[-1]``)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=param_init(kernel_init, axes),
                    bias_init=param_init(bias_init, (axes[-1],)))


def conv(features: int, kernel_size: Sequence[int], *, strides: Sequence[int] | int = 1,
         padding="SAME", feature_group_count: int = 1, use_bias: bool = True,
         kernel_init: Initializer = nn.initializers.lecun_normal(),
         bias_init: Initializer = nn.initializers.zeros, dtype=None, name: str | None = None,
         ) -> nn.Conv:
    """``nn.Conv`` (NHWC, HWIO kernel) with logically named kernel and bias."""
    if isinstance(strides, int):
        strides = (strides, strides)
    return nn.Conv(features, tuple(kernel_size), strides=tuple(strides), padding=padding,
                   feature_group_count=feature_group_count, use_bias=use_bias, dtype=dtype,
                   name=name, kernel_init=param_init(kernel_init, CONV_AXES),
                   bias_init=param_init(bias_init, ("conv_out",)))


def layer_norm(epsilon: float = 1e-6, *, dtype=None, name: str | None = None) -> nn.LayerNorm:
    """``nn.LayerNorm`` over the last axis with logically named scale and bias."""
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name,
                        scale_init=param_init(nn.initializers.ones, ("norm",)),
                        bias_init=param_init(nn.initializers.zeros, ("norm",)))


def batch_norm(*, momentum: float = 0.9, epsilon: float = 1e-5,
               axes: Sequence[str | None] = ("norm",), dtype=None, name: str | None = None,
               ) -> nn.BatchNorm:
    """``nn.BatchNorm`` over the last (channel) axis with logically named scale and bias.

    ``momentum`` is Flax's decay of the running averages (running = momentum * running +
    (1 - momentum) * batch), so PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here. Call it with
    ``use_running_average=not train``; the running mean/var live in the 'batch_stats' collection.
    """
    return nn.BatchNorm(momentum=momentum, epsilon=epsilon, dtype=dtype, name=name,
                        scale_init=param_init(nn.initializers.ones, axes),
                        bias_init=param_init(nn.initializers.zeros, axes))
