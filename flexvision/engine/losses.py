"""Per-example losses: classification losses chosen by name (``config.loss``) and the
distillation KL.

Each classification loss maps (logits [B, K], soft/one-hot labels [B, K]) to per-example losses
[B]; the train step averages them over the batch, the eval step sums them over the unpadded
examples. :func:`register_loss` adds a named loss. Distillation does not register one: its loss
(:func:`make_distill_loss`) reads targets that concatenate the teacher's logits and the labels,
and the distillation objective passes it to the step directly.
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


def mean_over_heads(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` for models whose train-mode output is a tuple of logits, one per head
    (DeiT-distilled: class and distillation tokens): the per-example mean over the heads. A
    single logits array passes through unchanged."""
    def loss(outputs, labels):
        heads = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return sum(loss_fn(h, labels) for h in heads) / len(heads)
    return loss


def mean_over_pixels(loss_fn: LossFn) -> LossFn:
    """A per-pixel classification loss as a per-example one: ``loss_fn`` on (B, H, W, K) logits
    and (B, H, W, K) one-hot/soft labels gives (B, H, W); the result is its mean over the pixels,
    (B,) (mmseg ``CrossEntropyLoss`` with mean reduction over equal-size images). Logits and
    labels of shape (B, K) pass through unchanged."""
    def loss(logits, labels):
        per_pixel = loss_fn(logits, labels)
        return per_pixel.reshape(per_pixel.shape[0], -1).mean(axis=1)
    return loss


def make_loss(config) -> LossFn:
    """The per-example loss from ``config.loss`` (default softmax_xent) and
    ``config.label_smoothing``."""
    return get_loss(config.get("loss", "softmax_xent"), float(config.get("label_smoothing", 0.0)))


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array,
                    temperature: float = 1.0) -> jax.Array:
    """Per-example ``T^2 * KL(p_t || p_s)`` with ``p = softmax(logits / T)`` (Hinton et al.
    2015, eq. 2 and the T^2 gradient scaling of sec. 2; big_vision's ``kl`` distill loss)."""
    temperature = float(temperature)
    log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, -1)
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
    kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return temperature ** 2 * kl


def make_distill_loss(temperature: float, label_weight: float = 0.0,
                      label_loss: LossFn | None = None) -> LossFn:
    """Per-example loss over ``targets = concat([teacher_logits, labels], -1)`` [B, 2K]:
    ``(1 - w) * distillation_kl + w * label_loss``. ValueError for ``w`` outside [0, 1], for
    ``w > 0`` without a label loss, and (at trace time) for targets that are not 2K wide."""
    label_weight = float(label_weight)
    if not 0.0 <= label_weight <= 1.0:
        raise ValueError(f"config.distill.label_weight must be in [0, 1], got {label_weight}")
    if label_weight and label_loss is None:
        raise ValueError("label_weight > 0 needs a label loss (config.loss)")

    def loss_fn(student_logits, targets):
        num_classes = student_logits.shape[-1]
        if targets.shape[-1] != 2 * num_classes:
            raise ValueError(f"distillation targets must be [teacher logits, labels] with "
                             f"{2 * num_classes} columns; got shape {targets.shape}. The teacher "
                             f"and student must have the same number of classes")
        teacher_logits, labels = targets[..., :num_classes], targets[..., num_classes:]
        loss = distillation_kl(student_logits, teacher_logits, temperature)
        if label_weight:
            loss = (1.0 - label_weight) * loss + label_weight * label_loss(student_logits, labels)
        return loss

    return loss_fn
