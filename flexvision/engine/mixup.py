"""Mixup (Zhang et al. 2018, arXiv 1710.09412) on a device batch, inside the jitted step."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float = 0.2,
          ) -> tuple[jax.Array, jax.Array]:
    """Mixes each example with its neighbour in the batch: x' = lam x + (1 - lam) roll(x).

    One ``lam ~ Beta(alpha, alpha)`` per batch (as in big_vision's ``mixup``), folded to
    ``max(lam, 1 - lam)`` so the original example dominates; ``labels`` must be one-hot/soft.
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be positive, got {alpha!r}; set it to 0 in the "
                         f"config to switch mixup off instead")
    lam = jax.random.beta(rng, alpha, alpha)
    lam = jnp.maximum(lam, 1.0 - lam)
    mix = lambda x: lam * x + (1.0 - lam) * jnp.roll(x, 1, axis=0)
    return mix(images).astype(images.dtype), mix(labels).astype(labels.dtype)
