"""Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth")."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class DropPath(nn.Module):
    """Drops the whole residual branch per sample with probability ``rate`` in training,
    scaling kept samples by 1 / (1 - rate). Identity at eval. Uses the 'dropout' rng."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def drop_path_rates(total_rate: float, num_blocks: int) -> list[float]:
    """Linearly increasing per-block drop rates from 0 to ``total_rate`` (timm's schedule)."""
    if num_blocks <= 1:
        return [0.0] * num_blocks
    return [total_rate * i / (num_blocks - 1) for i in range(num_blocks)]
