"""Training data and recipe of BPR's refinement network (tinyalpha/BPR configs/bpr/*.py).

BPR trains the refiner on boundary patches of coarse masks (Mask R-CNN outputs on the training
set) against the matching ground-truth masks. Where no detector is at hand, coarse masks are made
from the ground truth itself (:func:`degrade_mask`: a low-resolution copy, like the 28 x 28
masks of Mask R-CNN, and a random dilation or erosion). Then, per patch, as BPR's
``train_pipeline``: resize to the network size (image bilinear, masks nearest), random
horizontal flip (p = 0.5), mmseg ``PhotoMetricDistortion``, normalisation, coarse mask as 4th
channel (:func:`refiner_batch`). The objective is the per-pixel softmax cross-entropy on the 2
classes at the input size (the network's logits are already resized to it), and the optimizer
SGD with momentum 0.9, weight decay 5e-4 (coupled, as torch SGD) and mmcv's poly schedule
(:func:`bpr_sgd`; lr 0.01, power 0.9, min_lr 1e-4, 160k iterations, batch 8 per GPU in BPR).

Batches are ``{"image": (B, S, S, 4), "labels": (B, S, S, 2) one-hot}``: a classification step
whose loss is ``optax.softmax_cross_entropy`` averaged over all axes trains on them unchanged.

Host side (NumPy): degradation and patch cutting. Device side (JAX, jittable, per-sample keys):
flips, photometric distortion, normalisation.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexvision.detection import bpr
from flexvision.detection.boundary import window_count
from flexvision.layers.flex import resize_nearest

# mmseg PhotoMetricDistortion defaults (configs/bpr/*.py use them)
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # OpenCV hue units (2 degrees): numpy randint(-18, 18) draws -18 .. 17


# ------------------------------------------------------------------------------------------------
# Coarse masks and patches (host)


def degrade_mask(mask: np.ndarray, rng: np.random.Generator, *, factors: Sequence[int] = (4, 8),
                 max_radius: int = 2) -> np.ndarray:
    """A coarse copy of a ground-truth mask: block-averaged at 1/f resolution (f drawn from
    ``factors[0]..factors[1]``, the block grid shifted by a random offset), thresholded at 0.5,
    repeated back to full size, then dilated (r > 0) or eroded (r < 0) by a square of radius
    |r| <= ``max_radius`` (r drawn uniformly; outside the image counts as background).

    Args: mask (H, W) nonzero = foreground. Returns (H, W) bool.
    """
    mask = np.asarray(mask) != 0
    low, high = int(factors[0]), int(factors[1])
    if not 1 <= low <= high:
        raise ValueError(f"factors must be (low, high) with 1 <= low <= high, got {factors!r}")
    if max_radius < 0:
        raise ValueError(f"max_radius must be >= 0, got {max_radius}")
    factor = int(rng.integers(low, high + 1))
    oy, ox = (int(v) for v in rng.integers(0, factor, size=2))
    height, width = mask.shape
    rows, cols = -(-(height + oy) // factor), -(-(width + ox) // factor)
    grid = np.zeros((rows * factor, cols * factor), np.float32)
    grid[oy:oy + height, ox:ox + width] = mask
    blocks = grid.reshape(rows, factor, cols, factor).mean(axis=(1, 3)) > 0.5
    coarse = blocks.repeat(factor, axis=0).repeat(factor, axis=1)[oy:oy + height, ox:ox + width]
    radius = int(rng.integers(-max_radius, max_radius + 1))
    if radius > 0:
        coarse = window_count(coarse, radius) > 0
    elif radius < 0:
        coarse = window_count(coarse, -radius) == (1 - 2 * radius) ** 2
    return coarse


def training_patches(image: np.ndarray, gt_masks: np.ndarray, coarse_masks: np.ndarray,
                     patch_size: int, iou_threshold: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boundary patches of the coarse masks with the matching ground truth (split_patches.py:
    boxes from the COARSE mask, image / coarse / gt cropped at them).

    Args: image (H, W, 3); gt_masks and coarse_masks (N, H, W), instance k of one matching
    instance k of the other. Returns (M, P, P, 3) image patches, (M, P, P) coarse and (M, P, P)
    gt uint8 patches.
    """
    gt_masks, coarse_masks = np.asarray(gt_masks), np.asarray(coarse_masks)
    if gt_masks.shape != coarse_masks.shape:
        raise ValueError(f"gt_masks {gt_masks.shape} and coarse_masks {coarse_masks.shape} must "
                         f"pair instance k with instance k (same shape)")
    boxes, instance = bpr.boundary_patches(coarse_masks, patch_size, iou_threshold)
    images, coarse = bpr.crop_patches(image, coarse_masks, boxes, instance, patch_size)
    _, gt = bpr.crop_patches(image, gt_masks, boxes, instance, patch_size)
    return images, coarse, gt


