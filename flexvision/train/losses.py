"""Classification losses, chosen by name from the config (``config.loss``).

Each loss maps (logits [B, K], soft/one-hot labels [B, K]) to per-example losses [B]; the step
averages them over the real (unpadded) examples. A distillation mode registers its own loss
with :func:`register_loss` and plugs into the same step factory.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
_LOSSES: dict[str, LossFn] = {}


def register_loss(name: str):
    """Decorator registering a per-example loss ``fn(logits, labels) -> [B]`` under ``name``."""
    def _register(fn: LossFn) -> LossFn:
        _LOSSES[name] = fn
        return fn
    return _register


def smooth_labels(labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Label smoothing (Szegedy et al. 2016, sec. 7): y' = (1 - eps) y + eps / K."""
    num_classes = labels.shape[-1]
    return labels * (1.0 - label_smoothing) + label_smoothing / num_classes


@register_loss("softmax_xent")
def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy -sum_k y_k log softmax(z)_k, per example."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


@register_loss("sigmoid_xent")
def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Sigmoid cross-entropy summed over classes, per example (big_vision's ``sigmoid_xent``)."""
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels).sum(-1)


def get_loss(name: str, label_smoothing: float = 0.0) -> LossFn:
    """The per-example loss ``name`` with labels smoothed by ``label_smoothing``."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(_LOSSES)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    base = _LOSSES[name]
    if not label_smoothing:
        return base
    return lambda logits, labels: base(logits, smooth_labels(labels, label_smoothing))
