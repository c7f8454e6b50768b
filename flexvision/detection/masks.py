"""Instance masks: pasting M x M mask probabilities into the image, and Mask R-CNN mask targets.

``paste_masks`` follows torchvision models/detection/roi_heads.py (paste_masks_in_image,
expand_masks, expand_boxes, paste_mask_in_image); ``mask_targets`` follows its
project_masks_on_boxes (RoIAlign of the ground-truth masks onto the proposals).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from flexvision.detection.roi_align import roi_align_rows
from flexvision.layers.flex import to_pair


def _resize_rows(out_len, positions, in_len: int):
    """Bilinear weights (..., P, in_len) of torch ``interpolate(align_corners=False)`` from
    ``in_len`` samples to ``out_len`` (per mask, traced) at output positions ``positions``
    (..., P); positions outside [0, out_len) get all-zero rows."""
    out_len_f = out_len.astype(jnp.float32)[..., None]
    scale = jnp.float32(in_len) / out_len_f
    src = jnp.maximum((positions.astype(jnp.float32) + 0.5) * scale - 0.5, 0.0)
    low = jnp.floor(src).astype(jnp.int32)
    low = jnp.minimum(low, in_len - 1)
    high = jnp.minimum(low + 1, in_len - 1)
    frac = src - low.astype(jnp.float32)
    taps = jnp.arange(in_len)
    w = ((taps == low[..., None]) * (1.0 - frac)[..., None]
         + (taps == high[..., None]) * frac[..., None])
    inside = (positions >= 0) & (positions < out_len[..., None])
    return jnp.where(inside[..., None], w, 0.0)


def expanded_boxes_int(boxes: jax.Array, mask_size: int, padding: int = 1) -> jax.Array:
    """Boxes grown about their centre by (M + 2 * padding) / M, truncated to int32 (toward 0):
    the pixel boxes that paste_masks_in_image pastes the padded masks into (K, 4)."""
    scale = jnp.float32((mask_size + 2 * padding) / mask_size)
    boxes = jnp.asarray(boxes, jnp.float32)
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    expanded = jnp.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)
    expanded = jnp.where(jnp.isfinite(expanded), expanded, 0.0)
    return jnp.trunc(expanded).astype(jnp.int32)


def paste_masks(masks: jax.Array, boxes: jax.Array, image_size: Sequence[int],
                padding: int = 1) -> jax.Array:
    """Pastes masks (K, M, M) into images of ``image_size`` (H, W) at boxes (K, 4) -> (K, H, W).

    torchvision paste_masks_in_image: masks zero-padded by ``padding``, boxes expanded to match
    and truncated to ints (:func:`expanded_boxes_int`); each padded mask is resized to the box's
    (h, w) = (max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1)) by bilinear interpolation
    (align_corners=False, no antialias) and written at rows y1..y2, columns x1..x2 inside the
    image, zeros elsewhere. Static shapes: the resize and the paste are one separable map per
    mask, ``out = Ry @ mask @ Rx^T`` with Ry (H, M+2) and Rx (W, M+2) built from the box, so
    the cost is K * H * (M+2) * (M+2 + W) multiply-adds. ``image_size`` is static.
    """
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
        raise ValueError(f"masks must be (K, M, M) probabilities, got shape {tuple(masks.shape)}; "
                         f"select each detection's class channel first")
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"boxes must be (K, 4) = {(masks.shape[0], 4)}, got {tuple(boxes.shape)}")
    h_img, w_img = to_pair(tuple(image_size), "image_size")
    m = masks.shape[1]
    padded = jnp.pad(jnp.asarray(masks, jnp.float32), ((0, 0), (padding, padding),
                                                       (padding, padding)))
    ib = expanded_boxes_int(boxes, m, padding)
    w = jnp.maximum(ib[:, 2] - ib[:, 0] + 1, 1)
    h = jnp.maximum(ib[:, 3] - ib[:, 1] + 1, 1)
    ys = jnp.arange(h_img)[None, :]
    xs = jnp.arange(w_img)[None, :]
    ry = _resize_rows(h, ys - ib[:, 1:2], m + 2 * padding)  # (K, H, M+2)
    rx = _resize_rows(w, xs - ib[:, 0:1], m + 2 * padding)  # (K, W, M+2)
    # Rows outside max(y1, 0):min(y2 + 1, H): already zero (position outside [0, h)).
    return jnp.einsum("kya,kab,kxb->kyx", ry, padded, rx, precision=jax.lax.Precision.HIGHEST)


def mask_targets(gt_masks: jax.Array, boxes: jax.Array, matched_idxs: jax.Array,
                 mask_size: int | Sequence[int], image_hw: jax.Array | None = None,
                 max_grid=None) -> jax.Array:
    """Mask R-CNN targets: gt_masks (G, H, W) (0/1, any dtype) RoIAligned onto boxes (P, 4).

    Box p reads ground-truth mask ``matched_idxs[p]``; torchvision project_masks_on_boxes:
    ``roi_align(gt_masks[:, None], boxes, mask_size, spatial_scale=1, sampling_ratio=0,
    aligned=False)`` -> (P, M, M) float32 (not binarised). ``image_hw`` (2,) (traced) is the
    image's own size when the masks are padded to a larger (H, W): the kernel's border rules
    then apply at the image's edge, as for the unpadded masks torchvision sees. Adaptive
    sampling under a static cap per axis (``max_grid``; default ceil(H / M), ceil(W / M), exact
    for boxes inside the masks, e.g. clipped proposals and ground truth).
    """
    if gt_masks.ndim != 3:
        raise ValueError(f"gt_masks must be (G, H, W), got shape {tuple(gt_masks.shape)}")
    g, h, w = gt_masks.shape
    size = to_pair(mask_size, "mask_size")
    boxes = jnp.asarray(boxes, jnp.float32)
    k = boxes.shape[0]
    cap = (to_pair(max_grid, "max_grid") if max_grid is not None else
           (max(1, -(-h // size[0])), max(1, -(-w // size[1]))))
    if image_hw is None:
        extent_h, extent_w = jnp.full((k,), h, jnp.int32), jnp.full((k,), w, jnp.int32)
    else:
        image_hw = jnp.asarray(image_hw, jnp.int32)
        extent_h = jnp.full((k,), jnp.clip(image_hw[0], 1, h), jnp.int32)
        extent_w = jnp.full((k,), jnp.clip(image_hw[1], 1, w), jnp.int32)
    index = jnp.clip(jnp.asarray(matched_idxs, jnp.int32), 0, g - 1)
    table = jnp.asarray(gt_masks, jnp.float32).reshape(g * h * w, 1)
    out = roi_align_rows(table, index * (h * w), extent_h, extent_w, jnp.float32(1.0), boxes, size,
                     0, False, cap, pitch=jnp.full((k,), w, jnp.int32))
    return out[..., 0]
