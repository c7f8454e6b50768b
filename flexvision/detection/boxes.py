"""Box arithmetic and non-maximum suppression with static shapes.

Boxes are ``(..., 4)`` float arrays ``(x1, y1, x2, y2)`` in input pixels; widths are
``x2 - x1`` (no +1). Semantics follow torchvision: ``ops/boxes.py`` (box_iou, clip_boxes_to_image,
remove_small_boxes, batched_nms), ``models/detection/_utils.py`` (BoxCoder) and
``csrc/ops/cpu/nms_kernel.cpp`` (greedy NMS, suppression at IoU > t strictly).

Everything here has a static output shape: where torchvision returns a variable number of
indices, these functions return a fixed capacity and a boolean validity mask.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# torchvision's BoxCoder bbox_xform_clip: log(1000 / 16), applied to dw, dh before exp.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _check_last_dim(boxes, what: str) -> None:
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{what} must have shape (..., 4) holding (x1, y1, x2, y2), got shape "
                         f"{tuple(boxes.shape)}")


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    weights = tuple(float(w) for w in weights)
    if len(weights) != 4 or min(weights) <= 0:
        raise ValueError(f"box coder weights must be 4 positive numbers (wx, wy, ww, wh), e.g. "
                         f"(1, 1, 1, 1) for the RPN or (10, 10, 5, 5) for the RoI heads; got "
                         f"{weights}")
    return weights


def box_area(boxes: jax.Array) -> jax.Array:
    """``(x2 - x1) * (y2 - y1)`` of ``(..., 4)`` boxes -> ``(...)`` (torchvision.ops.box_area)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Pairwise IoU of ``boxes1`` (N, 4) and ``boxes2`` (M, 4) -> (N, M) float32.

    torchvision.ops.box_iou: inter / (area1 + area2 - inter), with the intersection's width and
    height clamped at 0. Two zero-area boxes give 0/0 = NaN, as in torchvision.
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    boxes1 = jnp.asarray(boxes1, jnp.float32)
    boxes2 = jnp.asarray(boxes2, jnp.float32)
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union


