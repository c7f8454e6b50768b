"""AS-MLP (Lian et al. 2022, "AS-MLP: An Axial Shifted MLP Architecture for Vision", ICLR).

A Swin-like hierarchy whose token mixing is the axial shift: after a channel projection, the
channels are split into ``shift_size`` groups that are moved by -shift_size//2 .. shift_size//2
pixels along W (one branch) and along H (the other), with zeros filling the vacated border;
each branch is mixed by a channel projection and the two are summed. Every normalisation is
GroupNorm with one group, i.e. over (H, W, C) of each image, as the official code's ``MyNorm``.

Names follow svip-lab/AS-MLP models/as_mlp.py (``axial_shift.conv1``, ``conv2_1`` (W shift),
``conv2_2`` (H shift), ``conv3``, ``norm1``, ``norm2``; ``downsample.norm``/``reduction``) so
:mod:`flexvision.convert.asmlp` maps checkpoints one to one.

Input sizes. The classification code needs the 4x4 patch grid to halve evenly three times; the
authors' detection backbone (svip-lab/AS-MLP-Object-Detection) lifts that by zero-padding the
image on the bottom/right to a multiple of the patch size and every odd map to an even size
before patch merging. ``pad_to_fit=True`` (the default) follows the detection backbone, so any
height and width works; on sizes the classification code accepts without flooring (multiples of
32 for patch 4) the two agree exactly. ``pad_to_fit=False`` is the classification code: the
patch embedding drops a remainder and an odd map before a merging raises ValueError.

    >>> model = flexvision.create_model("asmlp_tiny", num_classes=10)
    >>> logits = model.apply(variables, images)                   # NHWC, any H, W
    >>> maps = model.apply(variables, images, method="features")  # stage1..stage4, pre_logits
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexvision.layers.common import conv, dense, param_init
from flexvision.layers.drop import DropPath, drop_path_rates
from flexvision.layers.mlp import Mlp, gelu_exact
from flexvision.layers.shift import shift_channels
from flexvision.models.contract import Backbone, FeatureInfo, stage_strides
from flexvision.registry import register_model


@functools.lru_cache(maxsize=None)
def axial_shift_amounts(channels: int, shift_size: int) -> tuple[int, ...]:
    """Shift of each channel in AS-MLP's axial shift (Lian et al. 2022, "Axial Shift").

    Channels form contiguous groups of ``ceil(C / shift_size)`` (the last one smaller, and
    fewer than ``shift_size`` groups when C is small, as ``torch.chunk``); group ``g`` moves by
    ``g - shift_size // 2`` pixels: content at i goes to i + amount (official ``torch_shift``
    and CUDA ``Shift`` kernel).
    """
    group = math.ceil(channels / shift_size)
    return tuple(c // group - shift_size // 2 for c in range(channels))


def group_norm_one_group(dtype, name: str) -> nn.GroupNorm:
    """torch.nn.GroupNorm(1, C) (eps 1e-5): statistics over (H, W, C) of each image."""
    return nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                        name=name, scale_init=param_init(nn.initializers.ones, ("norm",)),
                        bias_init=param_init(nn.initializers.zeros, ("norm",)))


class AxialShift(nn.Module):
    """conv1 -> GN -> GELU -> {shift along W -> conv2_1, shift along H -> conv2_2} -> GELU each
    -> sum -> GN -> conv3 (official ``AxialShift``; the 1x1 convolutions are channel FCs)."""

    shift_size: int = 5
    use_bias: bool = True
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]

        def channel_fc(name, axes=("embed", "mlp")):
            return dense(channels, axes=axes, use_bias=self.use_bias, dtype=self.dtype, name=name)

        x = channel_fc("conv1")(x)
        x = gelu_exact(group_norm_one_group(self.dtype, "norm1")(x))
        amounts = axial_shift_amounts(channels, self.shift_size)
        along_w = gelu_exact(channel_fc("conv2_1")(shift_channels(x, amounts, axis=2)))
        along_h = gelu_exact(channel_fc("conv2_2")(shift_channels(x, amounts, axis=1)))
        x = group_norm_one_group(self.dtype, "norm2")(along_w + along_h)
        return channel_fc("conv3", axes=("mlp", "embed"))(x)


class AxialShiftedBlock(nn.Module):
    """x + AxialShift(GN(x)), then x + MLP(GN(x)) (official ``AxialShiftedBlock``)."""

    shift_size: int = 5
    mlp_ratio: float = 4.0
    as_bias: bool = True
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        drop_path = DropPath(self.drop_path)
        y = AxialShift(self.shift_size, self.as_bias, dtype=self.dtype, name="axial_shift")(
            group_norm_one_group(self.dtype, "norm1")(x))
        x = x + drop_path(y, train=train)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), activation=gelu_exact, dropout=self.dropout,
                dtype=self.dtype, name="mlp")(group_norm_one_group(self.dtype, "norm2")(x),
                                              train=train)
        x = x + drop_path(y, train=train)
        return nn.with_logical_constraint(x, ("batch", None, None, "embed"))


def merge_patches(x: jax.Array) -> jax.Array:
    """2x2 space-to-depth in the official PatchMerging order: channels [x(0,0), x(1,0), x(0,1),
    x(1,1)] where x(i, j) = x[:, i::2, j::2] (row offset first)."""
    return jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                            x[:, 1::2, 1::2]], axis=-1)


def pad_bottom_right(x: jax.Array, multiple: int) -> jax.Array:
    """Zero-pads H and W of an NHWC array at the bottom/right up to multiples of ``multiple``."""
    pad_h, pad_w = -x.shape[1] % multiple, -x.shape[2] % multiple
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return x


class PatchMerging(nn.Module):
    """Official PatchMerging: 2x2 space-to-depth, GroupNorm(1) over 4C, 1x1 conv to 2C, no bias.
    With ``pad_to_fit`` an odd map is zero-padded at the bottom/right first, and the padded zeros
    count in the GroupNorm statistics, as in the detection backbone."""

    pad_to_fit: bool = True
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        height, width, channels = x.shape[1:]
        if self.pad_to_fit:
            x = pad_bottom_right(x, 2)
        elif height % 2 or width % 2:
            raise ValueError(
                f"AS-MLP patch merging needs an even feature map, got {height}x{width}; with "
                f"pad_to_fit=False the image's patch grid must halve evenly at every merging "
                f"(height and width that are multiples of 8 * patch_size, e.g. 224 or 256 for "
                f"patch 4). Use pad_to_fit=True (the detection backbone's padding) for any size")
        x = group_norm_one_group(self.dtype, "norm")(merge_patches(x))
        return dense(2 * channels, axes=("mlp", "embed"), use_bias=False, dtype=self.dtype,
                     name="reduction")(x)


class ASMLP(Backbone):
    """AS-MLP: 4x4 patch embedding + GroupNorm, four stages of axial shifted blocks joined by
    patch merging, GroupNorm, global average pooling and a linear head.

    Attributes:
      embed_dim: width of stage 1 (doubles at each merging).
      depths: blocks per stage.
      shift_size: number of channel groups / shift extent (official 5).
      mlp_ratio: MLP hidden width over the block width.
      as_bias: biases of the axial shift's channel FCs.
      patch_size: side of the square patch embedding.
      patch_norm: GroupNorm after the patch embedding.
      num_classes: classifier outputs; 0 returns the pooled features from ``__call__``.
      in_chans: input channels of the patch embedding.
      drop_rate: dropout after the embedding and in the MLPs.
      drop_path_rate: stochastic depth, increasing linearly over all blocks to this rate.
      pad_to_fit: accept any input size by zero padding as the detection backbone (see module
        docstring); False reproduces the classification code's size rules.
      dtype: compute dtype; parameters stay float32.
    """

    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    shift_size: int = 5
    mlp_ratio: float = 4.0
    as_bias: bool = True
    patch_size: int = 4
    patch_norm: bool = True
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    pad_to_fit: bool = True
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def _forward(self, images: jax.Array, train: bool, with_head: bool
                 ) -> tuple[dict[str, jax.Array], jax.Array]:
        self._check(images)
        x = images.astype(self.dtype or images.dtype)
        if self.pad_to_fit:
            x = pad_bottom_right(x, self.patch_size)
        x = conv(self.embed_dim, (self.patch_size, self.patch_size), strides=self.patch_size,
                 padding="VALID", dtype=self.dtype, name="patch_embed")(x)
        if self.patch_norm:
            x = group_norm_one_group(self.dtype, "patch_norm")(x)
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
        features, block_index = collections.OrderedDict(), 0
        for stage, depth in enumerate(self.depths):
            if stage > 0:
                x = PatchMerging(self.pad_to_fit, dtype=self.dtype, name=f"downsample{stage}")(x)
            for block in range(depth):
                x = AxialShiftedBlock(self.shift_size, self.mlp_ratio, self.as_bias,
                                      dropout=self.drop_rate, drop_path=rates[block_index],
                                      dtype=self.dtype,
                                      name=f"stage{stage + 1}_block{block}")(x, train=train)
                block_index += 1
            features[f"stage{stage + 1}"] = x
        x = group_norm_one_group(self.dtype, "norm")(x)
        features["pre_logits"] = jnp.mean(x, axis=(1, 2))
        logits = features["pre_logits"]
        if with_head and self.num_classes > 0:
            logits = dense(self.num_classes, axes=("embed", "classes"), dtype=self.dtype,
                           name="head")(logits)
        return features, logits

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits (B, num_classes) for NHWC ``images``."""
        return self._forward(images, train, True)[1]

    def features(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """'stage1'..'stage4' NHWC maps (before each merging; strides 4..32 for patch 4) and
        'pre_logits' (B, C)."""
        return self._forward(images, train, False)[0]

    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """'stage1'..'stageN' at strides patch_size * 2**i with embed_dim * 2**i channels; with
        ``pad_to_fit`` a map of stride s on an H x W input is ceil(H / s) x ceil(W / s)."""
        return tuple(FeatureInfo(f"stage{i + 1}", stride, self.embed_dim * 2 ** i)
                     for i, stride in enumerate(stage_strides(self.patch_size, len(self.depths))))

    def _check(self, images: jax.Array) -> None:
        if self.shift_size < 1 or self.shift_size % 2 == 0:
            raise ValueError(f"AS-MLP shift_size must be a positive odd integer (the official "
                             f"Shift kernel's requirement), got {self.shift_size}")
        side = 1 if self.pad_to_fit else self.patch_size
        self._check_inputs(images, min_size=(side, side))


_VARIANTS = {
    # name: (embed_dim, depths) from the official configs (configs/as_*_patch4_shift5_224.yaml).
    "asmlp_tiny": (96, (2, 2, 6, 2)),
    "asmlp_small": (96, (2, 2, 18, 2)),
    "asmlp_base": (128, (2, 2, 18, 2)),
}

for _name, (_dim, _depths) in _VARIANTS.items():
    register_model(_name, ASMLP, family="asmlp",
                   description=f"AS-MLP-{_name.split('_')[1][0].upper()} (official as_mlp.py, "
                               f"patch 4, shift 5)",
                   embed_dim=_dim, depths=_depths, shift_size=5)
register_model("asmlp_micro", ASMLP, family="asmlp", tiny=True,
               description="micro AS-MLP for CPU tests: width 8 doubling per stage, one block per "
                           "stage, shift 3, MLP ratio 2",
               embed_dim=8, depths=(1, 1, 1, 1), shift_size=3, mlp_ratio=2.0)
