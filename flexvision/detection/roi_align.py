"""RoIAlign (He et al. 2017, Mask R-CNN, sec. 3) and its multi-scale pooler, NHWC, static shapes.

Semantics are those of torchvision's CPU kernel ``csrc/ops/cpu/roi_align_kernel.cpp`` and of
``ops/poolers.py`` (MultiScaleRoIAlign, LevelMapper = FPN eq. 1 of Lin et al. 2017).

Design. Each output bin averages a ``gh x gw`` grid of bilinear samples. For one sample
position ``(iy, ix)`` of a bin, every roi and bin needs two row taps and two column taps with
their weights (separable bilinear weights); the four corner values are rows of the feature map
flattened to ``(B*H*W, C)`` (gathers of contiguous C-vectors), multiplied by their weights and
accumulated. The loop runs over the static sample positions of a bin (``gh * gw`` of them: 4 for
``sampling_ratio=2``; unrolled up to 16, a ``fori_loop`` beyond), never over rois or bins, and
the gathers fuse into the weighted sum, so no (K, PH, PW, 4, C) intermediate is materialised.

Cost per call: K*PH*PW*gh*gw*4 gathered C-vectors (bytes read: that x C x itemsize, plus the
output written once) and 2 FLOPs per gathered element (one multiply-add), the same arithmetic as
torchvision's CPU kernel. Example: K=1000 rois, 7x7, gh=gw=2, C=256: 2.0e8 gathered floats
(0.8 GB read), 0.4 GFLOP.

``sampling_ratio <= 0`` (adaptive, ``ceil(roi_size / output_size)`` samples per axis and roi)
runs with a static cap ``max_grid`` per axis: samples beyond a roi's own count are masked out
(weight 0) and the average still divides by that roi's count, so the result is exact whenever
every roi's adaptive grid is <= the cap. The default cap is ``ceil(extent / output)`` with the
feature extent (H or W) of the map: exact for every roi no larger than the map, e.g. boxes
clipped to the (padded) image. For concrete (non-traced) boxes the default is instead the exact
maximum over the given rois (:func:`adaptive_grid`). The cost is then that of
``sampling_ratio = max_grid``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexvision.layers.flex import to_pair


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _roi_geometry(boxes, scale, output_size, aligned):
    """(start_y, start_x, roi_h, roi_w) in feature coordinates, kernel rules."""
    offset = 0.5 if aligned else 0.0
    x1 = boxes[:, 0] * scale - offset
    y1 = boxes[:, 1] * scale - offset
    x2 = boxes[:, 2] * scale - offset
    y2 = boxes[:, 3] * scale - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    return y1, x1, roi_h, roi_w


def adaptive_grid(boxes, output_size, spatial_scale, aligned) -> tuple[int, int]:
    """The largest adaptive sampling grid ``(gh, gw)`` over concrete rois (K, 4) (NumPy).

    The exact ``max_grid`` for :func:`roi_align` with ``sampling_ratio=0`` on these boxes.
    """
    ph, pw = to_pair(output_size, "output_size")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return 1, 1
    scale = np.asarray(spatial_scale, np.float32)
    y1, x1, roi_h, roi_w = (np.asarray(a) for a in _roi_geometry(boxes, scale, (ph, pw), aligned))
    finite = np.isfinite(roi_h) & np.isfinite(roi_w)
    gh = np.ceil(roi_h[finite] / np.float32(ph)) if finite.any() else np.ones(1)
    gw = np.ceil(roi_w[finite] / np.float32(pw)) if finite.any() else np.ones(1)
    return max(int(gh.max(initial=1)), 1), max(int(gw.max(initial=1)), 1)


def _axis_taps(start, bin_size, grid, sample, pooled: int, size):
    """Row (or column) taps of sample ``sample`` of every bin: kernel's bilinear_interpolate.

    start, bin_size, grid: (K,); size: (K,) map extent. Returns low, high (K, P) int32 and
    their weights (K, P) float32, zero for samples outside [-1, size] or beyond ``grid``.
    """
    p = jnp.arange(pooled, dtype=jnp.float32)
    gridf = grid.astype(jnp.float32)
    pos = (start[:, None] + p[None, :] * bin_size[:, None]
           + (sample + 0.5) * bin_size[:, None] / gridf[:, None])
    sizef = size.astype(jnp.float32)[:, None]
    inside = (pos >= -1.0) & (pos <= sizef) & (sample < grid)[:, None]
    pos = jnp.maximum(pos, 0.0)
    low = jnp.floor(pos).astype(jnp.int32)
    last = size[:, None] - 1
    at_end = low >= last
    low = jnp.where(at_end, last, low)
    high = jnp.where(at_end, last, low + 1)
    pos = jnp.where(at_end, low.astype(jnp.float32), pos)
    frac = pos - low.astype(jnp.float32)
    w_low = jnp.where(inside, 1.0 - frac, 0.0)
    w_high = jnp.where(inside, frac, 0.0)
    # Non-finite boxes: taps pointing anywhere are harmless once their weights are zero.
    low = jnp.clip(low, 0, jnp.maximum(last, 0))
    high = jnp.clip(high, 0, jnp.maximum(last, 0))
    return low, high, w_low, w_high


def roi_align_rows(table, row_base, height, width, scale, boxes, output_size, sampling_ratio,
               aligned, max_grid, pitch=None):
    """RoIAlign over maps stored as rows of ``table`` (N, C).

    Roi k reads the map of extent ``height[k] x width[k]`` whose pixel (y, x) is row
    ``row_base[k] + y * pitch[k] + x`` (pitch defaults to width: a padded map read only up to
    an image's own extent has pitch > width); its boxes are scaled by ``scale[k]``. All per-roi
    arrays (K,). Returns (K, PH, PW, C).
    """
    pitch = width if pitch is None else pitch
    ph, pw = output_size
    boxes = jnp.asarray(boxes, jnp.float32)
    finite = jnp.all(jnp.isfinite(boxes), axis=-1)
    boxes = jnp.where(finite[:, None], boxes, 0.0)
    y1, x1, roi_h, roi_w = _roi_geometry(boxes, scale, output_size, aligned)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    if sampling_ratio > 0:
        gh = gw = jnp.full(boxes.shape[:1], sampling_ratio, jnp.int32)
        cap_h = cap_w = int(sampling_ratio)
    else:
        gh = jnp.ceil(roi_h / ph).astype(jnp.int32)
        gw = jnp.ceil(roi_w / pw).astype(jnp.int32)
        cap_h, cap_w = max_grid
    count = jnp.maximum(gh * gw, 1).astype(jnp.float32)
    k = boxes.shape[0]
    c = table.shape[-1]

    def sample_sum(iy, ix):
        ylo, yhi, wylo, wyhi = _axis_taps(y1, bin_h, gh, iy, ph, height)
        xlo, xhi, wxlo, wxhi = _axis_taps(x1, bin_w, gw, ix, pw, width)
        total = 0.0
        for rows, wy in ((ylo, wylo), (yhi, wyhi)):
            base = (row_base[:, None] + rows * pitch[:, None])[:, :, None]  # (K, PH, 1)
            for cols, wx in ((xlo, wxlo), (xhi, wxhi)):
                idx = base + cols[:, None, :]  # (K, PH, PW)
                weight = wy[:, :, None] * wx[:, None, :]
                # Each corner is one row-gather fused into the weighted sum: no (K, ..., 4, C)
                # intermediate is materialised.
                total = total + weight[..., None] * jnp.take(table, idx, axis=0).astype(
                    jnp.float32)
        return total
    steps = cap_h * cap_w
    if steps <= 16:
        total = sum(sample_sum(jnp.int32(iy), jnp.int32(ix))
                    for iy in range(cap_h) for ix in range(cap_w))
    else:
        def body(s, acc):
            return acc + sample_sum(s // cap_w, s % cap_w)
        total = jax.lax.fori_loop(0, steps, body, jnp.zeros((k, ph, pw, c), jnp.float32))
    out = total / count[:, None, None, None]
    return jnp.where(finite[:, None, None, None], out, 0.0)


def _check_features(features, what: str = "features") -> None:
    if features.ndim != 4:
        raise ValueError(f"{what} must be NHWC (B, H, W, C), got shape {tuple(features.shape)}")


def _check_rois(boxes, box_image_index) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (K, 4) = (x1, y1, x2, y2) in image pixels, got shape "
                         f"{tuple(boxes.shape)}")
    if box_image_index.shape != boxes.shape[:1]:
        raise ValueError(f"box_image_index must be (K,) = {boxes.shape[:1]} (the batch row of "
                         f"each box), got shape {tuple(box_image_index.shape)}")


def _resolve_cap(max_grid, boxes, output_size, scales_hw, aligned, extents) -> tuple[int, int]:
    if max_grid is not None:
        return to_pair(max_grid, "max_grid")
    ph, pw = output_size
    if _is_concrete(boxes) and all(_is_concrete(s) for s in scales_hw):
        caps = [adaptive_grid(np.asarray(boxes), output_size, s, aligned) for s in scales_hw]
        return max(c[0] for c in caps), max(c[1] for c in caps)
    return (max(math.ceil(h / ph) for h, _ in extents) or 1,
            max(math.ceil(w / pw) for _, w in extents) or 1)


def roi_align(features: jax.Array, boxes: jax.Array, box_image_index: jax.Array,
              output_size: int | Sequence[int], spatial_scale: float, sampling_ratio: int,
              aligned: bool, max_grid: int | Sequence[int] | None = None) -> jax.Array:
    """RoIAlign of ``features`` (B, H, W, C) at ``boxes`` (K, 4) -> (K, PH, PW, C) float32.

    boxes are (x1, y1, x2, y2) in image coordinates, multiplied by ``spatial_scale`` to reach
    the map; ``box_image_index`` (K,) int gives each box's batch row. torchvision
    ``roi_align(..., aligned)`` CPU-kernel rules: with ``aligned`` the box is shifted by -0.5
    pixel, without it roi sizes are clamped to >= 1; a sample outside [-1, H] x [-1, W]
    contributes 0 but still counts in the average; samples in [-1, 0] read row/column 0.
    ``sampling_ratio > 0`` samples that many points per bin axis; ``<= 0`` is adaptive
    (ceil(roi / output) per roi) under the static cap ``max_grid`` (module docstring).
    Boxes with non-finite coordinates give zeros.

    Cost: K*PH*PW*gh*gw*4 gathered C-vectors, 2 FLOPs per gathered element, bytes read
    4 * that * itemsize (gh = gw = sampling_ratio, or the cap when adaptive); no intermediate
    larger than the output.
    """
    _check_features(features)
    boxes = jnp.asarray(boxes)
    box_image_index = jnp.asarray(box_image_index)
    _check_rois(boxes, box_image_index)
    output_size = to_pair(output_size, "output_size")
    b, h, w, c = features.shape
    cap = ((int(sampling_ratio),) * 2 if sampling_ratio > 0 else
           _resolve_cap(max_grid, boxes, output_size, (spatial_scale,), aligned, ((h, w),)))
    k = boxes.shape[0]
    index = jnp.clip(box_image_index.astype(jnp.int32), 0, b - 1)
    return roi_align_rows(features.reshape(b * h * w, c), index * (h * w),
                      jnp.full((k,), h, jnp.int32), jnp.full((k,), w, jnp.int32),
                      jnp.float32(spatial_scale), boxes, output_size, int(sampling_ratio),
                      bool(aligned), cap)


# ------------------------------------------------------------------------------------------------
# Multi-scale pooling (torchvision ops/poolers.py).

@functools.lru_cache(maxsize=None)
def infer_scales(feature_hw: tuple[tuple[int, int], ...], image_hw: tuple[int, int]
                 ) -> tuple[float, ...]:
    """Per-level scale ``2 ** round(log2(feature_h / image_h))`` (MultiScaleRoIAlign._infer_scale).

    torchvision uses the largest image height of the batch; with static shapes pass the size
    that plays that role (the largest image, or the padded size: the two agree whenever the
    largest image is within a factor sqrt(2) of the padded height, i.e. always for FPN batches).
    """
    return tuple(float(2.0 ** round(math.log2(fh / image_hw[0]))) for fh, _ in feature_hw)


@functools.lru_cache(maxsize=None)
def _level_area_thresholds(k_min: int, k_max: int, canonical_scale: float, canonical_level: int,
                           eps: float) -> np.ndarray:
    """Areas at which LevelMapper's level steps up: level >= k iff area >= T_k (float64)."""
    ks = np.arange(k_min + 1, k_max + 1, dtype=np.float64)
    thresholds = (canonical_scale * 2.0 ** (ks - canonical_level - eps)) ** 2
    thresholds.setflags(write=False)
    return thresholds


def level_for_boxes(boxes: jax.Array, k_min: int, k_max: int, canonical_scale: float = 224.0,
                    canonical_level: int = 4, eps: float = 1e-6) -> jax.Array:
    """FPN level index (0 = level ``k_min``) of each box (K, 4) -> (K,) int32.

    torchvision LevelMapper (Lin et al. 2017, eq. 1): ``clamp(floor(canonical_level +
    log2(sqrt(area) / canonical_scale) + eps), k_min, k_max) - k_min``. Computed without a
    float32 log2 (whose last-ulp differences would move boxes at the edges): the level steps up
    where ``area >= (canonical_scale * 2 ** (k - canonical_level - eps)) ** 2``, thresholds
    exact in float64 at trace time and compared with the float32 area. Boxes with NaN or
    negative area go to level 0.
    """
    thresholds = _level_area_thresholds(int(k_min), int(k_max), float(canonical_scale),
                                        int(canonical_level), float(eps))
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).astype(jnp.float32)
    steps = area[..., None] >= jnp.asarray(thresholds.astype(np.float32))
    return jnp.sum(steps, axis=-1).astype(jnp.int32)


