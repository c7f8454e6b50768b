"""Spatial shifts of channels with zero fill: the token mixing of CycleMLP and AS-MLP.

Both architectures move each channel of an NHWC map by a fixed integer number of pixels along
one spatial axis, fill the vacated border with zeros, and then mix channels with a matmul:

- CycleMLP's Cycle FC (Chen et al. 2022) samples channel ``c`` at offset
  ``(c + k // 2) mod k - k // 2`` along W (``sfc_h``, kernel 1xk) or H (``sfc_w``, kernel kx1).
  The official code does this with a deformable convolution whose offsets are constant over
  space; with integer offsets and a 1x1 kernel that is exactly a shift with zero padding.
- AS-MLP's axial shift (Lian et al. 2022, "Axial Shift") splits the channels into ``shift_size``
  contiguous groups of ``ceil(C / shift_size)`` channels (the last one smaller) and moves group
  ``g`` by ``g - shift_size // 2`` pixels.

The shift amounts depend only on static shapes, so they are Python tuples built once per
configuration; the shift itself is a handful of pads and selects that XLA fuses into one pass.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def shift_with_zero_fill(x: jax.Array, amount: int, axis: int) -> jax.Array:
    """``out[..., i, ...] = x[..., i - amount, ...]`` along ``axis``, zero where ``i - amount``
    falls outside the array (a translation by ``amount`` pixels; positive moves content towards
    higher indices)."""
    if amount == 0:
        return x
    axis = axis % x.ndim
    size = x.shape[axis]
    if abs(amount) >= size:
        return jnp.zeros_like(x)
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (amount, -amount, 0)
    return lax.pad(x, jnp.zeros((), x.dtype), config)


def shift_channels(x: jax.Array, amounts: Sequence[int], axis: int) -> jax.Array:
    """Translates channel ``c`` of a channels-last array by ``amounts[c]`` pixels along ``axis``
    with zero fill: ``out[..., i, ..., c] = x[..., i - amounts[c], ..., c]``.

    ``amounts`` is a static sequence with one integer per channel (the last axis of ``x``).
    """
    channels = x.shape[-1]
    amounts = tuple(int(a) for a in amounts)
    if len(amounts) != channels:
        raise ValueError(f"shift_channels: got {len(amounts)} shift amounts for {channels} "
                         f"channels; give exactly one integer per channel")
    if axis % x.ndim == x.ndim - 1:
        raise ValueError("shift_channels: axis must be a spatial axis, not the channel axis")
    distinct = sorted(set(amounts))
    if len(distinct) == 1:
        return shift_with_zero_fill(x, distinct[0], axis)
    runs = _contiguous_runs(amounts)
    if len(runs) <= len(distinct):
        # Channel groups are contiguous (AS-MLP): shift each slice once and concatenate.
        return jnp.concatenate(
            [shift_with_zero_fill(x[..., start:stop], amount, axis)
             for start, stop, amount in runs], axis=-1)
    # Interleaved channels (Cycle FC): shift the whole map once per distinct amount and pick
    # each channel from its own shifted copy.
    which = np.asarray([distinct.index(a) for a in amounts])
    out = shift_with_zero_fill(x, distinct[0], axis)
    for index, amount in enumerate(distinct[1:], start=1):
        out = jnp.where(jnp.asarray(which == index), shift_with_zero_fill(x, amount, axis), out)
    return out


def _contiguous_runs(amounts: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(start, stop, amount)`` for each maximal run of equal consecutive amounts."""
    runs, start = [], 0
    for index in range(1, len(amounts) + 1):
        if index == len(amounts) or amounts[index] != amounts[start]:
            runs.append((start, index, amounts[start]))
            start = index
    return runs
