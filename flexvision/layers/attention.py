"""Multi-head attention on top of ``jax.nn.dot_product_attention``, and relative-position helpers.

``jax.nn.dot_product_attention`` picks the fused cuDNN kernel on GPUs and XLA elsewhere, so every
attention in flexvision goes through :func:`dot_product_attention` below.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexvision.layers.common import dense, param_init


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | None = None, mask: jax.Array | None = None,
                          scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale + bias) v (Vaswani et al. 2017, eq. 1), shapes (B, T, heads, head_dim).

    ``bias`` broadcasts to (B, heads, Tq, Tk) and is added to the logits (relative positions,
    window masks); ``mask`` is boolean, True where attending is allowed. Logits and softmax are
    computed in float32 whatever the input dtype.
    """
    dtype = q.dtype
    if bias is not None:
        bias = bias.astype(dtype)
    if jax.default_backend() == "gpu":  # the fused cuDNN kernel where there is one
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale
                                            ).astype(dtype)
    return heads_major_attention(q, k, v, bias=bias, mask=mask, scale=scale).astype(dtype)


def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | None = None, mask: jax.Array | None = None,
                          scale: float | None = None) -> jax.Array:
    """The math of ``jax.nn.dot_product_attention``'s XLA path (Vaswani et al. 2017, eq. 1:
    logits in float32, bias added, masked entries set to -0.7 * float32 max, float32 softmax),
    with both contractions as plain (batch, heads)-batched matmuls and one final transpose.

    jax.nn's XLA path vmaps over a query-group axis and contracts probs with v straight into the
    (B, T, heads, head_dim) layout; XLA's CPU backend runs that contraction ~2.3x slower than this
    form (ViT-S/16 attention at batch 32: 67 ms vs 29 ms per block, measured interleaved with
    flexvision.benchmark.time_interleaved). On GPU :func:`dot_product_attention` keeps jax.nn for
    its fused kernel.
    """
    head_dim = q.shape[-1]
    scale = 1.0 / float(np.sqrt(head_dim)) if scale is None else scale
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(scale, logits_dtype)
    if bias is not None:
        logits = (logits + bias).astype(logits_dtype)
    if mask is not None:
        large_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
        logits = jnp.where(mask, logits, jnp.asarray(large_negative, logits_dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
    return jnp.einsum("bnts,bsnh->bnth", probs, v).transpose(0, 2, 1, 3)


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with one fused qkv projection and an output projection (timm's Attention).

    Parameter names follow timm (``qkv``, ``proj``) so that importers map them one to one; the qkv
    kernel is (embed, 3 * heads * head_dim).
    """

    num_heads: int
    qkv_bias: bool = True
    qk_norm: bool = False
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, bias: jax.Array | None = None, train: bool = False
                 ) -> jax.Array:
        batch, tokens, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"attention width {width} is not divisible by num_heads={self.num_heads}")
        head_dim = width // self.num_heads
        qkv = dense(3 * width, axes=("embed", "mlp"), use_bias=self.qkv_bias, dtype=self.dtype,
                    name="qkv")(x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_norm:
            q = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="q_norm",
                             scale_init=param_init(nn.initializers.ones, ("kv",)),
                             bias_init=param_init(nn.initializers.zeros, ("kv",)))(q)
            k = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="k_norm",
                             scale_init=param_init(nn.initializers.ones, ("kv",)),
                             bias_init=param_init(nn.initializers.zeros, ("kv",)))(k)
        if self.attn_dropout > 0.0 and train:
            out = _attention_with_dropout(q, k, v, bias, self.attn_dropout,
                                          self.make_rng("dropout"))
        else:
            out = dot_product_attention(q, k, v, bias=bias)
        out = out.reshape(batch, tokens, width)
        out = dense(width, axes=("mlp", "embed"), dtype=self.dtype, name="proj")(out)
        return nn.Dropout(self.proj_dropout, deterministic=not train)(out)


def _attention_with_dropout(q, k, v, bias, rate, rng):
    """Explicit attention with dropout on the probabilities (the fused kernel has no dropout)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1)
    keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - rate), 0.0).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


