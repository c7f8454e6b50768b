"""Anchors of a feature pyramid (torchvision models/detection/anchor_utils.py, AnchorGenerator).

Anchors depend only on static shapes (the padded batch size and the feature map sizes), so they
are built once per shape with NumPy at trace time and cached; the graph sees a constant.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np


def _as_nested(values, what: str) -> tuple[tuple[float, ...], ...]:
    try:
        nested = tuple(tuple(float(v) for v in level) for level in values)
    except TypeError as err:
        raise ValueError(f"{what} must be one sequence per level, e.g. ((32,), (64,)) ; got "
                         f"{values!r}") from err
    if not nested or any(not level for level in nested):
        raise ValueError(f"{what} must hold at least one value per level, got {values!r}")
    return nested


@functools.lru_cache(maxsize=None)
def cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> np.ndarray:
    """Zero-centred anchors (len(ratios) * len(sizes), 4) float32 of one level.

    torchvision AnchorGenerator.generate_anchors, in float32: for ratio r = h / w,
    h_ratio = sqrt(r), w_ratio = 1 / h_ratio, ws = w_ratio * size, hs = h_ratio * size,
    anchor = round([-ws, -hs, ws, hs] / 2) (half to even); ratio-major, size-minor. Read-only.
    """
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1.0) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)).astype(np.float32)
    base.setflags(write=False)
    return base


def anchor_strides(image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]]
                   ) -> np.ndarray:
    """(L, 2) int64 strides ``image_size // feature_size`` per level (integer division of the
    padded batch size, as torchvision: a 200-high batch with a 13-row map has stride 15)."""
    return np.array([[int(image_size[0]) // int(h), int(image_size[1]) // int(w)]
                     for h, w in feature_sizes], np.int64)


@functools.lru_cache(maxsize=None)
def _anchor_grid(image_size, feature_sizes, sizes, aspect_ratios) -> np.ndarray:
    strides = anchor_strides(image_size, feature_sizes)
    levels = []
    for (gh, gw), (sh, sw), size, ratios in zip(feature_sizes, strides, sizes, aspect_ratios):
        base = cell_anchors(size, ratios)
        shift_y, shift_x = np.meshgrid(np.arange(gh, dtype=np.int64) * sh,
                                       np.arange(gw, dtype=np.int64) * sw, indexing="ij")
        sx, sy = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = np.stack([sx, sy, sx, sy], axis=1).astype(np.float32)
        levels.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
    out = np.concatenate(levels, axis=0).astype(np.float32)
    out.setflags(write=False)
    return out


def anchor_grid(image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]],
                sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]]
                ) -> np.ndarray:
    """All anchors of a pyramid: (sum_L h_L * w_L * A_L, 4) float32 NumPy, read-only, cached.

    image_size: the padded batch (H, W); feature_sizes: each level's (h, w), finest first;
    sizes / aspect_ratios: one tuple per level (torchvision's AnchorGenerator arguments).
    Order: level-major, then row y, column x, then the level's cell anchors, which is the order
    of an NHWC reshape (B, h * w * A) of the RPN head's outputs. Shifts are
    ``arange(grid) * stride`` (no half-pixel offset), strides from :func:`anchor_strides`.
    Raises ValueError when the number of maps and of size tuples differ.
    """
    feature_sizes = tuple((int(h), int(w)) for h, w in feature_sizes)
    sizes = _as_nested(sizes, "anchor sizes")
    aspect_ratios = _as_nested(aspect_ratios, "aspect_ratios")
    if len(aspect_ratios) == 1 and len(sizes) > 1:
        aspect_ratios = aspect_ratios * len(sizes)
    if len(feature_sizes) != len(sizes) or len(aspect_ratios) != len(sizes):
        raise ValueError(f"got {len(feature_sizes)} feature maps {list(feature_sizes)} but "
                         f"{len(sizes)} anchor size tuples {sizes} and {len(aspect_ratios)} "
                         f"aspect-ratio tuples: AnchorGenerator needs one of each per map (check "
                         f"the backbone's feature levels against the anchor sizes)")
    image_size = (int(image_size[0]), int(image_size[1]))
    too_big = [(h, w) for h, w in feature_sizes if h > image_size[0] or w > image_size[1]]
    if too_big:
        raise ValueError(f"feature maps {too_big} are larger than the image {image_size}: maps "
                         f"must be NHWC (B, H, W, C) of a downsampled image")
    return _anchor_grid(image_size, feature_sizes, sizes, aspect_ratios)


def num_anchors_per_location(sizes, aspect_ratios) -> list[int]:
    """Cell anchors per position of each level (len(sizes_L) * len(ratios_L))."""
    sizes = _as_nested(sizes, "anchor sizes")
    aspect_ratios = _as_nested(aspect_ratios, "aspect_ratios")
    if len(aspect_ratios) == 1:
        aspect_ratios = aspect_ratios * len(sizes)
    return [len(s) * len(r) for s, r in zip(sizes, aspect_ratios)]