def check_pyramid(features: Sequence[jax.Array], what: str = "features") -> int:
    """Checks a list of NHWC maps of one batch; returns the channel count."""
    if not features:
        raise ValueError(f"{what}: no feature maps given")
    for i, f in enumerate(features):
        if f.ndim != 4:
            raise ValueError(f"{what}[{i}] must be NHWC (B, H, W, C), got shape {tuple(f.shape)}")
    channels = [f.shape[-1] for f in features]
    batches = [f.shape[0] for f in features]
    if len(set(channels)) != 1:
        raise ValueError(f"{what}: the last (channel) dims differ across levels: {channels}; maps "
                         f"must be NHWC (B, H, W, C) with one channel count (NCHW maps from torch "
                         f"need .transpose(0, 2, 3, 1))")
    if len(set(batches)) != 1:
        raise ValueError(f"{what}: batch sizes differ across levels: {batches}")
    return channels[0]


class FlatPyramid(NamedTuple):
    """NHWC pyramid levels stored as one table of rows, for :func:`multiscale_roi_align`.

    table (sum_L B*h_L*w_L, C) float32, level L's pixel (b, y, x) at row
    ``bases[L] + (b * h_L + y) * w_L + x``; ``sizes`` the static (h_L, w_L); ``batch`` B.
    """

    table: jax.Array
    bases: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]
    batch: int


