"""Pictures of instance masks: each instance tinted and outlined on its image (NumPy + PIL).

Used for the nuclei baseline's figure and the trained models' overlays, so that every picture
of instances looks alike: one colour per instance (evenly spread hues), a translucent fill and
a one-pixel outline (the mask's pixels with a 4-neighbour outside it).
"""

from __future__ import annotations

import colorsys
import os
from typing import Sequence

import numpy as np


def instance_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct saturated RGB colours, uint8 ``[n, 3]`` (golden-ratio hue steps)."""
    hues = (seed * 0.137 + np.arange(n) * 0.618033988749895) % 1.0
    rgb = np.asarray([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]).reshape(n, 3)
    return np.round(rgb * 255).astype(np.uint8)


def outlines(masks: np.ndarray) -> np.ndarray:
    """Boundary pixels of ``[N, H, W]`` binary masks: in the mask, with a 4-neighbour (or the
    image border) outside it. Returns bool ``[N, H, W]``."""
    masks = np.asarray(masks).astype(bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    padded = np.pad(masks, [(0, 0), (1, 1), (1, 1)])
    interior = (padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2]
                & padded[:, 1:-1, 2:])
    return masks & ~interior


def display_image(image: np.ndarray, percentiles: tuple[float, float] | None = (1.0, 99.8),
                  ) -> np.ndarray:
    """An image ([H, W], [H, W, 1] or [H, W, 3], any dtype) as uint8 RGB ``[H, W, 3]``.

    With ``percentiles`` the values between those percentiles are stretched to 0..255 (dim
    fluorescence images become visible); None keeps uint8 values as they are.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W], [H, W, 1] or [H, W, 3], got {image.shape}")
    if percentiles is None:
        return np.clip(image, 0, 255).astype(np.uint8)
    lo, hi = np.percentile(image.astype(np.float64), percentiles)
    scaled = (image.astype(np.float64) - lo) / max(hi - lo, 1e-12)
    return np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)


def overlay_instances(image: np.ndarray, masks: np.ndarray, *,
                      colors: np.ndarray | Sequence[int] | None = None, fill_alpha: float = 0.3,
                      percentiles: tuple[float, float] | None = (1.0, 99.8)) -> np.ndarray:
    """Masks drawn on an image: translucent fill plus an opaque outline per instance.

    Args:
      image: [H, W] / [H, W, 1] / [H, W, 3] (see :func:`display_image` for ``percentiles``).
      masks: [N, H, W] binary (anything > 0.5 counts as inside).
      colors: [N, 3] uint8, or one RGB triple for all; default :func:`instance_colors`.
      fill_alpha: opacity of the fill (0: outlines only).

    Returns:
      uint8 RGB ``[H, W, 3]``.
    """
    canvas = display_image(image, percentiles).astype(np.float64)
    masks = np.asarray(masks) > 0.5
    if masks.ndim != 3 or masks.shape[1:] != canvas.shape[:2]:
        raise ValueError(f"masks must be [N, H, W] with the image's {canvas.shape[:2]}, got "
                         f"{masks.shape}")
    if colors is None:
        colors = instance_colors(len(masks))
    colors = np.broadcast_to(np.asarray(colors, np.float64).reshape(-1, 3), (len(masks), 3))
    for mask, color in zip(masks, colors):
        canvas[mask] = (1 - fill_alpha) * canvas[mask] + fill_alpha * color
    for edge, color in zip(outlines(masks), colors):
        canvas[edge] = color
    return np.round(canvas).astype(np.uint8)


def save_png(path: str, panels: Sequence[np.ndarray], zoom: int = 1, gap: int = 4) -> str:
    """Writes uint8 RGB panels stacked top to bottom (white ``gap`` between), each pixel
    repeated ``zoom`` times, as a PNG; returns the path."""
    from PIL import Image

    if not panels:
        raise ValueError("save_png needs at least one panel")
    width = max(p.shape[1] for p in panels) * zoom
    rows = []
    for i, panel in enumerate(panels):
        panel = np.asarray(panel, np.uint8).repeat(zoom, 0).repeat(zoom, 1)
        panel = np.pad(panel, [(0, 0), (0, width - panel.shape[1]), (0, 0)],
                       constant_values=255)
        rows.append(panel)
        if i + 1 < len(panels):
            rows.append(np.full((gap, width, 3), 255, np.uint8))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.concatenate(rows)).save(path)
    return path
