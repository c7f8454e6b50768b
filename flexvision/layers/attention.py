"""Multi-head attention on top of ``jax.nn.dot_product_attention``, and relative-position helpers
(index tables and bias assembly; the tables' resizing lives in flexvision/layers/flex.py).

Every attention in flexvision goes through :func:`dot_product_attention` below, which chooses the
implementation once per static shape (:func:`attention_implementation`, cached, logged once):

* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash
  attention, on an NVIDIA GPU wherever the kernel takes the call;
* ``xla``: elsewhere; on GPU jax.nn's own XLA path, on CPU/TPU :func:`heads_major_attention`
  (the same math in a layout XLA's CPU backend runs faster).

jax.nn's default (``implementation=None``) is its XLA path, never cuDNN, so the choice must be
explicit. The cuDNN conditions are those of jax 0.10.2 (jax/_src/cudnn/fused_attention_stablehlo.py
``check_layout`` and ``check_is_flash_attention``; jax/_src/nn/functions.py): q, k, v float16 or
bfloat16 of one dtype; head_dim a multiple of 8 and <= 128 (<= 256 from compute capability 9.0,
Hopper); q and k the same head_dim, k and v the same length and heads; a bias (a boolean mask
is turned into one) must be (.., .., Tq, Tk) with batch and head axes 1 or full; in training
with a bias both lengths must be even; compute capability 10.3 needs cuDNN >= 9.11.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from flexvision.layers.common import dense, param_init
from flexvision.layers.flex import resize_rel_pos_table

IMPLEMENTATIONS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the attention choice needs to know about the device: jax's backend ('cpu', 'gpu',
    'tpu'), whether the GPU is NVIDIA's (CUDA), its compute capability (major, minor) and the
    cuDNN version as an int (9.8.0 -> 90800); None where not applicable."""

    backend: str
    cuda: bool = False
    compute_capability: tuple[int, int] | None = None
    cudnn_version: int | None = None


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """The static facts of one attention call: shapes (B, T, heads, head_dim) of q, k, v, the
    dtype name, the bias shape (4-d after broadcasting rules, or None; a boolean mask counts as
    a bias, as cuDNN folds it into one), and whether it is differentiated (``train``)."""

    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    dtype: str
    bias_shape: tuple[int, ...] | None = None
    train: bool = True


@functools.lru_cache(maxsize=None)
def device_facts() -> DeviceFacts:
    """The :class:`DeviceFacts` of ``jax.devices()[0]`` (read once), from the same sources jax's
    cuDNN path checks: the backend's ``platform_version`` ('cuda' or 'rocm'), the device's
    ``compute_capability`` and ``jax._src.lib.cuda_versions.cudnn_get_version()``."""
    backend = jax.default_backend()
    if backend != "gpu":
        return DeviceFacts(backend)
    platform_version = jax.extend.backend.get_backend().platform_version or ""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    capability = tuple(int(x) for x in str(capability).split(".")[:2]) if capability else None
    try:
        from jax._src.lib import cuda_versions
        cudnn = int(cuda_versions.cudnn_get_version()) if cuda_versions is not None else None
    except (ImportError, AttributeError, RuntimeError):
        cudnn = None
    return DeviceFacts(backend, "cuda" in platform_version.lower(), capability, cudnn)


def cudnn_refusal(call: AttentionCall, device: DeviceFacts) -> str | None:
    """Why cuDNN's fused attention cannot take ``call`` on ``device`` (the conditions of the
    module docstring), or None when it can. A pure function of static facts."""
    if device.backend != "gpu" or not device.cuda:
        return f"backend {device.backend}{'' if device.backend != 'gpu' else ' (not CUDA)'}"
    if device.cudnn_version is None:
        return "no cuDNN found"
    if device.compute_capability is None or device.compute_capability < (8, 0):
        return f"compute capability {device.compute_capability} < 8.0"
    if device.compute_capability == (10, 3) and device.cudnn_version < 91100:
        return "compute capability 10.3 needs cuDNN >= 9.11"
    if call.dtype not in ("float16", "bfloat16"):
        return f"dtype {call.dtype} (cuDNN takes float16/bfloat16)"
    if not (len(call.q_shape) == len(call.k_shape) == len(call.v_shape) == 4):
        return "q, k, v not 4-d (B, T, heads, head_dim)"
    (qb, q_len, q_heads, q_dim), (kb, k_len, k_heads, k_dim), (vb, v_len, v_heads, v_dim) = (
        call.q_shape, call.k_shape, call.v_shape)
    max_dim = 256 if device.compute_capability >= (9, 0) else 128
    if q_dim % 8 or q_dim > max_dim:
        return f"head_dim {q_dim} (needs a multiple of 8, <= {max_dim})"
    if q_dim != k_dim or k_dim != v_dim:
        return f"head dims q {q_dim}, k {k_dim}, v {v_dim} differ"
    if not qb == kb == vb or k_len != v_len or k_heads != v_heads or q_heads % k_heads:
        return "q, k, v batch/length/heads do not match"
    if call.bias_shape is not None:
        bias = (1,) * (4 - len(call.bias_shape)) + tuple(call.bias_shape)
        if bias[2:] != (q_len, k_len):
            return f"bias {call.bias_shape} is not (.., .., {q_len}, {k_len})"
        if bias[0] not in (1, qb) or bias[1] not in (1, q_heads):
            return f"bias {call.bias_shape} does not broadcast over (B, heads)"
        if call.train and (q_len % 2 or k_len % 2):
            return f"training with a bias needs even lengths, got Tq {q_len}, Tk {k_len}"
    return None


