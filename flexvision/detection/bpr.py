"""BPR: boundary patch refinement of instance masks (host-side geometry).

The evaluation metric for refined boundaries, Boundary IoU, is in ``detection/boundary.py``; the
training data of the refinement network in ``detection/bpr_data.py`` (its recipe:
configs/bpr_hrnet18s_nuclei.py, trained by ``python -m flexvision.train``).

Tang et al., "Look Closer to Segment Better: Boundary Patch Refinement for Instance
Segmentation", CVPR 2021 (code: tinyalpha/BPR). A coarse instance mask is refined in three steps:

1. :func:`boundary_patch_boxes` — ``tools/split_patches.py`` ``get_dets``: every pixel of the
   mask's 3x3 "float boundary" band (:func:`float_boundary`) proposes a square patch centred on
   it, scored by the band value; greedy NMS (:func:`nms_equal_squares`) keeps a sparse set; patches
   leaving the image are moved back inside (:func:`move_back`).
2. :func:`crop_patches` cuts the image and coarse-mask patches of those boxes (one fixed-size
   batch for the refinement network; the network side lives in ``flexvision.models.hrnet``,
   registered as ``bpr_hrnet18s`` / ``bpr_hrnet48``).
3. :func:`merge_patches` — ``tools/merge_patches.py``: the refined patch probabilities are summed
   and counted per pixel, and where any patch covers a pixel the mask becomes ``mean > 0.5``;
   elsewhere the coarse mask is kept.

The geometry is NumPy on the host: the number of boundary pixels and of kept patches depends
on the data, and the work is small (cost grows with the boundary length, not the image area: each
instance is handled inside its bounding box). No step loops over pixels in Python; NMS loops over
*kept* patches only. :func:`boundary_patches` does step 1 for all instances of an image.

:func:`refine` runs the three steps end to end, with the network on fixed-size batches of patches
(:func:`patch_probabilities`, jitted once per batch and patch size: BPR's test pipeline
``tools/test_float.py``: patches resized to the network size, normalised, logits resized back to
the patch size before the softmax)::

    model, variables = flexvision.convert.from_official("bpr_hrnet18s", bpr_state_dict)
    refined = bpr.refine(image_rgb, coarse_masks, variables, model=model)   # (N, H, W) uint8

Conventions: masks are (H, W) arrays, nonzero = foreground (bool or integer dtypes; float masks
are rejected: threshold probabilities first). Boxes are float32 rows ``[x1, y1, x2, y2, score]``
in pixels, x1/y1 inclusive, x2/y2 exclusive (the patch is ``mask[y1:y2, x1:x2]``).

Bad input, defined:
* empty mask: no boundary, no boxes (shape (0, 5)); merging leaves the mask as it is.
* mask touching the image border: the box filter pads with zeros, so foreground pixels on the
  border are boundary pixels (as in BPR); their patches are moved back inside the image.
* image not larger than the patch (H <= P or W <= P): BPR silently skips such instances
  (``run_inst``: ``if h <= patch_size or w <= patch_size: return``); flexvision raises a
  ValueError naming the sizes, since move-back would produce boxes with negative coordinates.
* masks of another size than the image: ValueError.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexvision.layers.flex import resize_bilinear, resize_nearest

BOUNDARY_WIDTH = 3  # find_float_boundary(maskdt, width=3) in split_patches.py
# configs/bpr/*.py img_norm_cfg (RGB, 0-255 pixel values)
IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)


# ------------------------------------------------------------------------------------------------
# Input checks


def _as_binary_masks(masks: np.ndarray, ndim: int, what: str = "mask") -> np.ndarray:
    """``masks`` as a bool array of ``ndim`` dimensions; ValueError for other shapes or dtypes."""
    masks = np.asarray(masks)
    if masks.ndim != ndim:
        layout = "(height, width)" if ndim == 2 else "(instances, height, width)"
        raise ValueError(f"{what} must be a {layout} array, got shape {masks.shape}")
    if masks.dtype != bool and not np.issubdtype(masks.dtype, np.integer):
        raise ValueError(f"{what} must be boolean or integer (nonzero = foreground), got dtype "
                         f"{masks.dtype}; threshold probabilities first, e.g. mask > 0.5")
    return masks if masks.dtype == bool else masks != 0


def check_patch_size(patch_size: int, image_hw: Sequence[int]) -> int:
    """``patch_size`` as an int; ValueError unless 2 <= P < min(H, W).

    BPR (split_patches.py ``run_inst``) skips every instance of an image whose height or width is
    at most the patch size; flexvision refuses such an image instead of returning it unrefined.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)):
        raise ValueError(f"patch_size must be an int, got {patch_size!r}")
    patch_size = int(patch_size)
    height, width = int(image_hw[0]), int(image_hw[1])
    if patch_size < 2:
        raise ValueError(f"patch_size must be at least 2 pixels, got {patch_size}")
    if height <= patch_size or width <= patch_size:
        raise ValueError(
            f"an image of {height}x{width} pixels is not larger than a {patch_size}x{patch_size} "
            f"patch (BPR skips such images and keeps their coarse masks); use a patch size below "
            f"{min(height, width)} or a larger image")
    return patch_size


