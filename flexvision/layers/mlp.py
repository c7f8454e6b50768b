"""Transformer MLP block (fc1 -> activation -> dropout -> fc2 -> dropout)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from flexvision.layers.common import dense


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the exact erf form, x / 2 * (1 + erf(x / sqrt(2))) (Hendrycks & Gimpel 2016,
    sec. 2), written as torch.nn.GELU() computes it (timm's default).

    Not ``jax.nn.gelu(approximate=False)``: that one is x / 2 * erfc(-x / sqrt(2)), and XLA's
    CPU backend expands ``erfc`` into two polynomials, an exp and two divisions per element
    (both branches evaluated), where ``erf`` is one rational polynomial. Same function: the
    two forms differ by <= 1.2e-6 absolute on [-10, 10] in float32, as does each from torch's.
    ViT-S/16 at batch 32 on a 2-core CPU: the GELU pass 88 -> 70 ms per block (interleaved).
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


class Mlp(nn.Module):
    """Two-layer MLP of the ViT block (Vaswani et al. 2017, Dosovitskiy et al. 2021).

    ``hidden_dim`` units with ``activation``; output width equals the input width unless
    ``out_dim`` is given.
    """

    hidden_dim: int
    out_dim: int | None = None
    activation: Callable[[jax.Array], jax.Array] = gelu_exact
    dropout: float = 0.0
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        out_dim = self.out_dim or x.shape[-1]
        x = dense(self.hidden_dim, axes=("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        x = self.activation(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = dense(out_dim, axes=("mlp", "embed"), dtype=self.dtype, name="fc2")(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)
