"""Transformer MLP block (fc1 -> activation -> dropout -> fc2 -> dropout)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

from flexvision.layers.common import dense


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the exact erf form, as torch.nn.GELU() (timm's default)."""
    return nn.gelu(x, approximate=False)


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
