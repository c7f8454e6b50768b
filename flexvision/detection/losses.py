"""Mask R-CNN losses on static shapes (torchvision rpn.py compute_loss, roi_heads.py
fastrcnn_loss and maskrcnn_loss). L = L_cls + L_box + L_mask (He et al. 2017, sec. 3).

Sampled sets are boolean masks (or index arrays with a validity mask); every mean divides by
the number of real samples (at least 1). Masked-out entries are replaced by zeros BEFORE any
nonlinearity (``where`` on the difference, not a multiply afterwards), so the NaN/inf regression
targets of unmatched or padding entries reach neither the losses nor their gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_l1(diff: jax.Array, beta: float) -> jax.Array:
    """Huber-style smooth L1 per element: 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta."""
    ad = jnp.abs(diff)
    if beta == 0:
        return ad
    return jnp.where(ad < beta, 0.5 * ad * ad / beta, ad - 0.5 * beta)


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy on logits, the stable form torch uses."""
    return jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _masked_sum(values, mask):
    return jnp.sum(jnp.where(mask, values, 0.0))


def rpn_loss(objectness: jax.Array, box_deltas: jax.Array, labels: jax.Array,
             regression_targets: jax.Array, sampled_pos: jax.Array, sampled_neg: jax.Array,
             beta: float = 1.0 / 9) -> tuple[jax.Array, jax.Array]:
    """(loss_objectness, loss_rpn_box_reg) over all images' anchors.

    objectness (..., A) logits, box_deltas (..., A, 4), labels (..., A) (1 fg, 0 bg),
    regression_targets (..., A, 4), sampled_pos / sampled_neg (..., A) bool. Objectness: mean
    BCE over the sampled set; box: sum over positives of smooth-L1 (beta 1/9) summed over the 4
    coordinates, divided by the number sampled (torchvision RegionProposalNetwork.compute_loss).
    """
    sampled = sampled_pos | sampled_neg
    count = jnp.maximum(jnp.sum(sampled), 1).astype(jnp.float32)
    bce = bce_with_logits(objectness.astype(jnp.float32), labels.astype(jnp.float32))
    loss_obj = _masked_sum(bce, sampled) / count
    diff = jnp.where(sampled_pos[..., None], box_deltas.astype(jnp.float32) - regression_targets,
                     0.0)
    return loss_obj, jnp.sum(smooth_l1(diff, beta)) / count


def fastrcnn_loss(class_logits: jax.Array, box_regression: jax.Array, labels: jax.Array,
                  regression_targets: jax.Array, valid: jax.Array, beta: float = 1.0 / 9
                  ) -> tuple[jax.Array, jax.Array]:
    """(loss_classifier, loss_box_reg) over sampled proposals (S,) (torchvision fastrcnn_loss).

    class_logits (S, K), box_regression (S, 4K) (class k at 4k..4k+3), labels (S,) int (0 =
    background), regression_targets (S, 4), valid (S,) marks real samples. Classifier: mean
    cross-entropy; box: smooth-L1 (beta 1/9) of each positive's own-class deltas, summed, over
    the number of samples.
    """
    count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    logp = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
    labels = labels.astype(jnp.int32)
    ce = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    loss_cls = _masked_sum(ce, valid) / count
    per_class = box_regression.reshape(box_regression.shape[0], -1, 4).astype(jnp.float32)
    own = jnp.take_along_axis(per_class, labels[:, None, None], axis=1)[:, 0]
    diff = jnp.where((valid & (labels > 0))[:, None], own - regression_targets, 0.0)
    return loss_cls, jnp.sum(smooth_l1(diff, beta)) / count


def maskrcnn_loss(mask_logits: jax.Array, labels: jax.Array, mask_targets: jax.Array,
                  valid: jax.Array) -> jax.Array:
    """Mean BCE of each positive's own-class mask logits (torchvision maskrcnn_loss).

    mask_logits (P, M, M, K) NHWC, labels (P,) (the positive class), mask_targets (P, M, M)
    float in [0, 1], valid (P,) marks real positives. Mean over valid * M * M pixels; no
    positive gives 0.
    """
    labels = labels.astype(jnp.int32)
    own = jnp.take_along_axis(mask_logits.astype(jnp.float32),
                              labels[:, None, None, None], axis=-1)[..., 0]
    bce = bce_with_logits(own, mask_targets.astype(jnp.float32))
    pixels = mask_targets.shape[1] * mask_targets.shape[2]
    count = jnp.maximum(jnp.sum(valid) * pixels, 1).astype(jnp.float32)
    return _masked_sum(bce, valid[:, None, None]) / count
