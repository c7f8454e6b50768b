"""Swin Transformer at any input size (Liu et al. 2021, arXiv 2103.14030).

One set of weights runs at any H x W with the semantics of the original authors' dense-prediction
code (SwinTransformer/Swin-Transformer-Object-Detection, also MMPretrain):

* the image is zero-padded at the bottom/right to a multiple of the patch size;
* in every block the (normalized) map is zero-padded to a multiple of the window, THEN cyclically
  shifted, so the wrap-around never brings tokens from opposite borders into one region; the
  shifted-window mask (-100 between regions) is built for the padded map; the output is shifted
  back and cropped to the map;
* patch merging zero-pads odd sizes and concatenates x0, x1, x2, x3 = x[0::2, 0::2],
  x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2].

timm rolls before padding; at sizes that need no padding both orders agree, so 224 x 224 (and any
size whose stage maps are multiples of the window) is identical to timm and the official
classification model.

Windows and shifts, in two steps:

1. At the design size ``img_size`` (timm's ``img_size``: 224, or 384 for the window-12 models) each
   block's window and shift are fixed as in timm and the official classification model: along an
   axis where a stage's design map is no longer than the window M, the window shrinks to it and
   that axis is not shifted (stage 4 of a 224 x 224 window-7 model: one 7 x 7 window, no shift);
   elsewhere window M and, in every second block, shift M // 2 (:func:`design_window_and_shift`).
   The bias tables have timm's shapes, and any input runs with these windows and shifts, exactly as
   timm with ``dynamic_img_size=True`` (so stage 4 is never shifted, e.g. at 256 x 320 where it is
   8 x 10, as in the reference fixture).
2. At run time, along an axis where the actual map is no longer than the block's window (a small
   input), that axis is one window of the map's length, is not shifted and gets no padding tokens;
   the bias of each offset is read from the centre of the learned table (the same parameter as at
   full window size), so a map of at most M x M gets plain global attention with relative position
   bias. This is the official rule of step 1 applied to the actual map; it is what the reference
   does whenever the map equals the window, and is well defined at every size. (The detection code
   would instead pad a small map up to one M x M window and let the zero padding tokens take part
   in attention, and shift it even when that splits the only window.) See :func:`window_and_shift`.

Parameters follow timm's names (timm >= 0.9: ``layers.N.downsample`` at the start of stages 2-4),
so ``flexvision.convert.from_timm`` maps a timm state dict one to one.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexvision.layers.attention import _attention_with_dropout, dot_product_attention
from flexvision.layers.attention import relative_position_bias
from flexvision.layers.common import conv, dense, layer_norm, param_init
from flexvision.layers.drop import DropPath, drop_path_rates
from flexvision.layers.flex import to_pair
from flexvision.layers.mlp import Mlp
from flexvision.layers.windows import (pad_to_multiple, shifted_window_mask, window_partition,
                                       window_reverse)
from flexvision.models.contract import Backbone, FeatureInfo, stage_strides
from flexvision.registry import register_model

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used by the reference


def stage_windows(window_size: Any, num_stages: int) -> list[tuple[int, int]]:
    """Per-stage (wh, ww) windows from an int, an (h, w) pair (every stage) or one entry per stage
    (timm's convention)."""
    if isinstance(window_size, int):
        return [(window_size, window_size)] * num_stages
    window_size = tuple(window_size)
    if len(window_size) == 2 and all(isinstance(w, int) for w in window_size):
        return [to_pair(window_size, "window_size")] * num_stages
    if len(window_size) != num_stages:
        raise ValueError(f"window_size {window_size!r}: give an int, an (h, w) pair or one entry "
                         f"per stage ({num_stages} stages)")
    return [to_pair(w, "window_size") for w in window_size]


def design_window_and_shift(resolution: tuple[int, int], window: tuple[int, int], shifted: bool
                            ) -> tuple[tuple[int, int], tuple[int, int]]:
    """A block's (window, shift) at the resolution the model is built for (timm's
    ``_calc_window_shift``; the official classification model does the same with min(H, W)).

    Per axis: if the stage's design resolution is no longer than the window M, the window shrinks
    to it and that axis is not shifted (stage 4 of a 224 x 224 window-7 model: 7 x 7, no shift);
    otherwise window M and, in shifted blocks, shift M // 2.
    """
    eff_window = tuple(min(res, win) for res, win in zip(resolution, window))
    eff_shift = tuple(win // 2 if (shifted and res > win) else 0
                      for res, win in zip(resolution, window))
    return eff_window, eff_shift


@functools.lru_cache(maxsize=None)
def window_and_shift(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]
                     ) -> tuple[tuple[int, int], tuple[int, int]]:
    """A block's (window, shift) on an actual ``height`` x ``width`` map, from its design ones.

    Per axis: a map no longer than the window is a single window of the map's length, not shifted
    (global attention along that axis, no padding tokens); a longer axis keeps the design window
    and shift, the map being padded to a multiple of the window before the shift.
    """
    sizes = (height, width)
    eff_window = tuple(min(size, win) for size, win in zip(sizes, window))
    eff_shift = tuple(0 if size <= win else s for size, win, s in zip(sizes, window, shift))
    return eff_window, eff_shift