# Relative positions (Swin)


@functools.lru_cache(maxsize=None)
def relative_position_index(window: tuple[int, int],
                            table_window: tuple[int, int] | None = None) -> np.ndarray:
    """Index of each (query, key) pair of a window into a relative-position bias table.

    Swin (Liu et al. 2021, Sec. 3.2, "relative position bias"): the bias of two tokens of a
    ``wh x ww`` window depends only on their offset (dy, dx) in [-(wh-1), wh-1] x [-(ww-1), ww-1],
    and is read from a table with (2 * Wh - 1) * (2 * Ww - 1) rows in the official row-major order
    ``(dy + Wh - 1) * (2 * Ww - 1) + (dx + Ww - 1)``, tokens row-major in the window.

    ``table_window`` (Wh, Ww) is the window the table was made for (default: ``window``); a smaller
    ``window`` reads the centre of the table, i.e. the same learned bias for each offset.
    Returns a cached, read-only int32 (wh * ww, wh * ww) array.
    """
    win_h, win_w = window
    tab_h, tab_w = table_window or window
    if win_h > tab_h or win_w > tab_w:
        raise ValueError(f"window {window} is larger than the bias table's window {table_window}; "
                         "resize the table with resize_relative_position_bias_table")
    rows, cols = np.meshgrid(np.arange(win_h), np.arange(win_w), indexing="ij")
    coords = np.stack([rows.ravel(), cols.ravel()])  # 2, N
    offsets = coords[:, :, None] - coords[:, None, :]  # 2, N, N (query minus key)
    index = (offsets[0] + tab_h - 1) * (2 * tab_w - 1) + (offsets[1] + tab_w - 1)
    index = index.astype(np.int32)
    index.setflags(write=False)
    return index


def relative_position_bias(table: jax.Array, window: tuple[int, int],
                           table_window: tuple[int, int]) -> jax.Array:
    """The (heads, N, N) attention bias of a window from a (num_offsets, heads) table."""
    index = relative_position_index(tuple(window), tuple(table_window))
    tokens = index.shape[0]
    bias = jnp.take(table, index.reshape(-1), axis=0).reshape(tokens, tokens, -1)
    return jnp.transpose(bias, (2, 0, 1))


def _cubic_weight(distance: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    d = np.abs(distance)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


@functools.lru_cache(maxsize=None)
def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of 1-D bicubic resampling as torch ``F.interpolate``
    (mode='bicubic', align_corners=False, no antialias): source coordinate
    (i + 0.5) * in / out - 0.5, four taps with a = -0.75, indices clamped at the borders."""
    matrix = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        source = (i + 0.5) * scale - 0.5
        left = int(np.floor(source))
        frac = source - left
        for tap in range(-1, 3):
            weight = _cubic_weight(np.asarray(tap - frac))
            matrix[i, min(max(left + tap, 0), in_size - 1)] += float(weight)
    matrix.setflags(write=False)
    return matrix


def resize_relative_position_bias_table(table: np.ndarray, new_window: tuple[int, int]
                                        ) -> np.ndarray:
    """Resamples a square Swin bias table ((2M-1)^2, heads) to ``new_window`` by bicubic
    interpolation of its (2M-1) x (2M-1) grid per head: the official Swin ``load_pretrained`` and
    timm's ``resize_rel_pos_bias_table_simple`` (torch bicubic, align_corners=False)."""
    table = np.asarray(table, np.float64)
    num_offsets, heads = table.shape
    side = int(round(num_offsets ** 0.5))
    if side * side != num_offsets or side % 2 == 0:
        raise ValueError(f"relative position bias table of {num_offsets} rows is not a square "
                         "(2M-1) x (2M-1) grid; only square source windows can be resized")
    out_h, out_w = 2 * new_window[0] - 1, 2 * new_window[1] - 1
    grid = table.T.reshape(heads, side, side)
    resized = np.einsum("oh,chw,pw->cop", bicubic_resize_matrix(side, out_h), grid,
                        bicubic_resize_matrix(side, out_w))
    return resized.reshape(heads, out_h * out_w).T.astype(np.float32)


# Relative positions (MViTv2)


@functools.lru_cache(maxsize=None)
def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of 1-D linear interpolation with half-pixel centres.

    Row ``i`` samples the input at ``(i + 0.5) * in_size / out_size - 0.5`` (clamped to the
    edges), as ``torch.nn.functional.interpolate(mode="linear"/"bilinear", align_corners=False)``
    does; detectron2's ``get_rel_pos`` and MViT's ``_get_pos_embed`` resize with it. The matrix
    is exactly the identity when ``in_size == out_size``. Read-only and cached per size pair.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be >= 1, got {in_size} -> {out_size}")
    scale = in_size / out_size
    source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    lower = np.floor(source).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = source - lower
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - frac)
    np.add.at(matrix, (rows, upper), frac)
    matrix = matrix.astype(np.float32)
    matrix.flags.writeable = False
    return matrix