def _check_iou_threshold(iou_threshold: float) -> np.float32:
    threshold = float(iou_threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    return np.float32(threshold)


# ------------------------------------------------------------------------------------------------
# Boundary band


def _count_3x3(window: np.ndarray) -> np.ndarray:
    """3x3 box sum of a bool array, zero outside it: (h, w) int16."""
    padded = np.zeros((window.shape[0] + 2, window.shape[1] + 2), np.int16)
    padded[1:-1, 1:-1] = window
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]


def _band_value(count: np.ndarray) -> np.ndarray:
    """find_float_boundary's ``min(|count - 9|, count) / 4.5`` in float32 (torch's arithmetic:
    the conv count is an exact float32 integer, divided by the float32 4.5)."""
    full = BOUNDARY_WIDTH * BOUNDARY_WIDTH
    level = np.minimum(np.abs(count - full), count).astype(np.float32)
    return level / np.float32(full / 2)


def _bounding_window(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1): the foreground's bounding box grown by one pixel (the reach of the 3x3
    filter) and clipped to the image; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    height, width = mask.shape
    return (max(rows[0] - 1, 0), min(rows[-1] + 2, height),
            max(cols[0] - 1, 0), min(cols[-1] + 2, width))


def float_boundary(mask: np.ndarray) -> np.ndarray:
    """BPR's "float boundary" of a mask (split_patches.py ``find_float_boundary``, width 3).

    ``count`` = 3x3 box filter of the 0/1 mask with zero padding; the band value is
    ``min(|count - 9|, count) / 4.5`` in {0, 2/9, 4/9, 6/9, 8/9}: nonzero on foreground pixels with
    a background neighbour and on background pixels with a foreground neighbour, highest where
    the 3x3 neighbourhood is most mixed. Foreground pixels on the image border count as boundary.

    Args: mask (H, W), nonzero = foreground. Returns (H, W) float32.
    """
    mask = _as_binary_masks(mask, 2)
    out = np.zeros(mask.shape, np.float32)
    window = _bounding_window(mask)
    if window is not None:
        y0, y1, x0, x1 = window
        out[y0:y1, x0:x1] = _band_value(_count_3x3(mask[y0:y1, x0:x1]))
    return out


def boundary_pixels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ys, xs, scores) of the nonzero band pixels of :func:`float_boundary`, in row-major order
    (``np.where(fbmask)``), computed inside the mask's bounding box only. int64, int64, float32."""
    mask = _as_binary_masks(mask, 2)
    window = _bounding_window(mask)
    if window is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    y0, y1, x0, x1 = window
    band = _band_value(_count_3x3(mask[y0:y1, x0:x1]))
    ys, xs = np.nonzero(band)
    return ys + y0, xs + x0, band[ys, xs]


# ------------------------------------------------------------------------------------------------
# Patch proposals