class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias (Swin eq. 4):
    softmax(Q K^T / sqrt(d) + B + mask) V inside each window, B from a learned
    ((2M-1) * (2M-1), heads) table (timm's ``relative_position_bias_table``)."""

    num_heads: int
    window_size: tuple[int, int]
    qkv_bias: bool = True
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, windows: jax.Array, window: tuple[int, int], mask: jax.Array | None = None,
                 *, train: bool = False) -> jax.Array:
        """``windows`` (B, num_windows, N, C) with N = window[0] * window[1] <= the table's window;
        ``mask`` (num_windows, N, N) or None."""
        batch, num_windows, tokens, width = windows.shape
        head_dim = width // self.num_heads
        win_h, win_w = self.window_size
        table = self.param(
            "relative_position_bias_table",
            param_init(nn.initializers.truncated_normal(0.02), ("relpos", "heads")),
            ((2 * win_h - 1) * (2 * win_w - 1), self.num_heads), jnp.float32)
        bias = relative_position_bias(table, window, self.window_size)[None]  # 1, heads, N, N
        if mask is not None:  # the per-window mask cannot broadcast over batch * windows
            bias = bias[None] + jnp.asarray(mask)[None, :, None]
            bias = jnp.broadcast_to(bias, (batch, num_windows, self.num_heads, tokens, tokens))
            bias = bias.reshape(batch * num_windows, self.num_heads, tokens, tokens)

        x = windows.reshape(batch * num_windows, tokens, width)
        qkv = dense(3 * width, axes=("embed", "mlp"), use_bias=self.qkv_bias, dtype=self.dtype,
                    name="qkv")(x)
        qkv = qkv.reshape(batch * num_windows, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if train and self.attn_dropout > 0.0:
            out = _attention_with_dropout(q, k, v, bias, self.attn_dropout,
                                          self.make_rng("dropout"))
        else:
            out = dot_product_attention(q, k, v, bias=bias, train=train)
        out = out.reshape(batch * num_windows, tokens, width)
        out = dense(width, axes=("mlp", "embed"), dtype=self.dtype, name="proj")(out)
        out = nn.Dropout(self.proj_dropout, deterministic=not train)(out)
        return out.reshape(batch, num_windows, tokens, width)


class SwinBlock(nn.Module):
    """(Shifted-)window attention block, pre-norm: x + W-MSA(LN(x)), then x + MLP(LN(x)).

    ``window_size`` and ``shift_size`` are the block's design values
    (:func:`design_window_and_shift`); the bias table is made for ``window_size``.
    """

    num_heads: int
    window_size: tuple[int, int]
    shift_size: tuple[int, int]
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        _, height, width, channels = x.shape
        window, shift = window_and_shift(height, width, self.window_size, self.shift_size)

        y = layer_norm(LAYER_NORM_EPS, dtype=self.dtype, name="norm1")(x)
        y = pad_to_multiple(y, window)  # pad, THEN roll (official detection code)
        padded_h, padded_w = y.shape[1:3]
        if any(shift):
            y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2))
        mask = shifted_window_mask(padded_h, padded_w, window, shift) if any(shift) else None
        windows = window_partition(y, window)
        windows = WindowAttention(self.num_heads, self.window_size, self.qkv_bias,
                                  self.attn_dropout, self.dropout, dtype=self.dtype,
                                  name="attn")(windows, window, mask, train=train)
        y = window_reverse(windows, window, padded_h, padded_w)
        if any(shift):
            y = jnp.roll(y, shift, axis=(1, 2))
        y = y[:, :height, :width]
        x = x + DropPath(self.drop_path)(y, train=train)

        y = layer_norm(LAYER_NORM_EPS, dtype=self.dtype, name="norm2")(x)
        y = Mlp(int(channels * self.mlp_ratio), dropout=self.dropout, dtype=self.dtype,
                name="mlp")(y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        return nn.with_logical_constraint(x, ("batch", None, None, "embed"))


class PatchMerging(nn.Module):
    """2x2 patch merging (Swin Sec. 3.1): zero-pad odd sizes, concatenate x0..x3 in the official
    order [0::2, 0::2], [1::2, 0::2], [0::2, 1::2], [1::2, 1::2], LayerNorm, linear 4C -> C_out."""

    out_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = pad_to_multiple(x, (2, 2))
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = layer_norm(LAYER_NORM_EPS, dtype=self.dtype, name="norm")(x)
        return dense(self.out_dim, axes=("mlp", "embed"), use_bias=False, dtype=self.dtype,
                     name="reduction")(x)


class SwinStage(nn.Module):
    """Optional patch merging (stages 2-4) followed by blocks alternating W-MSA and SW-MSA.

    ``resolution`` is the stage's map size at the model's design ``img_size``.
    """

    dim: int
    depth: int
    num_heads: int
    window_size: tuple[int, int]
    resolution: tuple[int, int]
    downsample: bool
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_paths: tuple[float, ...] = ()
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if self.downsample:
            x = PatchMerging(self.dim, dtype=self.dtype, name="downsample")(x)
        for i in range(self.depth):
            window, shift = design_window_and_shift(self.resolution, self.window_size, i % 2 == 1)
            x = SwinBlock(self.num_heads, window, shift,
                          mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, dropout=self.dropout,
                          attn_dropout=self.attn_dropout,
                          drop_path=self.drop_paths[i] if self.drop_paths else 0.0,
                          dtype=self.dtype, name=f"blocks_{i}")(x, train=train)
        return x


class SwinTransformer(Backbone):
    """Swin Transformer classifier (timm's ``SwinTransformer``), NHWC, any input size.

    ``img_size`` is the design resolution (timm's ``img_size``): it fixes each block's window and
    shift as in timm (a stage whose design map is no larger than the window is not shifted) and
    so the shape of the bias tables; any other size runs with those windows (module docstring).

    ``__call__`` returns logits; ``features`` returns {'stage1'..'stage4': NHWC maps (before the
    final norm), 'pre_logits': pooled, normalized features}. A map of stride s on an H x W input
    is ceil(H / s) x ceil(W / s) (the image and odd maps are zero-padded).
    """

    num_classes: int = 1000
    img_size: int | Sequence[int] = 224
    in_chans: int = 3
    patch_size: int = 4
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int | Sequence[int] = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    dtype: Any = None

    def setup(self):
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} "
                             "must have one entry per stage")
        self._windows = stage_windows(self.window_size, len(self.depths))
        self.patch_embed_proj = conv(self.embed_dim, (self.patch_size,) * 2,
                                     strides=self.patch_size, padding="VALID", dtype=self.dtype,
                                     name="patch_embed_proj")
        self.patch_embed_norm = layer_norm(LAYER_NORM_EPS, dtype=self.dtype,
                                           name="patch_embed_norm")
        grid = tuple(size // self.patch_size for size in to_pair(self.img_size, "img_size"))
        rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
        stages, start = [], 0
        for i, depth in enumerate(self.depths):
            stages.append(SwinStage(
                self.embed_dim * 2 ** i, depth, self.num_heads[i], self._windows[i],
                resolution=(grid[0] // 2 ** i, grid[1] // 2 ** i), downsample=i > 0,
                mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                dropout=self.proj_drop_rate, attn_dropout=self.attn_drop_rate,
                drop_paths=tuple(rates[start:start + depth]), dtype=self.dtype,
                name=f"layers_{i}"))
            start += depth
        self.stages = stages
        self.norm = layer_norm(LAYER_NORM_EPS, dtype=self.dtype, name="norm")
        self.head_dropout = nn.Dropout(self.drop_rate)
        self.head = (dense(self.num_classes, axes=("embed", "classes"), dtype=self.dtype,
                           name="head") if self.num_classes > 0 else None)

    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """'stage1'..'stageN' at strides patch_size * 2**i with embed_dim * 2**i channels."""
        strides = stage_strides(self.patch_size, len(self.depths))
        return tuple(FeatureInfo(f"stage{i + 1}", stride, self.embed_dim * 2 ** i)
                     for i, stride in enumerate(strides))

    def input_shape(self) -> tuple[int, int, int]:
        """``img_size``: the design size that fixes the windows and bias tables."""
        return (*to_pair(self.img_size, "img_size"), self.in_chans)

    def features(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """Stage maps 'stage1'..'stageN' (NHWC) and 'pre_logits' (B, C), as timm's
        ``forward_intermediates`` (stages) and ``forward_head(pre_logits=True)``."""
        self._check_inputs(images)
        x = pad_to_multiple(images, (self.patch_size, self.patch_size))
        x = self.patch_embed_norm(self.patch_embed_proj(x.astype(self.dtype or x.dtype)))
        x = nn.with_logical_constraint(x, ("batch", None, None, "embed"))
        out = collections.OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x, train=train)
            out[f"stage{i + 1}"] = x
        pooled = jnp.mean(self.norm(x), axis=(1, 2))
        out["pre_logits"] = pooled
        return out

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        pooled = self.features(images, train=train)["pre_logits"]
        if self.head is None:
            return pooled
        pooled = self.head_dropout(pooled, deterministic=not train)
        return self.head(pooled)


# timm's configurations (timm/models/swin_transformer.py); parameter counts in
# ../shared/fixtures/param_counts.json.
_VARIANTS = {
    "swin_tiny_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 6, 2),
                                         num_heads=(3, 6, 12, 24), window_size=7),
    "swin_small_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 18, 2),
                                          num_heads=(3, 6, 12, 24), window_size=7),
    "swin_base_patch4_window7_224": dict(embed_dim=128, depths=(2, 2, 18, 2),
                                         num_heads=(4, 8, 16, 32), window_size=7),
    "swin_base_patch4_window12_384": dict(img_size=384, embed_dim=128, depths=(2, 2, 18, 2),
                                          num_heads=(4, 8, 16, 32), window_size=12),
    "swin_large_patch4_window7_224": dict(embed_dim=192, depths=(2, 2, 18, 2),
                                          num_heads=(6, 12, 24, 48), window_size=7),
    "swin_large_patch4_window12_384": dict(img_size=384, embed_dim=192, depths=(2, 2, 18, 2),
                                           num_heads=(6, 12, 24, 48), window_size=12),
}

for _name, _config in _VARIANTS.items():
    register_model(_name, SwinTransformer, family="swin",
                   description=f"Swin Transformer {_name} (timm names and weights layout)",
                   **_config)
register_model("swin_micro", SwinTransformer, family="swin", tiny=True,
               description="micro Swin for CPU tests: width 16, window 4, designed for 32 px; "
                           "two blocks in stage 1 (its 8x8 map gets a shifted block), one after",
               img_size=32, embed_dim=16, depths=(2, 1, 1, 1), num_heads=(1, 1, 2, 2),
               window_size=4, drop_path_rate=0.0)