def encode_boxes(reference_boxes: jax.Array, proposals: jax.Array,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jax.Array:
    """Regression targets ``(dx, dy, dw, dh)`` taking ``proposals`` to ``reference_boxes``.

    Both ``(..., 4)``; torchvision BoxCoder.encode_single (Girshick et al. 2014, R-CNN eq. 6-9):
    ``dx = wx * (gx - px) / pw``, ``dw = ww * log(gw / pw)`` with centres ``x1 + 0.5 * w``.
    """
    _check_last_dim(reference_boxes, "reference_boxes")
    _check_last_dim(proposals, "proposals")
    wx, wy, ww, wh = _check_weights(weights)
    p = jnp.asarray(proposals, jnp.float32)
    g = jnp.asarray(reference_boxes, jnp.float32)
    pw, ph = p[..., 2] - p[..., 0], p[..., 3] - p[..., 1]
    px, py = p[..., 0] + 0.5 * pw, p[..., 1] + 0.5 * ph
    gw, gh = g[..., 2] - g[..., 0], g[..., 3] - g[..., 1]
    gx, gy = g[..., 0] + 0.5 * gw, g[..., 1] + 0.5 * gh
    return jnp.stack([wx * (gx - px) / pw, wy * (gy - py) / ph,
                      ww * jnp.log(gw / pw), wh * jnp.log(gh / ph)], axis=-1)


def decode_boxes(rel_codes: jax.Array, boxes: jax.Array,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 clip: float = BBOX_XFORM_CLIP) -> jax.Array:
    """Applies ``rel_codes`` (N, 4K) (class k in columns 4k..4k+3) to ``boxes`` (N, 4) -> (N, K, 4).

    torchvision BoxCoder.decode_single: deltas divided by the weights, dw and dh clamped to at
    most ``clip`` (log(1000/16)) before exp (no lower clamp); centre ``dx * w + cx``, size
    ``exp(dw) * w``, corners centre -/+ 0.5 * size.
    """
    _check_last_dim(boxes, "boxes")
    wx, wy, ww, wh = _check_weights(weights)
    rel_codes = jnp.asarray(rel_codes, jnp.float32)
    if rel_codes.ndim != 2 or rel_codes.shape[-1] % 4 or rel_codes.shape[0] != boxes.shape[0]:
        raise ValueError(f"rel_codes must be (N, 4 * K) for boxes (N, 4) = {tuple(boxes.shape)}; "
                         f"got {tuple(rel_codes.shape)}")
    boxes = jnp.asarray(boxes, jnp.float32)
    codes = rel_codes.reshape(rel_codes.shape[0], -1, 4)
    widths = (boxes[:, 2] - boxes[:, 0])[:, None]
    heights = (boxes[:, 3] - boxes[:, 1])[:, None]
    ctr_x = boxes[:, 0, None] + 0.5 * widths
    ctr_y = boxes[:, 1, None] + 0.5 * heights
    dx, dy = codes[..., 0] / wx, codes[..., 1] / wy
    dw = jnp.minimum(codes[..., 2] / ww, clip)
    dh = jnp.minimum(codes[..., 3] / wh, clip)
    pred_cx, pred_cy = dx * widths + ctr_x, dy * heights + ctr_y
    half_w, half_h = 0.5 * (jnp.exp(dw) * widths), 0.5 * (jnp.exp(dh) * heights)
    return jnp.stack([pred_cx - half_w, pred_cy - half_h, pred_cx + half_w, pred_cy + half_h],
                     axis=-1)


def clip_boxes(boxes: jax.Array, image_hw: jax.Array) -> jax.Array:
    """Clamps x to [0, w] and y to [0, h] (torchvision clip_boxes_to_image).

    ``image_hw`` is a (2,) array (h, w), traced or static, broadcast over ``boxes`` (..., 4).
    """
    image_hw = jnp.asarray(image_hw, jnp.float32)
    h, w = image_hw[..., 0, None], image_hw[..., 1, None]
    x = jnp.clip(boxes[..., 0::2], 0.0, w)
    y = jnp.clip(boxes[..., 1::2], 0.0, h)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def large_enough(boxes: jax.Array, min_size: float) -> jax.Array:
    """Mask of boxes with width and height >= ``min_size`` (torchvision remove_small_boxes)."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def finite_boxes(boxes: jax.Array) -> jax.Array:
    """Mask of boxes whose four coordinates are finite (NaN/inf boxes are treated as padding)."""
    return jnp.all(jnp.isfinite(boxes), axis=-1)


def check_boxes(boxes, what: str = "boxes") -> np.ndarray:
    """Host-side validation of concrete boxes (N, 4): finite and x2 >= x1, y2 >= y1.

    Returns them as float32 NumPy; raises ValueError naming the offending rows otherwise. Use it
    on ground truth before padding (``targets.pad_targets`` does); inside jit, where values are
    unknown, NaN boxes are treated as padding instead.
    """
    boxes = np.asarray(boxes, np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what} must have shape (N, 4) holding (x1, y1, x2, y2) in pixels, got "
                         f"shape {boxes.shape}")
    bad = ~np.all(np.isfinite(boxes), axis=1)
    if bad.any():
        raise ValueError(f"{what} rows {np.flatnonzero(bad).tolist()} are not finite: "
                         f"{boxes[bad].tolist()}; drop or fix those objects")
    flipped = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if flipped.any():
        raise ValueError(f"{what} rows {np.flatnonzero(flipped).tolist()} have x2 < x1 or y2 < y1: "
                         f"{boxes[flipped].tolist()}; boxes are (x1, y1, x2, y2) corners, not "
                         f"(x, y, w, h): convert them with x2 = x + w, y2 = y + h")
    return boxes


def _check_nms_args(boxes, scores, iou_threshold, max_output) -> None:
    _check_last_dim(boxes, "nms boxes")
    if boxes.ndim != 2 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms takes boxes (N, 4) and scores (N,); got {tuple(boxes.shape)} and "
                         f"{tuple(scores.shape)}")
    if not isinstance(max_output, (int, np.integer)) or max_output < 1:
        raise ValueError(f"max_output must be a positive Python int (the static number of output "
                         f"slots), got {max_output!r}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")


def _greedy_nms(boxes, scores, classes, valid, iou_threshold, max_output):
    """Greedy NMS over candidates sorted by descending score; see :func:`nms`."""
    boxes = jnp.asarray(boxes, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    n = boxes.shape[0]
    ok = finite_boxes(boxes) & ~jnp.isnan(scores)
    if valid is not None:
        ok = ok & valid
    order = jnp.argsort(jnp.where(ok, -scores, jnp.inf), stable=True)
    sb = boxes[order]
    available0 = ok[order]
    sb = jnp.where(available0[:, None], sb, 0.0)
    scls = None if classes is None else jnp.asarray(classes)[order]
    areas = box_area(sb)
    positions = jnp.arange(n)

    def step(i, state):
        available, out_idx, out_valid = state
        j = jnp.argmax(available)  # the highest-scoring candidate not yet taken or suppressed
        found = available[j]
        box = sb[j]
        w = jnp.maximum(jnp.minimum(box[2], sb[:, 2]) - jnp.maximum(box[0], sb[:, 0]), 0.0)
        h = jnp.maximum(jnp.minimum(box[3], sb[:, 3]) - jnp.maximum(box[1], sb[:, 1]), 0.0)
        inter = w * h
        suppress = inter / (areas[j] + areas - inter) > iou_threshold
        if scls is not None:
            suppress = suppress & (scls == scls[j])
        available = available & ~suppress & (positions != j)
        out_idx = out_idx.at[i].set(jnp.where(found, order[j], 0).astype(jnp.int32))
        out_valid = out_valid.at[i].set(found)
        return available, out_idx, out_valid

    init = (available0, jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool))
    _, idx, keep = jax.lax.fori_loop(0, max_output, step, init)
    return idx, keep


def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float, max_output: int,
        valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Greedy non-maximum suppression with a static output size.

    boxes (N, 4), scores (N,), optional ``valid`` (N,) bool marking padding (False entries are
    never selected; neither are boxes with NaN coordinates or NaN scores). Returns
    ``(indices (max_output,) int32, valid (max_output,) bool)``: kept indices in decreasing score
    order (ties: lower index first), then padding slots (index 0, valid False).

    Semantics of torchvision ``nms_kernel.cpp``: candidates visited by descending score; a box
    is dropped when its IoU with an already kept box is > ``iou_threshold`` (strict), with areas
    ``(x2-x1)*(y2-y1)`` and no +1. Cost: ``max_output`` sequential steps of O(N) work (one IoU
    row each) plus one sort; memory O(N), no N x N matrix.
    """
    _check_nms_args(boxes, scores, iou_threshold, max_output)
    return _greedy_nms(boxes, scores, None, valid, float(iou_threshold), int(max_output))


def batched_nms(boxes: jax.Array, scores: jax.Array, classes: jax.Array, iou_threshold: float,
                max_output: int, valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """NMS within each class only (torchvision.ops.batched_nms), static output as :func:`nms`.

    classes (N,) int. A box only suppresses boxes of its own class: the IoU row is masked by
    class equality, which is exactly torchvision's per-class ('vanilla') result; its
    coordinate-offset trick is not needed. Output sorted by decreasing score over all classes.
    """
    _check_nms_args(boxes, scores, iou_threshold, max_output)
    if classes.shape != scores.shape:
        raise ValueError(f"classes must have the shape of scores {tuple(scores.shape)}, got "
                         f"{tuple(classes.shape)}")
    return _greedy_nms(boxes, scores, classes, valid, float(iou_threshold), int(max_output))