def nms_equal_squares(xs: np.ndarray, ys: np.ndarray, scores: np.ndarray, side: int,
                      iou_threshold: float) -> np.ndarray:
    """Greedy NMS of the ``side`` x ``side`` squares with top-left corners (xs, ys).

    Semantics of mmcv <= 1.2 ``nms_cpu`` with offset 0, which BPR pins: boxes are visited in
    decreasing score, ties in increasing index (the STABLE descending order; the original's
    ``torch.sort`` leaves tie order unspecified); each kept box suppresses every later box with
    IoU >= ``iou_threshold`` (later mmcv and torchvision suppress at IoU > t). IoU and threshold
    are float32: for equal squares offset by (dx, dy), inter = max(0, side - |dx|) *
    max(0, side - |dy|) and union = 2 side^2 - inter are exact integers, so the float32 quotient
    equals mmcv's bit for bit.

    The loop runs once per KEPT box, each step vectorized over the remaining candidates.

    Returns the kept indices into the inputs, in keep order (int64).
    """
    threshold = _check_iou_threshold(iou_threshold)
    if side < 1:
        raise ValueError(f"NMS squares must have a positive side, got {side}")
    order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
    cx, cy = np.asarray(xs, np.int64)[order], np.asarray(ys, np.int64)[order]
    union_full = np.float32(2 * side * side)
    candidates = np.arange(order.size)
    keep = []
    while candidates.size:
        first, rest = candidates[0], candidates[1:]
        keep.append(first)
        overlap_w = np.maximum(side - np.abs(cx[rest] - cx[first]), 0)
        overlap_h = np.maximum(side - np.abs(cy[rest] - cy[first]), 0)
        inter = (overlap_w * overlap_h).astype(np.float32)
        iou = inter / (union_full - inter)
        candidates = rest[iou < threshold]
    return order[np.asarray(keep, np.int64)]


def move_back(boxes: np.ndarray, image_hw: Sequence[int], patch_size: int) -> np.ndarray:
    """Moves patches that leave the image back inside (split_patches.py ``_force_move_back``).

    Applied in this order on (n, 4+) float boxes: x1 < 0 -> (x1, x2) = (0, P); y1 < 0 ->
    (y1, y2) = (0, P); x2 >= W -> (W-1-P, W-1); y2 >= H -> (H-1-P, H-1). As in BPR, the right and
    bottom rules end at W-1 / H-1, so the last column / row is never covered by a moved patch.
    Returns a new array.
    """
    height, width = int(image_hw[0]), int(image_hw[1])
    boxes = np.array(boxes, copy=True)
    for lo, hi, limit in ((0, 2, None), (1, 3, None), (0, 2, width), (1, 3, height)):
        if limit is None:
            out = boxes[:, lo] < 0
            boxes[out, lo], boxes[out, hi] = 0, patch_size
        else:
            out = boxes[:, hi] >= limit
            boxes[out, lo], boxes[out, hi] = limit - 1 - patch_size, limit - 1
    return boxes


@dataclasses.dataclass(frozen=True)
class PatchBoxes:
    """Kept patch boxes of one mask: ``boxes`` (n, 5) float32 ``[x1, y1, x2, y2, score]`` in keep
    order, after move-back; ``keep`` (n,) int64 indices into the row-major boundary-pixel list."""

    boxes: np.ndarray
    keep: np.ndarray


def boundary_patch_boxes(mask: np.ndarray, patch_size: int, iou_threshold: float) -> PatchBoxes:
    """BPR's patch proposals of one coarse mask (split_patches.py ``get_dets``).

    One ``P`` x ``P`` box per boundary pixel (x, y): ``[x - P//2, y - P//2, x + P//2, y + P//2]``
    scored by the band value (:func:`boundary_pixels`), greedy NMS (:func:`nms_equal_squares`,
    IoU >= ``iou_threshold`` suppresses), then :func:`move_back`. An empty mask gives no boxes.

    Args: mask (H, W), nonzero = foreground; ``patch_size`` with P < min(H, W) (ValueError
    otherwise, see :func:`check_patch_size`). Boxes are ``P`` wide for even P (for odd P,
    boxes that were not moved are P - 1 wide, as in BPR).
    """
    mask = _as_binary_masks(mask, 2)
    patch_size = check_patch_size(patch_size, mask.shape)
    half = patch_size // 2
    ys, xs, scores = boundary_pixels(mask)
    keep = nms_equal_squares(xs - half, ys - half, scores, 2 * half, iou_threshold)
    kx, ky = xs[keep], ys[keep]
    boxes = np.stack([kx - half, ky - half, kx + half, ky + half, scores[keep]], axis=1)
    boxes = move_back(boxes.astype(np.float32), mask.shape, patch_size)
    return PatchBoxes(boxes.astype(np.float32), keep)