@functools.lru_cache(maxsize=None)
def decomposed_rel_pos_index(q_len: int, k_len: int) -> np.ndarray:
    """(q_len, k_len) int table: row of the relative-position table for query i and key j.

    MViTv2 (Li et al. 2022, sec. 3.1) with the pooled-resolution scaling of the official
    code: the coarser side is stretched to the finer one's spacing, so the distance is
    ``i * max(k/q, 1) - j * max(q/k, 1) + (k - 1) * max(q/k, 1)``, truncated to an integer. The
    arithmetic is float32 in the reference's order, so fractional ratios round identically.
    The table needed has ``2 * max(q_len, k_len) - 1`` rows.
    """
    q_ratio = np.float32(max(k_len / q_len, 1.0))
    k_ratio = np.float32(max(q_len / k_len, 1.0))
    dist = (np.arange(q_len, dtype=np.float32)[:, None] * q_ratio
            - np.arange(k_len, dtype=np.float32)[None, :] * k_ratio)
    dist = dist + np.float32((k_len - 1) * max(q_len / k_len, 1.0))
    index = dist.astype(np.int64)
    index.flags.writeable = False
    return index


def resize_rel_pos_table(table: jax.Array, length: int) -> jax.Array:
    """Resizes a (L, head_dim) relative-position table to ``length`` rows by linear interpolation.

    detectron2 / MMPretrain ``get_rel_pos``: tables trained at one resolution serve any other.
    When ``length == L`` the table is returned unchanged (the interpolation is the identity).
    """
    if table.shape[0] == length:
        return table
    matrix = jnp.asarray(linear_resize_matrix(table.shape[0], length))
    return jnp.einsum("nl,lc->nc", matrix, table.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).astype(table.dtype)


def decomposed_rel_pos_bias(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                            q_size: tuple[int, int], k_size: tuple[int, int]) -> jax.Array:
    """Decomposed relative-position logits of MViTv2 (Li et al. 2022, sec. 3.1): q_i . (R_h + R_w).

    ``q`` is (B, q_h * q_w, heads, head_dim), the spatial queries (no class token) before the
    attention scale; the tables are (L, head_dim), resized to ``2 * max(q, k) - 1`` rows per axis
    for the actual sizes. Returns the bias (B, heads, q_h * q_w, k_h * k_w) to add to the logits.
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    batch, _, heads, head_dim = q.shape
    table_h = resize_rel_pos_table(rel_pos_h, 2 * max(q_h, k_h) - 1)
    table_w = resize_rel_pos_table(rel_pos_w, 2 * max(q_w, k_w) - 1)
    rel_h = jnp.take(table_h, decomposed_rel_pos_index(q_h, k_h), axis=0).astype(q.dtype)
    rel_w = jnp.take(table_w, decomposed_rel_pos_index(q_w, k_w), axis=0).astype(q.dtype)
    spatial_q = q.reshape(batch, q_h, q_w, heads, head_dim)
    bias_h = jnp.einsum("bhwnc,hkc->bnhwk", spatial_q, rel_h)
    bias_w = jnp.einsum("bhwnc,wkc->bnhwk", spatial_q, rel_w)
    bias = bias_h[..., :, None] + bias_w[..., None, :]
    return bias.reshape(batch, heads, q_h * q_w, k_h * k_w)
