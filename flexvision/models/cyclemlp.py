"""CycleMLP (Chen et al. 2022, "CycleMLP: A MLP-like Architecture for Dense Prediction", ICLR).

A hierarchical MLP whose spatial mixing is Cycle FC: a channel FC whose input channel ``c`` is
read at a channel-dependent offset along one axis. The official implementation
(ShoufaChen/CycleMLP, cycle_mlp.py) computes it with a deformable convolution with fixed offsets;
since those offsets are integers and constant over space it is exactly a zero-filled shift of
each channel followed by one matmul, which is what :class:`CycleFC` does here. Nothing depends
on the input size, so the network runs at any height and width >= 3.

Names follow the official module tree (``attn.sfc_h``, ``attn.sfc_w``, ``attn.mlp_c``,
``attn.reweight``) so that :mod:`flexvision.convert.cyclemlp` maps its checkpoints one to one.
Beware of the official names: ``sfc_h`` (kernel 1x3) mixes along the *width*, ``sfc_w`` (3x1)
along the *height*.

    >>> model = flexvision.create_model("cyclemlp_b1", num_classes=10)
    >>> logits = model.apply(variables, images)                   # NHWC, any H, W >= 3
    >>> maps = model.apply(variables, images, method="features")  # stage1..stage4, pre_logits
"""

from __future__ import annotations

import collections
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexvision.layers.common import conv, dense, param_init
from flexvision.layers.drop import DropPath, drop_path_rates
from flexvision.layers.mlp import Mlp, gelu_exact
from flexvision.layers.shift import shift_channels
from flexvision.models.contract import Backbone, FeatureInfo, per_stage
from flexvision.registry import register_model

MIN_INPUT_SIZE = 3  # the 7x7 stride-4 patch embedding with padding 2 needs at least 3 pixels