def boundary_patches(masks: np.ndarray, patch_size: int, iou_threshold: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Patch proposals of every instance of one image.

    Args: masks (N, H, W), nonzero = foreground. Returns ``(boxes, instance)``: (M, 5) float32
    boxes of all instances concatenated (instance by instance, each in keep order) and (M,) int64
    the instance each box belongs to.
    """
    masks = _as_binary_masks(masks, 3, "masks")
    check_patch_size(patch_size, masks.shape[1:])
    per_instance = [boundary_patch_boxes(m, patch_size, iou_threshold).boxes for m in masks]
    counts = [len(b) for b in per_instance]
    boxes = np.concatenate(per_instance, axis=0) if per_instance else np.zeros((0, 5), np.float32)
    return boxes, np.repeat(np.arange(len(masks), dtype=np.int64), counts)


# ------------------------------------------------------------------------------------------------
# Cropping and reassembly


def _box_origins(boxes: np.ndarray, patch_size: int, image_hw: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(x1, y1) int64 of boxes that must be ``patch_size`` squares inside the image."""
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] < 4:
        raise ValueError(f"boxes must be (n, 4) or (n, 5) [x1, y1, x2, y2(, score)], got shape "
                         f"{boxes.shape}")
    corners = boxes[:, :4].astype(np.int64)  # merge_patches.py casts with astype(int)
    sizes = np.concatenate([corners[:, 2] - corners[:, 0], corners[:, 3] - corners[:, 1]])
    if np.any(sizes != patch_size):
        raise ValueError(f"every box must be a {patch_size}x{patch_size} square (the patch size); "
                         f"got widths/heights {sorted(set(sizes.tolist()))}. With an odd patch "
                         f"size BPR's boxes are not square: use an even patch size")
    height, width = int(image_hw[0]), int(image_hw[1])
    if corners.size and (corners[:, :2].min() < 0 or corners[:, 2].max() > width
                         or corners[:, 3].max() > height):
        raise ValueError(f"boxes must lie inside the {height}x{width} image; got x in "
                         f"[{corners[:, 0].min()}, {corners[:, 2].max()}], y in "
                         f"[{corners[:, 1].min()}, {corners[:, 3].max()}]")
    return corners[:, 0], corners[:, 1]


def _patch_index(x1: np.ndarray, y1: np.ndarray, patch_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) index arrays of shape (n, P, 1) and (n, 1, P) selecting each patch."""
    offsets = np.arange(patch_size)
    return (y1[:, None, None] + offsets[None, :, None], x1[:, None, None] + offsets[None, None, :])


def crop_patches(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, instance: np.ndarray,
                 patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and coarse-mask patches of the boxes (split_patches.py ``crop`` with padding 0).

    Args: image (H, W, C); masks (N, H, W) nonzero = foreground; boxes (M, 4+) ``P`` x ``P``
    squares inside the image; instance (M,) the mask of each box. Returns (M, P, P, C) image
    patches (image dtype) and (M, P, P) uint8 0/1 mask patches. One gather, no loop.
    """
    image = np.asarray(image)
    masks = _as_binary_masks(masks, 3, "masks")
    if image.ndim != 3:
        raise ValueError(f"image must be (height, width, channels), got shape {image.shape}")
    if masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks of {masks.shape[1]}x{masks.shape[2]} pixels do not match the "
                         f"{image.shape[0]}x{image.shape[1]} image; resize or paste the masks "
                         f"into image coordinates first")
    instance = np.asarray(instance, np.int64)
    if instance.shape != (len(boxes),) or (instance.size and (
            instance.min() < 0 or instance.max() >= len(masks))):
        raise ValueError(f"instance must give, for each of the {len(boxes)} boxes, an index into "
                         f"the {len(masks)} masks; got shape {instance.shape}")
    x1, y1 = _box_origins(boxes, patch_size, image.shape[:2])
    rows, cols = _patch_index(x1, y1, patch_size)
    image_patches = image[rows, cols]
    mask_patches = masks[instance[:, None, None], rows, cols].astype(np.uint8)
    return image_patches, mask_patches


@dataclasses.dataclass(frozen=True)
class MergedMask:
    """Result of :func:`merge_patches` for one instance, all (H, W): ``mean_prob`` float32 (the
    mean patch probability where covered, 0 elsewhere), ``count`` int32 (patches covering each
    pixel), ``mask`` uint8 (refined mask)."""

    mean_prob: np.ndarray
    count: np.ndarray
    mask: np.ndarray