_CHOICE_LOG = logging.getLogger(__name__)
_RECORDERS: list[list[str]] = []


@functools.lru_cache(maxsize=None)
def select_implementation(call: AttentionCall, device: DeviceFacts) -> tuple[str, str]:
    """('cudnn' or 'xla', why) for one static call on one device; cached, and logged once per
    distinct (call, device) at INFO."""
    refusal = cudnn_refusal(call, device)
    choice = ("cudnn", "fused flash attention supports the call") if refusal is None else (
        "xla", refusal)
    _CHOICE_LOG.info("attention q%s k%s %s bias %s train=%s on %s: %s (%s)", call.q_shape,
                     call.k_shape, call.dtype, call.bias_shape, call.train, device.backend,
                     *choice)
    return choice


def attention_implementation(q, k, v, *, bias=None, mask=None, train: bool = True,
                             device: DeviceFacts | None = None) -> str:
    """The implementation :func:`dot_product_attention` uses for these (traced) arrays: only
    their static shapes and dtypes are read. ``device`` defaults to :func:`device_facts`."""
    bias_shape = None
    if bias is not None or mask is not None:
        shapes = [tuple(x.shape) for x in (bias, mask) if x is not None]
        bias_shape = tuple(np.broadcast_shapes(*[(1,) * (4 - len(s)) + s for s in shapes]))
    call = AttentionCall(tuple(q.shape), tuple(k.shape), tuple(v.shape), jnp.dtype(q.dtype).name,
                         bias_shape, bool(train))
    choice, _ = select_implementation(call, device or device_facts())
    for recorder in _RECORDERS:
        recorder.append(choice)
    return choice


@contextlib.contextmanager
def record_attention_choices():
    """Collects the implementation of every attention traced inside the block (a list of
    'xla'/'cudnn', one per call site traced), e.g. for the benchmark's ``attention`` column."""
    recorded: list[str] = []
    _RECORDERS.append(recorded)
    try:
        yield recorded
    finally:
        _RECORDERS.remove(recorded)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | None = None, mask: jax.Array | None = None,
                          scale: float | None = None, train: bool = True) -> jax.Array:
    """softmax(q k^T * scale + bias) v (Vaswani et al. 2017, eq. 1), shapes (B, T, heads, head_dim).

    ``bias`` broadcasts to (B, heads, Tq, Tk) and is added to the logits (relative positions,
    window masks); ``mask`` is boolean, True where attending is allowed. Logits and softmax are
    computed in float32 whatever the input dtype (cuDNN: its fused kernel's float32 softmax).
    ``train``: whether the call may be differentiated (cuDNN's backward has extra conditions);
    the implementation is :func:`attention_implementation`'s choice.
    """
    dtype = q.dtype
    if bias is not None:
        bias = bias.astype(dtype)
    implementation = attention_implementation(q, k, v, bias=bias, mask=mask, train=train)
    if implementation == "cudnn":
        if bias is not None and bias.ndim < 4:
            bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        if mask is not None and mask.ndim < 4:
            mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                            implementation="cudnn").astype(dtype)
    if jax.default_backend() == "gpu":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                            implementation="xla").astype(dtype)
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
    flexvision.benchmark.time_interleaved). On GPU :func:`dot_product_attention` uses cuDNN where
    it can and jax.nn's own XLA path otherwise (that one not measured against this form there).

    In float32 the scale multiplies q before the first contraction (as timm's explicit path
    does), which XLA fuses into q's layout copy; scaling the logits instead made XLA's CPU backend
    materialise a (B, heads, T, T) broadcast of the scale as an operand of its attention fusion
    (30 MB per ViT-S block at batch 32). Lower-precision q is not rounded again: its float32
    logits are scaled.
    """
    head_dim = q.shape[-1]
    scale = 1.0 / float(np.sqrt(head_dim)) if scale is None else scale
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    if q.dtype == logits_dtype:  # scale q (T x head_dim values), not the T x T logits
        q = q * jnp.asarray(scale, q.dtype)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=logits_dtype)
    if q.dtype != logits_dtype:  # low-precision q: scale the float32 logits instead
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
            out = dot_product_attention(q, k, v, bias=bias, train=train)
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
                         "resize the table with flexvision.layers.flex.resize_relative_position_bias_table")
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


# Relative positions (MViTv2)


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
