"""Necks of Mask R-CNN: the feature pyramid network and ViTDet's simple feature pyramid.

Both turn a backbone's NHWC maps into a pyramid of equal-width maps, finest first, named
``'0'``, ``'1'``, ... and ``'pool'`` (the extra max-pooled level the RPN reads and the RoI
heads do not), and both are configured from the backbone's ``feature_info`` alone
(:func:`pyramid_inputs`, :func:`build_neck`), so one neck class serves every backbone family.

* :class:`FPN` (Lin et al. 2017, arXiv 1612.03144): torchvision ``ops/feature_pyramid_network.py``
  ``FeaturePyramidNetwork`` + ``LastLevelMaxPool``: a 1x1 lateral conv per input, top-down
  nearest upsampling to the exact lateral size (torch "nearest" indexing, so maps of any size
  compose: ceil-rounded stride-2 maps included), a 3x3 output conv per level, and ``'pool'`` =
  ``max_pool2d(kernel 1, stride 2)`` of the coarsest output (ceil(h / 2) x ceil(w / 2)).
  For Swin, MViTv2, HRNet, CycleMLP, AS-MLP.
* :class:`SimpleFeaturePyramid` (ViTDet, Li et al. 2022, arXiv 2203.16527, sec. 3; detectron2
  ``modeling/backbone/vit.py`` ``SimpleFeaturePyramid``): from the last ViT map at stride 16,
  scale 4: deconv 2x2/2, LayerNorm, GELU, deconv 2x2/2; scale 2: one deconv; scale 1: identity;
  scale 1/2: max-pool 2x2/2; each then a 1x1 conv + LayerNorm and a 3x3 conv + LayerNorm
  (no conv bias), plus the same ``'pool'`` level. For the ViT family (ViT, DeiT, FlexiViT).
  A token map whose stride is not ``base_stride`` (FlexiViT at another patch size) is first
  resampled to the stride-``base_stride`` grid with the cached resize matrices of
  ``layers/flex.py`` (``jax_linear``: antialiased linear, as big_vision resizes position
  embeddings), so one set of neck weights serves every patch size.
  Deviation from detectron2, for inputs whose grid is odd: the scale-1/2 max-pool rounds up
  (ceil(h / 2), padding with -inf) like the hierarchical families' maps; identical on even grids.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexvision.layers import common
from flexvision.layers.flex import resize_matrix_1d, resize_nearest, to_pair
from flexvision.models.contract import FeatureInfo

#: torchvision's FPN init: kaiming_uniform_(a=1) = uniform(+-sqrt(3 / fan_in)), bias 0.
_FPN_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
#: detectron2's c2_msra_fill for the ViTDet convs: kaiming_normal_(fan_out, relu).
_MSRA_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
SFP_SCALES = (4.0, 2.0, 1.0, 0.5)


def pyramid_inputs(info: Sequence[FeatureInfo], min_stride: int = 4, max_stride: int = 32
                   ) -> tuple[FeatureInfo, ...]:
    """The maps an FPN reads: for every distinct stride in [min_stride, max_stride] the LAST
    map listed at that stride (a stage's output, not the stem before it), finest first.

    Raises ValueError when strides are not square or no map lies in the range."""
    chosen: dict[int, FeatureInfo] = {}
    for item in info:
        sh, sw = item.stride
        if sh != sw:
            raise ValueError(f"the FPN needs square strides, map {item.name!r} has {item.stride}")
        if min_stride <= sh <= max_stride:
            chosen[sh] = item
    if not chosen:
        raise ValueError(f"no backbone map has a stride in [{min_stride}, {max_stride}]; "
                         f"feature_info gives {[(i.name, i.stride) for i in info]}")
    return tuple(chosen[s] for s in sorted(chosen))


def _level_names(count: int) -> tuple[str, ...]:
    return (*(str(i) for i in range(count)), "pool")


def _max_pool_1_2(x: jax.Array) -> jax.Array:
    """torchvision LastLevelMaxPool: max_pool2d(kernel 1, stride 2) = every other cell."""
    return x[:, ::2, ::2]


class FPN(nn.Module):
    """Feature pyramid network over backbone maps chosen by :func:`pyramid_inputs`.

    Fields: ``in_features`` (names of the backbone maps read, finest first), ``in_strides``
    (their strides), ``out_channels``. Call with the backbone's feature dict (or the list of
    those maps); returns an ordered dict {'0': (B, h0, w0, C), ..., 'pool': ...} of the
    ``len(in_features) + 1`` levels. Parameters: ``inner_{i}`` (1x1) and ``layer_{i}`` (3x3),
    torchvision's ``inner_blocks.{i}.0`` and ``layer_blocks.{i}.0``.
    """

    in_features: Sequence[str]
    in_strides: Sequence[int]
    out_channels: int = 256
    dtype: Any = None

    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """Output levels' names, strides and channels, from the configuration alone."""
        strides = [int(s) for s in self.in_strides]
        strides.append(strides[-1] * 2)
        return tuple(FeatureInfo(n, (s, s), self.out_channels)
                     for n, s in zip(_level_names(len(self.in_strides)), strides))

    @nn.compact
    def __call__(self, features) -> dict[str, jax.Array]:
        maps = ([features[n] for n in self.in_features] if isinstance(features, dict)
                else list(features))
        if len(maps) != len(self.in_features):
            raise ValueError(f"FPN reads {len(self.in_features)} maps ({list(self.in_features)}),"
                             f" got {len(maps)}")
        conv = lambda k, name: common.conv(  # noqa: E731
            self.out_channels, (k, k), padding=((k // 2, k // 2),) * 2, kernel_init=_FPN_INIT,
            dtype=self.dtype, name=name)
        last = conv(1, f"inner_{len(maps) - 1}")(maps[-1])
        results = [conv(3, f"layer_{len(maps) - 1}")(last)]
        for i in range(len(maps) - 2, -1, -1):
            lateral = conv(1, f"inner_{i}")(maps[i])
            last = lateral + resize_nearest(last, lateral.shape[1:3]).astype(lateral.dtype)
            results.insert(0, conv(3, f"layer_{i}")(last))
        results.append(_max_pool_1_2(results[-1]))
        return collections.OrderedDict(zip(_level_names(len(maps)), results))


def resample_tokens(x: jax.Array, stride: int, base_stride: int) -> jax.Array:
    """A token map (B, h, w, C) at ``stride`` pixels per token resampled to the grid of
    ``base_stride`` covering the same pixels, (B, h*stride/base, w*stride/base, C), by the
    cached "jax_linear" matrices of :func:`flexvision.layers.flex.resize_matrix_1d` (one matmul
    per axis). Identity when the strides agree.

    Raises ValueError when the covered extent (h * stride) is not a multiple of base_stride
    (pad the image to a multiple of lcm(stride, base_stride))."""
    if stride == base_stride:
        return x
    h, w = x.shape[1:3]
    if (h * stride) % base_stride or (w * stride) % base_stride:
        raise ValueError(f"a {h}x{w} token map at stride {stride} covers {h * stride}x"
                         f"{w * stride} pixels, not a multiple of the neck's stride "
                         f"{base_stride}: pad the images to a multiple of "
                         f"{np.lcm(stride, base_stride)}")
    out_h, out_w = h * stride // base_stride, w * stride // base_stride
    rows = jnp.asarray(resize_matrix_1d(h, out_h, "jax_linear"), x.dtype)
    cols = jnp.asarray(resize_matrix_1d(w, out_w, "jax_linear"), x.dtype)
    return jnp.einsum("oh,pw,bhwc->bopc", rows, cols, x)


class _Deconv2x2(nn.Module):
    """ConvTranspose2d(kernel 2, stride 2): (B, h, w, Cin) -> (B, 2h, 2w, features), with bias
    (:func:`flexvision.layers.common.conv_transpose_2x2`)."""

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", common.param_init(_MSRA_INIT, common.CONV_AXES),
                            (2, 2, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", common.param_init(nn.initializers.zeros, ("conv_out",)),
                          (self.features,), jnp.float32)
        return common.conv_transpose_2x2(x, kernel, bias, self.dtype)


def _max_pool_2x2_ceil(x: jax.Array) -> jax.Array:
    """MaxPool 2x2 stride 2 rounding up (odd edges padded with -inf): ceil(h/2) x ceil(w/2)."""
    h, w = x.shape[1:3]
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding=((0, h % 2), (0, w % 2)))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one ViT map (see the module docstring).

    Fields: ``in_feature`` (the backbone map read, 'feature_map'), ``embed_dim`` (its channels),
    ``base_stride`` (16: the stride the scales are relative to), ``scales``, ``out_channels``.
    Call ``(features, stride)``: the feature dict (or the map itself) and the map's stride in
    pixels (the patch size; static). Returns {'0': stride base/4, ..., '3': base*2, 'pool':
    base*4} for the default scales. Parameters per scale i: ``stage{i}_up{j}`` (deconvs),
    ``stage{i}_up_norm``, ``stage{i}_lateral`` + ``_lateral_norm``, ``stage{i}_output`` +
    ``_output_norm`` (detectron2's simfp_{k}.{j}, ``simfp_{k}.{...}``).
    """

    in_feature: str = "feature_map"
    embed_dim: int = 768
    base_stride: int = 16
    scales: Sequence[float] = SFP_SCALES
    out_channels: int = 256
    dtype: Any = None

    def feature_info(self) -> tuple[FeatureInfo, ...]:
        strides = [int(self.base_stride / s) for s in self.scales]
        strides.append(strides[-1] * 2)
        return tuple(FeatureInfo(n, (s, s), self.out_channels)
                     for n, s in zip(_level_names(len(self.scales)), strides))

    @nn.compact
    def __call__(self, features, stride: int | Sequence[int]) -> dict[str, jax.Array]:
        x = features[self.in_feature] if isinstance(features, dict) else features
        sh, sw = to_pair(stride, "stride")
        if sh != sw:
            raise ValueError(f"SimpleFeaturePyramid needs square patches, got stride {(sh, sw)}")
        x = resample_tokens(x, sh, int(self.base_stride))
        dim = self.embed_dim
        norm = lambda name: common.layer_norm(1e-6, dtype=self.dtype, name=name)  # noqa: E731
        results = []
        for i, scale in enumerate(self.scales):
            y = x
            if scale == 4.0:
                y = _Deconv2x2(dim // 2, self.dtype, name=f"stage{i}_up0")(y)
                y = nn.gelu(norm(f"stage{i}_up_norm")(y), approximate=False)
                y = _Deconv2x2(dim // 4, self.dtype, name=f"stage{i}_up1")(y)
            elif scale == 2.0:
                y = _Deconv2x2(dim // 2, self.dtype, name=f"stage{i}_up0")(y)
            elif scale == 0.5:
                y = _max_pool_2x2_ceil(y)
            elif scale != 1.0:
                raise ValueError(f"scale {scale} is not supported; accepted: {SFP_SCALES}")
            y = common.conv(self.out_channels, (1, 1), use_bias=False, kernel_init=_MSRA_INIT,
                            dtype=self.dtype, name=f"stage{i}_lateral")(y)
            y = norm(f"stage{i}_lateral_norm")(y)
            y = common.conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                            kernel_init=_MSRA_INIT, dtype=self.dtype, name=f"stage{i}_output")(y)
            results.append(norm(f"stage{i}_output_norm")(y))
        results.append(_max_pool_1_2(results[-1]))
        return collections.OrderedDict(zip(_level_names(len(self.scales)), results))


def build_neck(backbone: nn.Module, out_channels: int = 256, dtype: Any = None, **kwargs
               ) -> nn.Module:
    """The neck for ``backbone`` from its ``feature_info`` alone: a SimpleFeaturePyramid on the
    ViT family's 'feature_map' (a single stride, ``flex_kwargs`` with 'patch_size'), an FPN on
    :func:`pyramid_inputs` otherwise. ``kwargs`` go to the neck (e.g. ``base_stride``)."""
    info = backbone.feature_info()
    if len({i.stride for i in info}) == 1 and "patch_size" in getattr(backbone, "flex_kwargs", ()):
        last = info[-1]
        return SimpleFeaturePyramid(in_feature=last.name, embed_dim=last.channels,
                                    out_channels=out_channels, dtype=dtype, **kwargs)
    chosen = pyramid_inputs(info, **kwargs)
    return FPN(in_features=tuple(i.name for i in chosen),
               in_strides=tuple(i.stride[0] for i in chosen), out_channels=out_channels,
               dtype=dtype)
