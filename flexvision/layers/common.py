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
import jax.numpy as jnp

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


def conv_transpose_2x2(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype=None) -> jax.Array:
    """torch ConvTranspose2d(kernel 2, stride 2) in NHWC: (B, h, w, Cin) -> (B, 2h, 2w, Cout).

    ``kernel`` is (2, 2, Cin, Cout) (torch's (Cin, Cout, 2, 2) weight permuted), ``bias`` (Cout,).
    Kernel = stride, so the taps never overlap: ``out[2i + a, 2j + b] = x[i, j] @ W[a, b] + bias``,
    one einsum. Computes in ``dtype`` (default: the input's).
    """
    dtype = dtype or x.dtype
    b, h, w, _ = x.shape
    up = jnp.einsum("bhwc,xyco->bhxwyo", x.astype(dtype), kernel.astype(dtype))
    return up.reshape(b, 2 * h, 2 * w, kernel.shape[-1]) + bias.astype(dtype)


def layer_norm(epsilon: float = 1e-6, *, dtype=None, name: str | None = None) -> nn.LayerNorm:
    """``nn.LayerNorm`` over the last axis with logically named scale and bias."""
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name,
                        scale_init=param_init(nn.initializers.ones, ("norm",)),
                        bias_init=param_init(nn.initializers.zeros, ("norm",)))


class BatchNorm(nn.Module):
    """Batch normalization over the last (channel) axis (Ioffe & Szegedy 2015, Alg. 1) with
    PyTorch ``BatchNorm2d`` semantics, so that models imported from timm keep training as there.

    ``use_running_average=False``: normalize with the batch mean and the biased batch variance,
    and move the running averages (``batch_stats``: ``mean``, ``var``) by
    ``running = momentum * running + (1 - momentum) * batch``, where the variance entering the
    running average is the UNBIASED one, ``var * n / (n - 1)`` over the n = B*H*W values per
    channel (torch/nn/modules/batchnorm.py; Flax's ``nn.BatchNorm`` would use the biased one).
    ``momentum`` is Flax's decay: PyTorch's ``momentum=0.1`` is ``0.9`` here. Statistics are
    computed in float32 whatever ``dtype``.

    ``frozen=True`` is torchvision's ``FrozenBatchNorm2d`` (ops/misc.py), the norm layer of its
    and detectron2's detection backbones: always the running statistics (``use_running_average``
    is ignored, so ``batch_stats`` is read, never written, and need not be mutable), and no
    gradient reaches ``scale``/``bias``/statistics (``stop_gradient``). Their optimizer updates
    are then zero (Adam, SGD, Lion; flexvision.engine.optim decays only ndim >= 2 parameters).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    axes: tuple[str | None, ...] = ("norm",)
    dtype: jax.typing.DTypeLike | None = None
    frozen: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", param_init(nn.initializers.ones, self.axes), (features,),
                           jnp.float32)
        bias = self.param("bias", param_init(nn.initializers.zeros, self.axes), (features,),
                          jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        values = x.astype(jnp.float32)
        if self.frozen:
            scale, bias = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(bias)
            mean = jax.lax.stop_gradient(running_mean.value)
            var = jax.lax.stop_gradient(running_var.value)
        elif use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            reduce_axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(values, axis=reduce_axes)
            var = jnp.mean(jnp.square(values - mean), axis=reduce_axes)
            if not self.is_initializing():
                count = x.size // features
                unbiased = var * (count / max(count - 1, 1))
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = (self.momentum * running_var.value
                                     + (1 - self.momentum) * unbiased)
        y = (values - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype or x.dtype)


def batch_norm(*, momentum: float = 0.9, epsilon: float = 1e-5,
               axes: Sequence[str | None] = ("norm",), dtype=None, frozen: bool = False,
               name: str | None = None) -> BatchNorm:
    """:class:`BatchNorm` with logically named scale and bias (``axes``); call it with
    ``use_running_average=not train``."""
    return BatchNorm(momentum=momentum, epsilon=epsilon, axes=tuple(axes), dtype=dtype,
                     frozen=frozen, name=name)