def merge_patches(coarse_mask: np.ndarray, boxes: np.ndarray, patch_probs: np.ndarray
                  ) -> MergedMask:
    """Reassembles refined patches into one instance mask (merge_patches.py ``run_inst``).

    Boxes are cast to int; each patch's foreground probability is added to ``sum[y1:y2, x1:x2]``
    and 1 to ``count`` there, in box order, in float32 (so the sums are those of BPR's sequential
    loop bit for bit); where count > 0 the mask is ``sum / count > 0.5`` (strict), elsewhere the
    coarse mask. Work is confined to the patches' bounding box.

    Args: coarse_mask (H, W) nonzero = foreground; boxes (n, 4+) ``P`` x ``P`` inside the image;
    patch_probs (n, P, P) foreground probabilities in box order.
    """
    coarse = _as_binary_masks(coarse_mask, 2, "coarse_mask")
    patch_probs = np.asarray(patch_probs, np.float32)
    if patch_probs.ndim != 3 or patch_probs.shape[1] != patch_probs.shape[2] or (
            patch_probs.shape[0] != len(boxes)):
        raise ValueError(f"patch_probs must be (n, P, P) with one patch per box ({len(boxes)} "
                         f"boxes), got shape {patch_probs.shape}")
    patch_size = patch_probs.shape[1]
    height, width = coarse.shape
    x1, y1 = _box_origins(boxes, patch_size, coarse.shape)
    mean = np.zeros((height, width), np.float32)
    count = np.zeros((height, width), np.int32)
    refined = coarse.astype(np.uint8)
    if len(boxes):
        oy, ox = int(y1.min()), int(x1.min())
        local_h, local_w = int(y1.max()) + patch_size - oy, int(x1.max()) + patch_size - ox
        rows, cols = _patch_index(x1 - ox, y1 - oy, patch_size)
        flat = np.broadcast_to(rows * local_w + cols, patch_probs.shape).ravel()
        total = np.zeros(local_h * local_w, np.float32)
        np.add.at(total, flat, patch_probs.ravel())  # unbuffered: sequential, in box order
        hits = np.bincount(flat, minlength=local_h * local_w).astype(np.int32)
        covered = hits > 0
        local_mean = np.zeros_like(total)
        local_mean[covered] = total[covered] / hits[covered].astype(np.float32)
        window = (slice(oy, oy + local_h), slice(ox, ox + local_w))
        mean[window] = local_mean.reshape(local_h, local_w)
        count[window] = hits.reshape(local_h, local_w)
        local_refined = refined[window]
        local_covered = covered.reshape(local_h, local_w)
        local_refined[local_covered] = mean[window][local_covered] > 0.5
    return MergedMask(mean, count, refined)


# ------------------------------------------------------------------------------------------------
# The network on patches, and the whole pipeline


def resize_patches(image_patches: jax.Array, mask_patches: jax.Array, size: int
                   ) -> tuple[jax.Array, jax.Array]:
    """Patches resized to the network's S x S input as BPR's pipelines do (mmseg ``Resize``):
    images bilinearly (mmcv.imrescale), masks with nearest neighbours. mmcv keeps the image's
    dtype: uint8 patches (BPR reads uint8 images) come out rounded to integers (cv2's
    saturate_cast), float patches unrounded.

    Args: image_patches (B, P, P, C) in 0..255; mask_patches (B, P, P). Returns (B, S, S, C) and
    (B, S, S) float32.
    """
    images = resize_bilinear(jnp.asarray(image_patches, jnp.float32), (size, size))
    if jnp.asarray(image_patches).dtype == jnp.uint8:
        images = jnp.clip(jnp.round(images), 0.0, 255.0)
    masks = resize_nearest(jnp.asarray(mask_patches, jnp.float32)[..., None], (size, size))
    return images, masks[..., 0]


def normalize_inputs(images: jax.Array, coarse_masks: jax.Array) -> jax.Array:
    """The network input: RGB normalised with :data:`IMAGE_MEAN` / :data:`IMAGE_STD` (mmseg
    ``Normalize``), and the 0/1 coarse mask mapped to {-1, +1} by (m - 0.5) / 0.5
    (``EncoderDecoderRefine``) as a 4th channel. (B, S, S, 3) + (B, S, S) -> (B, S, S, 4)."""
    images = (images - jnp.asarray(IMAGE_MEAN, jnp.float32)) / jnp.asarray(IMAGE_STD, jnp.float32)
    return jnp.concatenate([images, ((coarse_masks - 0.5) / 0.5)[..., None]], axis=-1)