# ------------------------------------------------------------------------------------------------
# Photometric distortion (device; float RGB in 0..255)


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """(..., 3) RGB in 0..255 -> HSV with hue in degrees [0, 360), saturation and value in
    [0, 1] and [0, 255] (OpenCV's definition, in float)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = jnp.max(rgb, axis=-1)
    chroma = value - jnp.min(rgb, axis=-1)
    safe = jnp.where(chroma > 0, chroma, 1.0)
    hue = jnp.where(value == r, jnp.mod((g - b) / safe, 6.0),
                    jnp.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = jnp.where(chroma > 0, 60.0 * hue, 0.0)
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
    return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """Inverse of :func:`rgb_to_hsv`: f(n) = V - V S max(0, min(k, 4 - k, 1)),
    k = (n + H / 60) mod 6, n = 5, 3, 1 for R, G, B."""
    hue, saturation, value = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0]) + hue / 60.0, 6.0)
    return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_saturation(images: jax.Array, alpha: jax.Array) -> jax.Array:
    """Saturation scaled by ``alpha`` (broadcast over (B, 1, 1)) and clipped to [0, 1]."""
    hsv = rgb_to_hsv(images)
    hsv = hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * alpha, 0.0, 1.0))
    return hsv_to_rgb(hsv)


def shift_hue(images: jax.Array, degrees: jax.Array) -> jax.Array:
    """Hue rotated by ``degrees`` (broadcast over (B, 1, 1)), modulo 360."""
    hsv = rgb_to_hsv(images)
    return hsv_to_rgb(hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + degrees, 360.0)))


def photometric_distortion(key: jax.Array, images: jax.Array) -> jax.Array:
    """mmseg ``PhotoMetricDistortion`` on a (B, H, W, 3) RGB batch in 0..255, drawn per image:
    brightness +U(-32, 32) (p 0.5); contrast x U(0.5, 1.5) (p 0.5) either right after the
    brightness or last (p 0.5 each); saturation x U(0.5, 1.5) (p 0.5); hue + 2 * randint(-18, 18)
    degrees (p 0.5); pixels clipped to [0, 255] after each step. mmseg works on uint8 and
    truncates after each step; this runs in float."""
    batch = images.shape[0]
    keys = jax.random.split(key, 9)

    def coin(k):
        return jax.random.bernoulli(k, 0.5, (batch, 1, 1, 1))

    def uniform(k, low, high):
        return jax.random.uniform(k, (batch, 1, 1, 1), minval=low, maxval=high)

    images = images.astype(jnp.float32)
    brightness = jnp.where(coin(keys[0]), uniform(keys[1], -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA),
                           0.0)
    images = jnp.clip(images + brightness, 0.0, 255.0)
    contrast = jnp.where(coin(keys[2]), uniform(keys[3], *CONTRAST_RANGE), 1.0)
    contrast_first = coin(keys[4])
    images = jnp.where(contrast_first, jnp.clip(images * contrast, 0.0, 255.0), images)
    saturation = jnp.where(coin(keys[5]), uniform(keys[6], *SATURATION_RANGE), 1.0)
    images = jnp.clip(adjust_saturation(images, saturation[..., 0]), 0.0, 255.0)
    hue_units = jax.random.randint(keys[8], (batch, 1, 1), -HUE_DELTA, HUE_DELTA)
    hue = jnp.where(coin(keys[7])[..., 0], 2.0 * hue_units, 0.0)
    images = jnp.clip(shift_hue(images, hue), 0.0, 255.0)
    return jnp.where(contrast_first, images, jnp.clip(images * contrast, 0.0, 255.0))


def random_flip(key: jax.Array, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The same random horizontal flip (p 0.5 per example) of every (B, H, W, ...) array."""
    flip = jax.random.bernoulli(key, 0.5, (arrays[0].shape[0],))
    out = []
    for array in arrays:
        where = flip.reshape((-1,) + (1,) * (array.ndim - 1))
        out.append(jnp.where(where, array[:, :, ::-1], array))
    return tuple(out)


def refiner_batch(key: jax.Array, image_patches: jax.Array, coarse_patches: jax.Array,
                  gt_patches: jax.Array, size: int, *, augment: bool = True) -> dict:
    """One training batch of BPR's ``train_pipeline`` from (B, P, P, 3) image, (B, P, P) coarse
    and gt patches: resize to ``size`` (image bilinear, masks nearest), flip + photometric
    distortion when ``augment``, normalise. Returns {"image": (B, S, S, 4), "labels":
    (B, S, S, 2) one-hot background/foreground}."""
    images, coarse = bpr.resize_patches(image_patches, coarse_patches, size)
    gt = resize_nearest(jnp.asarray(gt_patches, jnp.float32)[..., None], (size, size))[..., 0]
    if augment:
        flip_key, photo_key = jax.random.split(key)
        images, coarse, gt = random_flip(flip_key, images, coarse, gt)
        images = photometric_distortion(photo_key, images)
    labels = jax.nn.one_hot((gt > 0.5).astype(jnp.int32), 2)
    return {"image": bpr.normalize_inputs(images, coarse), "labels": labels}


def pixel_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example mean over pixels of the softmax cross-entropy: (B, S, S, 2) logits and
    one-hot labels -> (B,) (mmseg CrossEntropyLoss, mean reduction, over equal-size patches)."""
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
    return losses.reshape(losses.shape[0], -1).mean(axis=1)


def poly_schedule(lr: float, total_steps: int, *, power: float = 0.9, min_lr: float = 1e-4
                  ) -> optax.Schedule:
    """mmcv ``PolyLrUpdaterHook`` (by iteration): lr_i = (lr - min_lr) (1 - i / T)^power + min_lr."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return optax.polynomial_schedule(lr, min_lr, power, total_steps)


def bpr_sgd(total_steps: int, *, lr: float = 0.01, momentum: float = 0.9,
            weight_decay: float = 5e-4, power: float = 0.9, min_lr: float = 1e-4
            ) -> optax.GradientTransformation:
    """BPR's optimizer (configs/_base_/schedules/schedule_160k.py): torch SGD with momentum and
    coupled weight decay on every parameter (g + wd * p enters the momentum buffer), lr from
    :func:`poly_schedule`."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(poly_schedule(lr, total_steps, power=power, min_lr=min_lr),
                                 momentum=momentum))
