"""Training targets of Mask R-CNN with static shapes: ground-truth padding, matching, sampling.

torchvision models/detection/_utils.py (Matcher, BalancedPositiveNegativeSampler) and the
target assignment of rpn.py / roi_heads.py. Ground truth is padded to a static capacity with a
validity mask (:func:`pad_targets`); an image without objects is all padding and trains as
all-background (every anchor / proposal negative, no box or mask loss), also next to images
with objects in the same batch. Bad ground truth: :func:`pad_targets` and :func:`check_labels`
on the host, :func:`prepare_targets` inside the jitted step.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexvision.detection.boxes import check_boxes, clip_boxes, finite_boxes
from flexvision.layers.instances import PADDED_DTYPES, capacity_error

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def pad_targets(boxes: Sequence, labels: Sequence, capacity: int, masks: Sequence | None = None,
                mask_hw: Sequence[int] | None = None, capacity_key: str = "max_instances",
                num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Host-side padding of per-image ground truth to ``capacity`` objects (NumPy, before jit).

    For in-memory data (tests, notebooks); the tf.data pipeline pads with the ``det_pad`` op
    (flexvision.data.ops). Both produce the layout of :mod:`flexvision.layers.instances`.

    boxes: per image (G_i, 4) (x1, y1, x2, y2) pixels; labels: per image (G_i,) ints in
    1..num_classes-1 (0 is background: a dataset's 0-based label l is l + 1 here);
    masks (optional): per image (G_i, h_i, w_i) 0/1 at the image's own size, padded to
    ``mask_hw`` (the padded batch). Returns {'boxes' (B, capacity, 4) float32, 'labels'
    (B, capacity) int32, 'valid' (B, capacity) bool[, 'masks' (B, capacity, H, W) uint8]}.

    Bad input (the model-level rules; the data level, flexvision.data.coco and the det_* ops,
    already drops empty masks and clips boxes):

    * more objects than ``capacity``: ValueError naming ``capacity_key``, the config field to
      raise;
    * a label outside 1..num_classes-1 (an unknown category; checked when ``num_classes``, the
      detector's count with background, is given): ValueError (:func:`check_labels`);
    * NaN boxes, x2 < x1 or y2 < y1, and boxes of zero width or height: ValueError
      (torchvision GeneralizedRCNN rejects non-positive boxes the same way: no anchor can
      match them);
    * with masks, a box with nothing inside its image (h_i, w_i): ValueError, as
      ``flexvision.data.coco.read_coco`` raises. A box partly outside is kept as given; the
      detector clips it to the image in training (:func:`prepare_targets`);
    * a non-empty box whose mask is empty is kept: its box and class train and its mask target
      is all zeros (torchvision's and detectron2's losses do not filter such instances);
    * masks of the wrong count or size: ValueError.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"got boxes for {len(boxes)} images but labels for {len(labels)}")
    b = len(boxes)
    out = {"boxes": np.zeros((b, capacity, 4), PADDED_DTYPES["boxes"]),
           "labels": np.zeros((b, capacity), PADDED_DTYPES["labels"]),
           "valid": np.zeros((b, capacity), PADDED_DTYPES["valid"])}
    if masks is not None:
        if mask_hw is None:
            raise ValueError("mask_hw (the padded image size) is needed to pad masks")
        out["masks"] = np.zeros((b, capacity, int(mask_hw[0]), int(mask_hw[1])),
                                PADDED_DTYPES["masks"])
    for i, (bx, lb) in enumerate(zip(boxes, labels)):
        bx = check_boxes(np.asarray(bx, np.float32).reshape(-1, 4), f"image {i} gt boxes")
        lb = np.asarray(lb).reshape(-1)
        n = bx.shape[0]
        if n > capacity:
            raise ValueError(f"image {i}: {capacity_error(capacity, capacity_key, n)}")
        if lb.shape[0] != n:
            raise ValueError(f"image {i}: {n} boxes but {lb.shape[0]} labels")
        check_labels(lb, num_classes, f"image {i}")
        flat = (bx[:, 2] <= bx[:, 0]) | (bx[:, 3] <= bx[:, 1])
        if flat.any():
            raise ValueError(f"image {i} gt boxes rows {np.flatnonzero(flat).tolist()} have zero "
                             f"width or height: {bx[flat].tolist()}; drop those objects, or give "
                             f"their masks' tight boxes (x2 = last column + 1)")
        out["boxes"][i, :n], out["labels"][i, :n], out["valid"][i, :n] = bx, lb, True
        if masks is not None:
            m = np.asarray(masks[i])
            if m.ndim != 3 or m.shape[0] != n or m.shape[1] > mask_hw[0] or m.shape[2] > mask_hw[1]:
                raise ValueError(f"image {i}: masks must be ({n}, h, w) with h, w <= {tuple(mask_hw)}"
                                 f", got {m.shape}")
            outside = ((bx[:, 0] >= m.shape[2]) | (bx[:, 1] >= m.shape[1]) | (bx[:, 2] <= 0)
                       | (bx[:, 3] <= 0))
            if outside.any():
                raise ValueError(f"image {i} gt boxes rows {np.flatnonzero(outside).tolist()} "
                                 f"have nothing inside the {m.shape[1]}x{m.shape[2]} image: "
                                 f"{bx[outside].tolist()}; drop those objects")
            out["masks"][i, :n, :m.shape[1], :m.shape[2]] = m
    return out


def check_labels(labels, num_classes: int | None, what: str = "ground truth") -> None:
    """Host-side check that every (valid) label is a foreground class 1..num_classes-1.

    ``num_classes`` counts the background (the detector's ``num_classes``); None checks only
    labels >= 1. Raises ValueError naming the labels, num_classes and the fixes: build the
    detector with more classes, or map/drop the category (a dataset's 0-based label l is the
    model's l + 1). Inside jit, where no error can be raised, such a label makes the RoI losses
    NaN (:class:`flexvision.detection.roi_heads.RoIHeads`).
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size and labels.min() < 1:
        raise ValueError(f"{what}: labels must be >= 1 (0 is background), got "
                         f"{sorted(set(labels.tolist()))}; a dataset's 0-based label l is l + 1")
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        bad = sorted(set(labels[labels >= num_classes].tolist()))
        raise ValueError(f"{what}: label(s) {bad} unknown to a detector with num_classes="
                         f"{num_classes} (background + classes 1..{num_classes - 1}); build it "
                         f"with num_classes >= {max(bad) + 1}, or map or drop that category")


def check_targets(targets: Mapping[str, np.ndarray], num_classes: int,
                  what: str = "targets") -> None:
    """:func:`check_labels` on a padded batch ({'labels' (B, K), 'valid' (B, K)}, e.g. from
    ``det_pad`` with labels shifted by 1, or :func:`pad_targets`) on the host, before jit."""
    labels, valid = np.asarray(targets["labels"]), np.asarray(targets["valid"], bool)
    check_labels(labels[valid], num_classes, what)


def prepare_targets(targets: Mapping[str, jax.Array], image_sizes: jax.Array
                    ) -> dict[str, jax.Array]:
    """In-graph ground-truth rules of the detector (jit-safe; applied by MaskRCNN in training).

    targets {'boxes' (B, G, 4), 'valid' (B, G), ...}, image_sizes (B, 2) each image's (h, w).
    Boxes are clipped to their own image; an object whose clipped box has zero width or height
    (wholly outside the image, or degenerate) or is not finite stops being valid, and its box
    becomes zeros. This is torchvision's references/detection/coco_utils.py
    ConvertCocoPolysToMask (clamp to the image, keep x2 > x1 and y2 > y1) and detectron2's
    transform_instance_annotations + filter_empty_instances (clip, drop empty boxes). It is
    needed for correctness, not only tidiness: the RPN's low-quality matching gives every
    anchor whose IoU equals a gt's best IoU to that gt, so a gt no anchor overlaps (best IoU 0)
    would turn every non-overlapping anchor into a positive. Other keys pass through; masks
    need no clipping (their targets are read inside the image, masks.mask_targets).
    """
    sizes = jnp.asarray(image_sizes, jnp.float32)[:, None, :]
    boxes = clip_boxes(jnp.asarray(targets["boxes"], jnp.float32), sizes)
    keep = (jnp.asarray(targets["valid"], bool) & finite_boxes(boxes)
            & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1]))
    return {**targets, "boxes": jnp.where(keep[..., None], boxes, 0.0), "valid": keep}


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
