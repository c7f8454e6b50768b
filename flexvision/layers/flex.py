"""All resizing math of flexvision: resize matrices, PI-resize, position-embedding resampling,
and the flexible patch embedding (FlexiViT, Beyer et al. 2023, arXiv 2212.08013).

Every resize here is linear in its input, so it is a matrix (the one exception, nearest-neighbour
resizing of feature maps, is an index table). The matrices are built once per
static shape in float64 NumPy (``functools.lru_cache``) and applied in the graph as one matmul.
Two libraries' conventions are reproduced exactly, selected by ``method``:

``"big_vision"``
    PI-resize: ``tf.image.resize(..., "bilinear")`` (antialias=False): half-pixel centres,
    two taps, indices clamped at the edges, no support scaling when downsampling.
    Position embeddings: ``jax.image.resize(..., "linear")`` (antialias=True): triangle kernel,
    support widened by 1/scale when downsampling, weights renormalised at the edges.
``"timm"``
    Both PI-resize and position embeddings: ``torch.nn.functional.interpolate(..., "bicubic",
    antialias=True, align_corners=False)``: PIL's cubic kernel with a = -0.5, support widened by
    1/scale when downsampling, taps outside the input dropped and the rest renormalised.

The architectures ported from PyTorch resize with ``torch.nn.functional.interpolate`` without
antialiasing; those matrices live here too: bilinear (HRNet's segmentation neck, MViT's position
embeddings and relative-position tables), bicubic with a = -0.75 (Swin's bias tables when a
checkpoint moves to another window), and nearest (HRNet's fuse layers; mmseg's HRNet, which BPR
uses, fuses bilinearly instead: upsample by 2**k, then resize to the target branch).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexvision.layers.common import CONV_AXES, param_init
from flexvision.layers.windows import pad_to_multiple

RESIZE_METHODS = ("big_vision", "timm")
_KERNELS_1D = ("tf_bilinear", "torch_bilinear", "jax_linear", "torch_bicubic_aa", "torch_bicubic")


def to_pair(value: int | Sequence[int], what: str = "size", minimum: int = 1) -> tuple[int, int]:
    """``7`` -> ``(7, 7)``; ``(7, 5)`` -> ``(7, 5)``: the one int-or-pair helper of flexvision.

    ValueError for anything else (floats, bools, other lengths) or for entries below
    ``minimum`` (1 for sizes; 0 where zero is meaningful, e.g. padding).
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (isinstance(value, Sequence) and len(value) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        pair = (int(value[0]), int(value[1]))
    else:
        kind = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{what} must be a {kind} int or a pair of {kind} ints (height, width), "
                         f"got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{what} must be {'positive' if minimum == 1 else f'>= {minimum}'}, "
                         f"got {value!r}")
    return pair


