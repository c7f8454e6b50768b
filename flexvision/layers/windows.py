"""Non-overlapping windows over NHWC maps, and the shifted-window attention mask (Swin).

Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
Sec. 3.2: self-attention is computed inside non-overlapping ``M x M`` windows; every other block
cyclically shifts the map by ``M // 2`` so that windows straddle the previous partition, and an
attention mask keeps tokens that were not neighbours before the shift from attending to each other.

Windows are ordered row-major over the window grid (the official ``window_partition``), tokens
row-major inside a window. Masks depend only on static shapes: they are NumPy constants built once
per shape (``functools.lru_cache``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

#: Logit added between tokens of different shifted-window regions (the official value).
MASKED_LOGIT = -100.0


def pad_to_multiple(x: jax.Array, multiple: tuple[int, int]) -> jax.Array:
    """Zero-pads an NHWC map at the bottom and right so that H and W are multiples of ``multiple``.

    The padding of the official Swin detection code (``F.pad(x, (0, 0, 0, pad_r, 0, pad_b))``).
    """
    _, height, width, _ = x.shape
    pad_h = -height % multiple[0]
    pad_w = -width % multiple[1]
    if pad_h == 0 and pad_w == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))


def window_partition(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B, num_windows, wh * ww, C), windows row-major over the window grid.

    H and W must be multiples of the window (pad first with :func:`pad_to_multiple`).
    """
    batch, height, width, channels = x.shape
    win_h, win_w = window
    if height % win_h or width % win_w:
        raise ValueError(f"window_partition: map {height}x{width} is not a multiple of the window "
                         f"{win_h}x{win_w}; pad it first with pad_to_multiple")
    x = x.reshape(batch, height // win_h, win_h, width // win_w, win_w, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, (height // win_h) * (width // win_w), win_h * win_w, channels)


def window_reverse(windows: jax.Array, window: tuple[int, int], height: int, width: int
                   ) -> jax.Array:
    """Inverse of :func:`window_partition`: (B, num_windows, wh * ww, C) -> (B, H, W, C)."""
    batch, _, _, channels = windows.shape
    win_h, win_w = window
    x = windows.reshape(batch, height // win_h, width // win_w, win_h, win_w, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height, width, channels)


def _shift_regions(length: int, window: int, shift: int) -> np.ndarray:
    """Region label of each row (or column) of a padded, cyclically shifted map.

    The official slices ``[0, L - M)``, ``[L - M, L - s)``, ``[L - s, L)``: after a shift by ``s``
    the last ``s`` positions hold tokens that came from the opposite border.
    """
    labels = np.zeros(length, np.int32)
    if shift > 0:
        labels[length - window:length - shift] = 1
        labels[length - shift:] = 2
    return labels


@functools.lru_cache(maxsize=None)
def shifted_window_mask(height: int, width: int, window: tuple[int, int],
                        shift: tuple[int, int]) -> np.ndarray:
    """Attention bias of shifted-window attention (Swin Sec. 3.2, "efficient batch computation").

    ``height`` x ``width`` is the map AFTER padding to a multiple of the window (the detection code
    builds its mask on the padded ``Hp x Wp``). Returns float32 (num_windows, N, N), N = wh * ww:
    0 between tokens of the same region and :data:`MASKED_LOGIT` (-100) between tokens of different
    regions, so no token attends across the wrap-around border. A zero shift in one axis splits
    nothing along that axis. The result is a cached, read-only NumPy constant.
    """
    if height % window[0] or width % window[1]:
        raise ValueError(f"shifted_window_mask: map {height}x{width} must be a multiple of the "
                         f"window {window[0]}x{window[1]} (build it for the padded map)")
    rows = _shift_regions(height, window[0], shift[0])
    cols = _shift_regions(width, window[1], shift[1])
    region = (rows[:, None] * 3 + cols[None, :]).astype(np.float32)
    # NumPy version of window_partition: a constant must not be staged into a jit trace.
    region_windows = (region.reshape(height // window[0], window[0], width // window[1], window[1])
                      .transpose(0, 2, 1, 3).reshape(-1, window[0] * window[1]))
    different = region_windows[:, :, None] != region_windows[:, None, :]
    mask = np.where(different, MASKED_LOGIT, 0.0).astype(np.float32)
    mask.setflags(write=False)
    return mask
