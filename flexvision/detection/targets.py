"""Training targets of Mask R-CNN with static shapes: ground-truth padding, matching, sampling.

torchvision models/detection/_utils.py (Matcher, BalancedPositiveNegativeSampler) and the
target assignment of rpn.py / roi_heads.py. Ground truth is padded to a static capacity with a
validity mask (:func:`pad_targets`); an image without objects is all padding and trains as
all-background (every anchor / proposal negative, no box or mask loss).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexvision.detection.boxes import check_boxes

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def pad_targets(boxes: Sequence, labels: Sequence, capacity: int, masks: Sequence | None = None,
                mask_hw: Sequence[int] | None = None, capacity_key: str = "max_instances"
                ) -> dict[str, np.ndarray]:
    """Host-side padding of per-image ground truth to ``capacity`` objects (NumPy, before jit).

    For in-memory data (tests, notebooks); the tf.data pipeline pads with the ``det_pad`` op
    (flexvision.data.ops), whose keys (boxes, labels, masks, valid) these match.

    boxes: per image (G_i, 4) (x1, y1, x2, y2) pixels; labels: per image (G_i,) ints >= 1;
    masks (optional): per image (G_i, h_i, w_i) 0/1, padded to ``mask_hw`` (the padded batch).
    Returns {'boxes' (B, capacity, 4) float32, 'labels' (B, capacity) int32, 'valid'
    (B, capacity) bool[, 'masks' (B, capacity, H, W) uint8]}. Raises ValueError for an image with
    more objects than ``capacity`` (naming ``capacity_key``, the config field to raise), for
    NaN boxes, boxes with x2 < x1 or y2 < y1, labels < 1 and masks of the wrong count or size.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"got boxes for {len(boxes)} images but labels for {len(labels)}")
    b = len(boxes)
    out = {"boxes": np.zeros((b, capacity, 4), np.float32),
           "labels": np.zeros((b, capacity), np.int32),
           "valid": np.zeros((b, capacity), bool)}
    if masks is not None:
        if mask_hw is None:
            raise ValueError("mask_hw (the padded image size) is needed to pad masks")
        out["masks"] = np.zeros((b, capacity, int(mask_hw[0]), int(mask_hw[1])), np.uint8)
    for i, (bx, lb) in enumerate(zip(boxes, labels)):
        bx = check_boxes(np.asarray(bx, np.float32).reshape(-1, 4), f"image {i} gt boxes")
        lb = np.asarray(lb).reshape(-1)
        n = bx.shape[0]
        if n > capacity:
            raise ValueError(f"image {i} has {n} ground-truth objects but the padded capacity is "
                             f"{capacity}; raise config key '{capacity_key}' to at least {n}")
        if lb.shape[0] != n:
            raise ValueError(f"image {i}: {n} boxes but {lb.shape[0]} labels")
        if n and lb.min() < 1:
            raise ValueError(f"image {i}: labels must be >= 1 (0 is background), got {lb.tolist()}")
        out["boxes"][i, :n], out["labels"][i, :n], out["valid"][i, :n] = bx, lb, True
        if masks is not None:
            m = np.asarray(masks[i])
            if m.ndim != 3 or m.shape[0] != n or m.shape[1] > mask_hw[0] or m.shape[2] > mask_hw[1]:
                raise ValueError(f"image {i}: masks must be ({n}, h, w) with h, w <= {tuple(mask_hw)}"
                                 f", got {m.shape}")
            out["masks"][i, :n, :m.shape[1], :m.shape[2]] = m
    return out


def match_boxes(quality: jax.Array, gt_valid: jax.Array, high_threshold: float,
                low_threshold: float, allow_low_quality_matches: bool) -> jax.Array:
    """torchvision Matcher on an IoU matrix ``quality`` (G, N) -> matched gt index (N,) int32.

    ``gt_valid`` (G,) marks real ground truth (padding rows never match). Each column gets its
    best gt (first on ties); values < low -> -1 (background), low <= v < high -> -2 (ignored).
    With ``allow_low_quality_matches``, every column whose IoU with some valid gt equals that
    gt's best IoU (exact equality, ties included) keeps its argmax match. No valid gt: all -1.
    """
    quality = jnp.where(gt_valid[:, None], quality, -1.0)
    matched_vals = jnp.max(quality, axis=0)
    matches = jnp.argmax(quality, axis=0).astype(jnp.int32)
    out = jnp.where(matched_vals < low_threshold, BELOW_LOW_THRESHOLD,
                    jnp.where(matched_vals < high_threshold, BETWEEN_THRESHOLDS, matches))
    if allow_low_quality_matches:
        best = jnp.max(quality, axis=1, keepdims=True)
        restore = jnp.any(gt_valid[:, None] & (quality == best), axis=0)
        out = jnp.where(restore, matches, out)
    return out


def balanced_sample(key: jax.Array, labels: jax.Array, batch_size_per_image: int,
                    positive_fraction: float, valid: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """BalancedPositiveNegativeSampler with fixed counts: masks (pos, neg) over labels (N,).

    labels: >= 1 positive, 0 negative, < 0 ignored (and ``valid`` False ignored). Draws
    num_pos = min(#pos, int(batch * fraction)) positives and num_neg = min(#neg, batch - num_pos)
    negatives uniformly without replacement (random priorities from ``key``; seed it per step
    like every random draw in flexvision). The draw differs from torch.randperm's; the counts
    and the distribution are the same.
    """
    pos = labels >= 1
    neg = labels == 0
    if valid is not None:
        pos, neg = pos & valid, neg & valid
    max_pos = int(batch_size_per_image * positive_fraction)
    num_pos = jnp.minimum(jnp.sum(pos), max_pos)
    num_neg = jnp.minimum(jnp.sum(neg), batch_size_per_image - num_pos)
    key_pos, key_neg = jax.random.split(key)

    def pick(k, candidates, count):
        priority = jnp.where(candidates, jax.random.uniform(k, candidates.shape), 2.0)
        rank = jnp.argsort(jnp.argsort(priority))
        return candidates & (rank < count)

    return pick(key_pos, pos, num_pos), pick(key_neg, neg, num_neg)


def sampled_indices(pos: jax.Array, neg: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """The sampled set ``pos | neg`` (N,) as ascending indices padded to ``size``: (idx, valid).

    torchvision's ``torch.where(pos | neg)`` with a static size (``batch_size_per_image``).
    """
    chosen = pos | neg
    idx = jnp.nonzero(chosen, size=size, fill_value=0)[0].astype(jnp.int32)
    return idx, jnp.arange(size) < jnp.sum(chosen)


def masks_from_indices(n: int, indices) -> np.ndarray:
    """Boolean mask (n,) with ``indices`` set (to use recorded samples instead of a draw)."""
    mask = np.zeros(n, bool)
    mask[np.asarray(indices, np.int64)] = True
    return mask