def _check_method(method: str) -> None:
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r} is unknown; accepted: {RESIZE_METHODS} "
                         f"(which library's interpolation to reproduce)")


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys (1981) cubic convolution kernel with parameter ``a`` (PIL and torch-aa: a = -0.5)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def _read_only(array: np.ndarray) -> np.ndarray:
    """Marks a cached array read-only: every caller of the cache shares it."""
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=None)
def resize_matrix_1d(in_size: int, out_size: int, kernel: str) -> np.ndarray:
    """(out_size, in_size) float64 matrix M with ``resize(x) == M @ x`` along one axis.

    kernel:
      ``"tf_bilinear"``: TF's ResizeBilinear with half_pixel_centers (tf.image.resize bilinear,
        no antialias): source coordinate s = (i + 0.5) * in/out - 0.5, taps floor(s) and ceil(s)
        clamped to [0, in - 1], weights 1 - frac(s) and frac(s).
      ``"torch_bilinear"``: torch ``F.interpolate(mode="linear"|"bilinear", align_corners=False)``
        without antialias (UpSampleKernel.cpp: s clamped at 0, taps floor(s) and floor(s) + 1
        clamped at in - 1). The same matrix as ``"tf_bilinear"``: both are half-pixel linear
        interpolation whose edge taps collapse onto the border pixel.
      ``"jax_linear"``: jax.image.resize 'linear', antialias=True (jax/_src/image/scale.py,
        compute_weight_mat): triangle kernel at |s - j| / max(in/out, 1), columns normalised to
        sum 1, outputs whose s lies outside [-0.5, in - 0.5] set to zero.
      ``"torch_bicubic_aa"``: torch's _upsample_bicubic2d_aa (UpSampleKernel.cpp,
        _compute_indices_min_size_weights_aa): centre c = (i + 0.5) * in/out, support
        2 * max(in/out, 1), weight of input j = cubic_{a=-0.5}((j + 0.5 - c) / max(in/out, 1))
        for taps inside the input, normalised to sum 1.
      ``"torch_bicubic"``: torch ``F.interpolate(mode="bicubic", align_corners=False)`` without
        antialias (upsample_bicubic2d): s = (i + 0.5) * in/out - 0.5, the four taps
        floor(s) - 1 .. floor(s) + 2 clamped to [0, in - 1], Keys' cubic with a = -0.75.

    Read-only (shared through the cache).
    """
    if kernel not in _KERNELS_1D:
        raise ValueError(f"unknown 1-D resize kernel {kernel!r}; accepted: {_KERNELS_1D}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    return _read_only(_resize_weights(in_size, out_size, kernel))


def _resize_weights(in_size: int, out_size: int, kernel: str) -> np.ndarray:
    """The matrix of :func:`resize_matrix_1d`, freshly computed."""
    scale = in_size / out_size
    out_idx = np.arange(out_size, dtype=np.float64)[:, None]
    in_idx = np.arange(in_size, dtype=np.float64)[None, :]
    rows = np.arange(out_size)
    if kernel in ("tf_bilinear", "torch_bilinear"):
        source = (out_idx[:, 0] + 0.5) * scale - 0.5
        lower_f = np.floor(source)
        frac = source - lower_f
        lower = np.clip(lower_f.astype(np.int64), 0, in_size - 1)
        upper = np.clip(np.ceil(source).astype(np.int64), 0, in_size - 1)
        matrix = np.zeros((out_size, in_size))
        np.add.at(matrix, (rows, lower), 1.0 - frac)
        np.add.at(matrix, (rows, upper), frac)
        return matrix
    if kernel == "torch_bicubic":
        source = (out_idx[:, 0] + 0.5) * scale - 0.5
        left = np.floor(source)
        matrix = np.zeros((out_size, in_size))
        for tap in range(-1, 3):
            weight = _keys_cubic(tap - (source - left), a=-0.75)
            index = np.clip(left.astype(np.int64) + tap, 0, in_size - 1)
            np.add.at(matrix, (rows, index), weight)
        return matrix
    stretch = max(scale, 1.0)
    if kernel == "jax_linear":
        source = (out_idx + 0.5) * scale - 0.5
        weights = _triangle((source - in_idx) / stretch)
        total = weights.sum(axis=1, keepdims=True)
        weights = np.where(np.abs(total) > 1000.0 * np.finfo(np.float32).eps,
                           weights / np.where(total != 0, total, 1.0), 0.0)
        inside = (source >= -0.5) & (source <= in_size - 0.5)
        return np.where(inside, weights, 0.0)
    centre = (out_idx + 0.5) * scale
    weights = _keys_cubic((in_idx + 0.5 - centre) / stretch, a=-0.5)
    total = weights.sum(axis=1, keepdims=True)
    return np.where(total != 0, weights / np.where(total != 0, total, 1.0), 0.0)


def _kernel_for(method: str, purpose: str) -> str:
    _check_method(method)
    if method == "timm":
        return "torch_bicubic_aa"
    return "tf_bilinear" if purpose == "patch" else "jax_linear"


@functools.lru_cache(maxsize=None)
def resize_matrix(old_hw: tuple[int, int], new_hw: tuple[int, int], kernel: str) -> np.ndarray:
    """(H'W', HW) float64 matrix B with ``vec(resize(x)) == B @ vec(x)`` (row-major vec).

    The 2-D resizes of TF, JAX and torch are separable, so B = kron(M_h, M_w).
    """
    return _read_only(np.kron(resize_matrix_1d(old_hw[0], new_hw[0], kernel),
                              resize_matrix_1d(old_hw[1], new_hw[1], kernel)))


@functools.lru_cache(maxsize=None)
def pi_resize_matrix(old_hw: tuple[int, int], new_hw: tuple[int, int], method: str) -> np.ndarray:
    """(P'^2, P^2) float64 matrix pinv(B^T) of FlexiViT's PI-resize (arXiv 2212.08013, eq. 6).

    B is the resize matrix of ``method``'s patch interpolation from ``old_hw`` to ``new_hw``.
    The resized kernel is ``w' = pinv(B^T) w``; when upsampling (B^T has full row rank),
    ``<x, w> == <B x, w'>`` for every patch x. B = kron(M_h, M_w) is separable, and the
    pseudo-inverse of a Kronecker product is the Kronecker product of the pseudo-inverses, so
    only the two small 1-D matrices are inverted.
    """
    old_hw, new_hw = to_pair(old_hw, "old patch size"), to_pair(new_hw, "new patch size")
    if old_hw == new_hw:
        return _read_only(np.eye(old_hw[0] * old_hw[1]))
    kernel = _kernel_for(method, "patch")
    rows = np.linalg.pinv(resize_matrix_1d(old_hw[0], new_hw[0], kernel).T)
    cols = np.linalg.pinv(resize_matrix_1d(old_hw[1], new_hw[1], kernel).T)
    return _read_only(np.kron(rows, cols))


def pi_resize_kernel(kernel_hwio: jax.Array, new_hw: int | Sequence[int], method: str
                     ) -> jax.Array:
    """PI-resizes a (P_h, P_w, C_in, C_out) patch-embedding kernel to ``new_hw`` taps.

    One matmul with the cached :func:`pi_resize_matrix`; differentiable in ``kernel_hwio``.
    """
    old_hw = tuple(int(s) for s in kernel_hwio.shape[:2])
    new_hw = to_pair(new_hw, "patch size")
    if old_hw == new_hw:
        return kernel_hwio
    matrix = jnp.asarray(pi_resize_matrix(old_hw, new_hw, method), jnp.float32)
    flat = kernel_hwio.reshape(old_hw[0] * old_hw[1], -1)
    resized = jnp.matmul(matrix.astype(flat.dtype), flat, precision=jax.lax.Precision.HIGHEST)
    return resized.reshape(*new_hw, *kernel_hwio.shape[2:])


@functools.lru_cache(maxsize=None)
def posemb_resize_matrix(old_grid: tuple[int, int], new_grid: tuple[int, int], method: str
                         ) -> np.ndarray:
    """(h'w', hw) float64 matrix resampling a row-major position-embedding grid (``method``'s
    posemb interpolation: timm bicubic-antialias, big_vision jax 'linear')."""
    old_grid, new_grid = to_pair(old_grid, "posemb grid"), to_pair(new_grid, "token grid")
    if old_grid == new_grid:
        return _read_only(np.eye(old_grid[0] * old_grid[1]))
    return resize_matrix(old_grid, new_grid, _kernel_for(method, "posemb"))


def resample_posemb(posemb: jax.Array, old_grid: int | Sequence[int],
                    new_grid: int | Sequence[int], num_prefix: int, method: str) -> jax.Array:
    """Resamples a (1, num_prefix + h*w, D) position embedding to a (h', w') grid.

    The first ``num_prefix`` entries (cls / dist / register tokens) are kept as they are; the
    grid entries are resampled with ``method``'s interpolation (timm resample_abs_pos_embed,
    big_vision flexi get_posemb). Returns (1, num_prefix + h'*w', D).
    """
    old_grid, new_grid = to_pair(old_grid, "posemb grid"), to_pair(new_grid, "token grid")
    expected = num_prefix + old_grid[0] * old_grid[1]
    if posemb.ndim != 3 or posemb.shape[1] != expected:
        raise ValueError(f"position embedding of shape {tuple(posemb.shape)} does not fit a "
                         f"{old_grid[0]}x{old_grid[1]} grid with {num_prefix} prefix entries: "
                         f"expected (batch, {expected}, width)")
    if old_grid == new_grid:
        return posemb
    prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
    matrix = jnp.asarray(posemb_resize_matrix(old_grid, new_grid, method), jnp.float32)
    grid = jnp.einsum("nm,bmd->bnd", matrix.astype(grid.dtype), grid,
                      precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([prefix, grid], axis=1)


# Feature maps and relative-position tables of the architectures ported from PyTorch


@functools.lru_cache(maxsize=None)
def nearest_source_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel of torch ``F.interpolate(size=..., mode="nearest")``:
    ``floor(dst * in / out)``. For ``out = in * 2**k`` this is ``floor(dst / 2**k)``, i.e.
    ``nn.Upsample(scale_factor=2**k, mode="nearest")`` (HRNet's fuse layers). Read-only int32."""
    indices = np.minimum(np.arange(out_size) * in_size // out_size, in_size - 1)
    return _read_only(indices.astype(np.int32))


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Nearest-neighbour resize of NHWC ``x`` to spatial ``size`` (torch "nearest" indexing).

    Exact integer factors repeat pixels (a broadcast, cheap on accelerators); other sizes gather
    rows and columns through :func:`nearest_source_indices`.
    """
    for axis, out_size in ((1, int(size[0])), (2, int(size[1]))):
        in_size = x.shape[axis]
        if out_size == in_size:
            continue
        if out_size % in_size == 0:
            x = jnp.repeat(x, out_size // in_size, axis=axis)
        else:
            x = jnp.take(x, nearest_source_indices(in_size, out_size), axis=axis)
    return x


@functools.lru_cache(maxsize=None)
def upsample_then_resize_matrix_1d(in_size: int, factor: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of mmseg's HRNet upward fuse along one axis: ``Upsample(
    scale_factor=factor, mode="bilinear", align_corners=False)`` to ``in_size * factor``, then
    ``resize(size=out_size, mode="bilinear", align_corners=False)`` (mmseg/models/backbones/
    hrnet.py ``HRModule.forward``), composed into one matrix. The second resize is the identity
    when ``out_size == in_size * factor``; otherwise (sizes that do not halve exactly) the two
    interpolations differ from one direct resize. Read-only (shared through the cache)."""
    upsampled = in_size * factor
    matrix = resize_matrix_1d(in_size, upsampled, "torch_bilinear")
    if out_size != upsampled:
        matrix = resize_matrix_1d(upsampled, out_size, "torch_bilinear") @ matrix
    return _read_only(np.array(matrix))


def upsample_then_resize_bilinear(x: jax.Array, factor: int, size: Sequence[int]) -> jax.Array:
    """NHWC ``x`` upsampled bilinearly by the integer ``factor`` and then resized bilinearly to
    spatial ``size`` (both torch ``align_corners=False``), as mmseg's HRNet fuse layers do: one
    matmul per axis with the cached :func:`upsample_then_resize_matrix_1d`."""
    (in_h, in_w), (out_h, out_w) = x.shape[1:3], (int(size[0]), int(size[1]))
    rows = jnp.asarray(upsample_then_resize_matrix_1d(in_h, int(factor), out_h), x.dtype)
    cols = jnp.asarray(upsample_then_resize_matrix_1d(in_w, int(factor), out_w), x.dtype)
    return jnp.einsum("oh,pw,bhwc->bopc", rows, cols, x)


def resize_bilinear(x: jax.Array, size: Sequence[int], precision=None) -> jax.Array:
    """Bilinear resize of NHWC ``x`` to spatial ``size``: torch ``F.interpolate(mode="bilinear",
    align_corners=False)``, one matmul per axis with the cached "torch_bilinear" matrices
    (``precision``: that of the matmuls, e.g. HIGHEST for parameters such as position
    embeddings)."""
    (in_h, in_w), (out_h, out_w) = x.shape[1:3], (int(size[0]), int(size[1]))
    if (in_h, in_w) == (out_h, out_w):
        return x
    rows = jnp.asarray(resize_matrix_1d(in_h, out_h, "torch_bilinear"), x.dtype)
    cols = jnp.asarray(resize_matrix_1d(in_w, out_w, "torch_bilinear"), x.dtype)
    return jnp.einsum("oh,pw,bhwc->bopc", rows, cols, x, precision=precision)


def bilinear_resize_kernel(kernel_hwio: jax.Array, new_patch: int) -> jax.Array:
    """The naive alternative to :func:`pi_resize_kernel`: resize a patch-embedding kernel
    (kh, kw, in, out) to ``new_patch`` x ``new_patch`` like an image (bilinear, no antialias).
    Token norms then scale with the patch area, which PI-resize avoids (FlexiViT, arXiv
    2212.08013, Sec. 3.4); kept for that comparison (experiments/patch_size_sweep.py)."""
    return jax.image.resize(kernel_hwio, (new_patch, new_patch, *kernel_hwio.shape[2:]),
                            "bilinear", antialias=False)


def resize_images(images: jax.Array, size: int | Sequence[int] | None) -> jax.Array:
    """NHWC ``images`` resized to ``size`` (an int for a square, or (height, width); None or the
    current size: unchanged) with ``jax.image.resize(method="bilinear")``, which antialiases
    when shrinking. The resize of whole images outside the model: eval images to another
    resolution, a distillation teacher's input to its own resolution."""
    if size is None:
        return images
    height, width = to_pair(size, "image size")
    if images.shape[1:3] == (height, width):
        return images
    return jax.image.resize(images, (images.shape[0], height, width, images.shape[3]),
                            method="bilinear")


def least_squares_source(matrix: np.ndarray, target: jax.Array) -> jax.Array:
    """The ``source`` [N, ...] with ``matrix @ source == target`` [M, ...] along the leading axis
    (``matrix`` [M, N], e.g. a :func:`pi_resize_matrix` or :func:`posemb_resize_matrix`): the
    minimum-norm solution when one exists, else the least-squares fit, through the
    Moore-Penrose pseudo-inverse (computed once in NumPy, applied at HIGHEST precision).

    Distillation uses it to store a teacher's patch kernel / position embedding in a student
    whose own resize to the teacher's sizes then reproduces the teacher's.
    """
    solve = np.linalg.pinv(np.asarray(matrix)).astype(np.float32)
    flat = target.reshape(target.shape[0], -1)
    return jnp.matmul(jnp.asarray(solve), flat, precision=jax.lax.Precision.HIGHEST
                      ).reshape(solve.shape[0], *target.shape[1:])


def resize_rel_pos_table(table: jax.Array, length: int) -> jax.Array:
    """Resizes a (L, head_dim) relative-position table to ``length`` rows by linear interpolation
    (MViTv2; detectron2 / MMPretrain ``get_rel_pos``: tables trained at one resolution serve any
    other). When ``length == L`` the table is returned unchanged (the interpolation is the
    identity)."""
    if table.shape[0] == length:
        return table
    matrix = jnp.asarray(resize_matrix_1d(table.shape[0], length, "torch_bilinear"), jnp.float32)
    return jnp.einsum("nl,lc->nc", matrix, table.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).astype(table.dtype)


def resize_relative_position_bias_table(table: np.ndarray, new_window: tuple[int, int]
                                        ) -> np.ndarray:
    """Resamples a square Swin bias table ((2M-1)^2, heads) to ``new_window``: bicubic
    interpolation of its (2M-1) x (2M-1) offset grid per head, as the official Swin
    ``load_pretrained`` and timm's ``resize_rel_pos_bias_table_simple`` do (torch bicubic,
    align_corners=False). Runs once, at import time of a checkpoint, in float64 NumPy."""
    table = np.asarray(table, np.float64)
    num_offsets, heads = table.shape
    side = int(round(num_offsets ** 0.5))
    if side * side != num_offsets or side % 2 == 0:
        raise ValueError(f"relative position bias table of {num_offsets} rows is not a square "
                         "(2M-1) x (2M-1) grid; only square source windows can be resized")
    out_h, out_w = 2 * new_window[0] - 1, 2 * new_window[1] - 1
    grid = table.T.reshape(heads, side, side)
    resized = np.einsum("oh,chw,pw->cop", resize_matrix_1d(side, out_h, "torch_bicubic"), grid,
                        resize_matrix_1d(side, out_w, "torch_bicubic"))
    return resized.reshape(heads, out_h * out_w).T.astype(np.float32)


def check_static(value, what: str) -> None:
    """ValueError unless ``value`` (a call-time size such as ``patch_size``) is concrete.

    ``jax.jit(model.apply)(v, x, patch_size=8)`` traces the 8; it sets array shapes, so it must
    be a Python int at trace time: the error says to mark the argument static.
    """
    values = value if isinstance(value, Sequence) else (value,)
    if any(isinstance(v, jax.core.Tracer) for v in (value, *values)):
        raise ValueError(f"{what} is a traced value ({type(value).__name__}) but sets array "
                         f"shapes, so it must be a static Python int or pair: under jax.jit mark "
                         f"it static, e.g. jax.jit(model.apply, static_argnames=('{what}',)), or "
                         f"bind it with functools.partial(model.apply, {what}=...)")


def check_patchable(image_hw: Sequence[int], patch_hw: tuple[int, int]) -> tuple[int, int]:
    """The token grid (H / P_h, W / P_w); ValueError unless the patch size tiles the image.

    Nothing is cropped or padded here: an image the patch does not tile is an error that names
    the patch sizes that would tile it (FlexiPatchEmbed pads first when ``dynamic_img_pad``).
    """
    height, width = int(image_hw[0]), int(image_hw[1])
    if height < patch_hw[0] or width < patch_hw[1]:
        raise ValueError(f"image of {height}x{width} pixels is smaller than one "
                         f"{patch_hw[0]}x{patch_hw[1]} patch; use a larger image or a patch size "
                         f"of at most {height}x{width}")
    if height % patch_hw[0] or width % patch_hw[1]:
        common = [p for p in range(1, min(height, width) + 1) if height % p == 0 and width % p == 0]
        raise ValueError(f"patch size {patch_hw[0]}x{patch_hw[1]} does not tile a {height}x{width} "
                         f"image; square patch sizes that tile it: {common}. Resize or crop the "
                         f"image to a multiple of the patch size, or build the ViT with "
                         f"dynamic_img_pad=True to zero-pad it")
    return height // patch_hw[0], width // patch_hw[1]


class FlexiPatchEmbed(nn.Module):
    """Patch embedding whose patch size is chosen per call (FlexiViT, arXiv 2212.08013, Sec. 3.4).

    Stores ONE (P_h, P_w, C_in, width) kernel at the base ``patch_size``; a call with another
    (static) patch size PI-resizes it with ``resize``'s interpolation (:func:`pi_resize_kernel`)
    and embeds non-overlapping patches. Returns the (B, H/P'_h, W/P'_w, width) token map.
    ``dynamic_img_pad`` zero-pads images the patch does not tile at the bottom and right (timm's
    PatchEmbed ``dynamic_img_pad``: a ceil(H / P_h) x ceil(W / P_w) grid) instead of raising.
    """

    width: int
    patch_size: tuple[int, int] = (16, 16)
    in_chans: int = 3
    resize: str = "timm"
    use_bias: bool = True
    dynamic_img_pad: bool = False
    dtype: jax.typing.DTypeLike | None = None
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, images: jax.Array, patch_size: int | Sequence[int] | None = None
                 ) -> jax.Array:
        base = to_pair(self.patch_size, "base patch_size")
        check_static(patch_size, "patch_size")
        patch = base if patch_size is None else to_pair(patch_size, "patch_size")
        if images.ndim != 4 or images.shape[-1] != self.in_chans:
            raise ValueError(f"images must be NHWC with {self.in_chans} channels, i.e. shape "
                             f"(batch, height, width, {self.in_chans}); got shape "
                             f"{tuple(images.shape)}")
        if self.dynamic_img_pad:
            images = pad_to_multiple(images, patch)
        check_patchable(images.shape[1:3], patch)
        kernel = self.param("kernel", param_init(self.kernel_init, CONV_AXES),
                            (*base, self.in_chans, self.width), jnp.float32)
        kernel = pi_resize_kernel(kernel, patch, self.resize)
        dtype = self.dtype or jnp.float32
        tokens = jax.lax.conv_general_dilated(
            images.astype(dtype), kernel.astype(dtype), window_strides=patch, padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            bias = self.param("bias", param_init(nn.initializers.zeros, ("conv_out",)),
                              (self.width,), jnp.float32)
            tokens = tokens + bias.astype(dtype)
        return tokens