def flatten_pyramid(features: Sequence[jax.Array]) -> FlatPyramid:
    """Concatenates NHWC levels (one batch, one channel count) into a :class:`FlatPyramid`.

    This is one copy of the pyramid; build it once when several poolers read the same levels
    (the box and the mask branch of Mask R-CNN).
    """
    channels = check_pyramid(features)
    b = features[0].shape[0]
    sizes = tuple((int(f.shape[1]), int(f.shape[2])) for f in features)
    bases = tuple(int(x) for x in np.cumsum([0] + [b * h * w for h, w in sizes[:-1]]))
    table = jnp.concatenate([f.reshape(-1, channels).astype(jnp.float32) for f in features])
    return FlatPyramid(table, bases, sizes, b)


def multiscale_roi_align(features: Sequence[jax.Array] | FlatPyramid, boxes: jax.Array,
                         box_image_index: jax.Array, output_size: int | Sequence[int],
                         sampling_ratio: int, scales: Sequence[float],
                         canonical_scale: float = 224.0, canonical_level: int = 4,
                         eps: float = 1e-6, max_grid=None) -> tuple[jax.Array, jax.Array]:
    """MultiScaleRoIAlign: each box pooled from its LevelMapper level -> ((K, PH, PW, C), levels).

    ``features``: NHWC maps of the pooled levels, finest first (only the levels torchvision's
    ``featmap_names`` selects; the caller drops e.g. 'pool'), or their :func:`flatten_pyramid`.
    ``scales``: each level's spatial scale (static; :func:`infer_scales`); k_min/k_max are
    ``-log2`` of the first/last. RoIAlign with ``aligned=False`` (torchvision's pooler). All
    levels are one flat table of rows, so every box is sampled once at its own level: the cost
    of one :func:`roi_align` call (plus one copy of the pyramid when given a list), not one per
    level. Returns the pooled features and each box's level index (K,) int32.
    """
    pyramid = features if isinstance(features, FlatPyramid) else flatten_pyramid(features)
    boxes = jnp.asarray(boxes)
    box_image_index = jnp.asarray(box_image_index)
    _check_rois(boxes, box_image_index)
    if len(scales) != len(pyramid.sizes):
        raise ValueError(f"got {len(pyramid.sizes)} feature maps but {len(scales)} scales; pass "
                         f"one scale per pooled level")
    output_size = to_pair(output_size, "output_size")
    k_min = int(round(-math.log2(scales[0])))
    k_max = int(round(-math.log2(scales[-1])))
    if k_max - k_min + 1 != len(pyramid.sizes):
        raise ValueError(f"scales {list(scales)} span levels {k_min}..{k_max} but "
                         f"{len(pyramid.sizes)} maps were given; MultiScaleRoIAlign needs one map "
                         f"per level between the first and the last scale")
    levels = level_for_boxes(boxes, k_min, k_max, canonical_scale, canonical_level, eps)
    sizes = pyramid.sizes
    index = jnp.clip(box_image_index.astype(jnp.int32), 0, pyramid.batch - 1)
    lv_h = jnp.asarray(np.array([h for h, _ in sizes], np.int32))[levels]
    lv_w = jnp.asarray(np.array([w for _, w in sizes], np.int32))[levels]
    lv_scale = jnp.asarray(np.array(scales, np.float32))[levels]
    lv_base = jnp.asarray(np.array(pyramid.bases, np.int32))[levels]
    if sampling_ratio > 0:
        cap = (int(sampling_ratio),) * 2
    elif max_grid is not None:
        cap = to_pair(max_grid, "max_grid")
    else:
        cap = (max(math.ceil(h / output_size[0]) for h, _ in sizes),
               max(math.ceil(w / output_size[1]) for _, w in sizes))
    pooled = roi_align_rows(pyramid.table, lv_base + index * lv_h * lv_w, lv_h, lv_w, lv_scale,
                            boxes, output_size, int(sampling_ratio), False, cap)
    return pooled, levels