def network_inputs(image_patches: jax.Array, mask_patches: jax.Array, size: int) -> jax.Array:
    """BPR's test-time preprocessing of patches (configs/bpr/*.py ``test_pipeline``,
    ``EncoderDecoderRefine.simple_test``): :func:`resize_patches` to ``size``, then
    :func:`normalize_inputs`. (B, P, P, 3) RGB 0..255 + (B, P, P) 0/1 -> (B, S, S, 4) float32."""
    return normalize_inputs(*resize_patches(image_patches, mask_patches, size))


@functools.partial(jax.jit, static_argnames=("model", "size"))
def patch_probabilities(model: nn.Module, variables: Any, image_patches: jax.Array,
                        mask_patches: jax.Array, size: int) -> jax.Array:
    """Foreground probability of each patch at the patch size: (B, P, P) float32.

    :func:`network_inputs`, ``model`` (a BPR refinement network returning (B, S, S, 2) logits,
    e.g. ``bpr_hrnet18s``), the logits resized bilinearly back to P x P BEFORE the softmax
    (mmseg ``whole_inference(rescale=True)``), softmax over the 2 classes, class 1.
    """
    patch = image_patches.shape[1:3]
    logits = model.apply(variables, network_inputs(image_patches, mask_patches, size))
    logits = resize_bilinear(logits.astype(jnp.float32), patch)
    return jax.nn.softmax(logits, axis=-1)[..., 1]


def refine(image: np.ndarray, masks: np.ndarray, variables: Any, *, model: nn.Module,
           patch_size: int = 64, iou_threshold: float = 0.25, network_size: int = 128,
           batch_size: int = 32) -> np.ndarray:
    """Refines every instance mask of one image with BPR.

    Args:
      image: (H, W, 3) RGB, 0..255 (uint8 or float).
      masks: (N, H, W) coarse masks, nonzero = foreground.
      variables / model: the refinement network (``convert.from_official("bpr_hrnet18s", ...)``).
      patch_size, iou_threshold: BPR's ``--patch-size`` / ``--iou-thresh`` (64 / 0.25 on
        Cityscapes); patch_size must be even and below min(H, W).
      network_size: the network's input size (128 for hrnet18s_128, 256 for hrnet48_256).
      batch_size: patches per network call; the last batch is padded, so one compilation serves
        every image with the same patch size.

    Returns (N, H, W) uint8 refined masks: the coarse mask where no patch reaches, the mean patch
    probability > 0.5 where patches overlap (:func:`merge_patches`). Raises ValueError for masks
    of another size than the image or an image not larger than the patch (see the module
    docstring).
    """
    image = np.asarray(image)
    masks = _as_binary_masks(masks, 3, "masks")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (height, width, 3) RGB, got shape {image.shape}")
    if patch_size % 2:
        raise ValueError(f"patch_size must be even (BPR's boxes [x - P//2, x + P//2] are P - 1 "
                         f"wide for odd P), got {patch_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks of {masks.shape[1]}x{masks.shape[2]} pixels do not match the "
                         f"{image.shape[0]}x{image.shape[1]} image; resize or paste the masks "
                         f"into image coordinates first")
    boxes, instance = boundary_patches(masks, patch_size, iou_threshold)
    image_patches, mask_patches = crop_patches(image, masks, boxes, instance, patch_size)
    total = len(boxes)
    padded = -(-total // batch_size) * batch_size
    probs = np.zeros((padded, patch_size, patch_size), np.float32)
    if total:
        pad = ((0, padded - total),) + ((0, 0),) * 3
        image_patches = np.pad(image_patches, pad)  # uint8 stays uint8: resize_patches rounds
        mask_patches = np.pad(mask_patches, pad[:3])
        for start in range(0, padded, batch_size):
            batch = slice(start, start + batch_size)
            probs[batch] = np.asarray(patch_probabilities(
                model, variables, image_patches[batch], mask_patches[batch], network_size))
    refined = np.empty(masks.shape, np.uint8)
    for k in range(len(masks)):
        mine = instance == k
        refined[k] = merge_patches(masks[k], boxes[mine], probs[:total][mine]).mask
    return refined