@functools.lru_cache(maxsize=None)
def cycle_fc_offsets(channels: int, kernel_size: int) -> tuple[int, ...]:
    """Sampling offset of each input channel of a Cycle FC (Chen et al. 2022, Cycle FC).

    Channel ``c`` is read at ``(c + k // 2) mod k - k // 2`` pixels from the output position
    along the FC's axis (official ``CycleFC.gen_offset``): for k = 3 the offsets cycle 0, 1, -1.
    """
    if kernel_size < 1:
        raise ValueError(f"Cycle FC kernel size must be a positive integer, got {kernel_size}")
    start = kernel_size // 2
    return tuple((c + start) % kernel_size - kernel_size // 2 for c in range(channels))


def cycle_fc_offset_buffer(channels: int, kernel_size: Sequence[int]) -> np.ndarray:
    """The official ``CycleFC.offset`` buffer, (1, 2 * channels, 1, 1) as (dy, dx) per channel.

    Used by the importer to check that a checkpoint's buffers are the constants this module
    builds itself.
    """
    kh, kw = kernel_size
    if kh != 1 and kw != 1:
        raise ValueError(f"Cycle FC kernel must be 1xk or kx1, got {kh}x{kw}")
    buffer = np.zeros((1, 2 * channels, 1, 1), np.float32)
    if kh == 1:
        buffer[0, 1::2, 0, 0] = cycle_fc_offsets(channels, kw)
    else:
        buffer[0, 0::2, 0, 0] = cycle_fc_offsets(channels, kh)
    return buffer


class CycleFC(nn.Module):
    """Cycle FC along one spatial axis: per-channel offsets, then a channel FC.

    ``axis`` is 1 (height) or 2 (width) of an NHWC map. Output position (i, j) sees input
    channel c at (i + offset_c, j) or (i, j + offset_c); positions outside the map read zero,
    as torchvision's deform_conv2d does.
    """

    kernel_size: int = 3
    axis: int = 2
    use_bias: bool = True
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.axis not in (1, 2):
            raise ValueError(f"CycleFC axis must be 1 (height) or 2 (width) of an NHWC map, "
                             f"got {self.axis}")
        channels = x.shape[-1]
        kernel = self.param("kernel", param_init(nn.initializers.xavier_uniform(),
                                                 ("embed", "mlp")), (channels, channels))
        bias = (self.param("bias", param_init(nn.initializers.zeros, ("mlp",)), (channels,))
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        offsets = cycle_fc_offsets(channels, self.kernel_size)
        # Reading at +offset is translating the content by -offset.
        shifted = shift_channels(x, tuple(-o for o in offsets), axis=self.axis)
        out = jnp.einsum("bhwc,cd->bhwd", shifted, kernel)
        return out if bias is None else out + bias


class CycleMLPMixer(nn.Module):
    """The token mixer of a CycleBlock (official ``CycleMLP``): Cycle FCs along W and H and a
    channel FC, fused by split attention (as in ViP) with weights from their pooled sum."""

    qkv_bias: bool = False
    proj_dropout: float = 0.0
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        batch, _, _, channels = x.shape
        along_w = CycleFC(kernel_size=3, axis=2, dtype=self.dtype, name="sfc_h")(x)
        along_h = CycleFC(kernel_size=3, axis=1, dtype=self.dtype, name="sfc_w")(x)
        mixed_c = dense(channels, axes=("embed", "mlp"), use_bias=self.qkv_bias,
                        dtype=self.dtype, name="mlp_c")(x)
        pooled = jnp.mean(along_w + along_h + mixed_c, axis=(1, 2))
        weights = Mlp(channels // 4, out_dim=3 * channels, dtype=self.dtype,
                      name="reweight")(pooled)
        # Official layout: reweight(a).reshape(B, C, 3), softmax over the 3 branches.
        weights = jax.nn.softmax(weights.reshape(batch, channels, 3).astype(jnp.float32), axis=-1)
        weights = weights.astype(x.dtype)[:, None, None, :, :]
        x = along_w * weights[..., 0] + along_h * weights[..., 1] + mixed_c * weights[..., 2]
        x = dense(channels, axes=("mlp", "embed"), dtype=self.dtype, name="proj")(x)
        return nn.Dropout(self.proj_dropout, deterministic=not train)(x)


def _layer_norm(dtype, name):
    """torch.nn.LayerNorm (eps 1e-5) over channels, logically named."""
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name, use_fast_variance=False,
                        scale_init=param_init(nn.initializers.ones, ("norm",)),
                        bias_init=param_init(nn.initializers.zeros, ("norm",)))


class CycleBlock(nn.Module):
    """Pre-norm residual block: x + mixer(LN(x)), then x + MLP(LN(x)) (official CycleBlock)."""

    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    drop_path: float = 0.0
    skip_lam: float = 1.0
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        drop_path = DropPath(self.drop_path)
        y = CycleMLPMixer(qkv_bias=self.qkv_bias, dtype=self.dtype, name="attn")(
            _layer_norm(self.dtype, "norm1")(x), train=train)
        x = x + drop_path(y, train=train) / self.skip_lam
        y = Mlp(int(channels * self.mlp_ratio), activation=gelu_exact, dtype=self.dtype,
                name="mlp")(_layer_norm(self.dtype, "norm2")(x), train=train)
        x = x + drop_path(y, train=train) / self.skip_lam
        return nn.with_logical_constraint(x, ("batch", None, None, "embed"))


class CycleMLP(Backbone):
    """CycleNet: overlapping 7x7/4 patch embedding, four stages of CycleBlocks joined by 3x3/2
    convolutions, LayerNorm, global average pooling and a linear head.

    Attributes (timm's names; the official CycleNet's ``layers``, ``embed_dims`` and
    ``mlp_ratios`` are read by :func:`flexvision.convert.from_official`):
      depths: blocks per stage (the official ``layers``).
      embed_dim: channel width per stage (a tuple), or an int: stage 1's, doubling per stage.
      mlp_ratio: hidden width of the MLPs over the block width: one float, or one per stage.
      transitions: whether a 3x3 stride-2 convolution downsamples after stage i (the official
        code requires it wherever the width changes).
      num_classes: classifier outputs; 0 returns the pooled features from ``__call__``.
      in_chans: input channels of the patch embedding.
      qkv_bias: bias of the channel FC ``mlp_c`` (official default False).
      skip_lam: divisor of each residual branch (official default 1.0).
      drop_rate: dropout before the head (timm's meaning; the official CycleNet has none).
      drop_path_rate: stochastic depth, increasing linearly over all blocks to this rate.
      dtype: compute dtype; parameters stay float32.
    """

    depths: Sequence[int] = (2, 2, 4, 2)
    embed_dim: int | Sequence[int] = (64, 128, 320, 512)
    mlp_ratio: float | Sequence[float] = 4.0
    transitions: Sequence[bool] = (True, True, True, True)
    num_classes: int = 1000
    in_chans: int = 3
    qkv_bias: bool = False
    skip_lam: float = 1.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: jax.typing.DTypeLike | None = None

    @property
    def embed_dims(self) -> tuple[int, ...]:
        """Width of each stage (from ``embed_dim``)."""
        return per_stage(self.embed_dim, len(self.depths), "embed_dim")

    @property
    def mlp_ratios(self) -> tuple[float, ...]:
        """MLP ratio of each stage (from ``mlp_ratio``)."""
        if isinstance(self.mlp_ratio, (int, float, np.integer, np.floating)):
            return (float(self.mlp_ratio),) * len(self.depths)
        ratios = tuple(float(r) for r in self.mlp_ratio)
        if len(ratios) != len(self.depths):
            raise ValueError(f"CycleMLP: mlp_ratio {ratios} needs one entry per stage "
                             f"({len(self.depths)}), or give one float")
        return ratios

    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """'stage1'..'stageN': stride 4, doubled by each transition before the stage."""
        info, stride = [], 4
        for stage, dim in enumerate(self.embed_dims):
            if stage > 0 and self.transitions[stage - 1]:
                stride *= 2
            info.append(FeatureInfo(f"stage{stage + 1}", (stride, stride), dim))
        return tuple(info)

    def _check_config(self) -> None:
        stages = len(self.depths)
        dims = self.embed_dims
        if len(self.transitions) < stages - 1:
            raise ValueError(f"CycleMLP: transitions {tuple(self.transitions)} needs one entry "
                             f"per stage boundary ({stages - 1})")
        for i in range(stages - 1):
            if not self.transitions[i] and dims[i] != dims[i + 1]:
                raise ValueError(
                    f"CycleMLP: the width changes from {dims[i]} to "
                    f"{dims[i + 1]} after stage {i + 1} without a transition; the "
                    f"official CycleNet only changes width in a downsampling transition, so set "
                    f"transitions[{i}]=True or keep the width")

    @nn.compact
    def _forward(self, images: jax.Array, train: bool, with_head: bool
                 ) -> tuple[dict[str, jax.Array], jax.Array]:
        self._check_config()
        self._check_inputs(images, min_size=(MIN_INPUT_SIZE, MIN_INPUT_SIZE))
        x = conv(self.embed_dims[0], (7, 7), strides=4, padding=((2, 2), (2, 2)),
                 dtype=self.dtype, name="patch_embed")(images.astype(self.dtype or images.dtype))
        rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
        features, block_index = collections.OrderedDict(), 0
        mlp_ratios = self.mlp_ratios
        for stage, (depth, dim) in enumerate(zip(self.depths, self.embed_dims)):
            if stage > 0 and self.transitions[stage - 1]:
                x = conv(dim, (3, 3), strides=2, padding=((1, 1), (1, 1)), dtype=self.dtype,
                         name=f"downsample{stage}")(x)
            for block in range(depth):
                x = CycleBlock(mlp_ratios[stage], qkv_bias=self.qkv_bias,
                               drop_path=rates[block_index], skip_lam=self.skip_lam,
                               dtype=self.dtype,
                               name=f"stage{stage + 1}_block{block}")(x, train=train)
                block_index += 1
            features[f"stage{stage + 1}"] = x
        x = _layer_norm(self.dtype, "norm")(x)
        features["pre_logits"] = jnp.mean(x, axis=(1, 2))
        logits = features["pre_logits"]
        if with_head and self.num_classes > 0:
            logits = nn.Dropout(self.drop_rate, deterministic=not train)(logits)
            logits = dense(self.num_classes, axes=("embed", "classes"), dtype=self.dtype,
                           name="head")(logits)
        return features, logits

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits (B, num_classes) for NHWC ``images`` of any height and width >= 3. A stage
        map of stride 4 * 2**k is (floor((H - 3) / 4) + 1) halved k times, rounding up."""
        return self._forward(images, train, True)[1]

    def features(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """'stage1'..'stage4' NHWC maps (strides 4, 8, 16, 32) and 'pre_logits' (B, C)."""
        return self._forward(images, train, False)[0]


_VARIANTS = {
    # name: (depths, embed_dims, mlp_ratios) from the official CycleMLP_B1..B5; all four
    # transitions are True.
    "cyclemlp_b1": ((2, 2, 4, 2), (64, 128, 320, 512), (4, 4, 4, 4)),
    "cyclemlp_b2": ((2, 3, 10, 3), (64, 128, 320, 512), (4, 4, 4, 4)),
    "cyclemlp_b3": ((3, 4, 18, 3), (64, 128, 320, 512), (8, 8, 4, 4)),
    "cyclemlp_b4": ((3, 8, 27, 3), (64, 128, 320, 512), (8, 8, 4, 4)),
    "cyclemlp_b5": ((3, 4, 24, 3), (96, 192, 384, 768), (4, 4, 4, 4)),
}

for _name, (_depths, _dims, _ratios) in _VARIANTS.items():
    register_model(_name, CycleMLP, family="cyclemlp",
                   description=f"CycleMLP-{_name[-2:].upper()} (official cycle_mlp.py)",
                   depths=_depths, embed_dim=_dims, mlp_ratio=_ratios,
                   transitions=(True, True, True, True))
register_model("cyclemlp_micro", CycleMLP, family="cyclemlp", tiny=True,
               description="micro CycleMLP for CPU tests: one block per stage, widths 8-64, "
                           "MLP ratio 2", depths=(1, 1, 1, 1), embed_dim=8, mlp_ratio=2.0,
               transitions=(True, True, True, True))
