"""HRNet: high-resolution networks, for classification and for dense prediction.

Wang et al. 2019, "Deep High-Resolution Representation Learning for Visual Recognition"
(arXiv 1908.07919). A high-resolution branch is kept through the whole network; each stage adds a
branch at half the resolution of the last one (a *transition*), and each *exchange unit*
(timm's ``HighResolutionModule``) runs residual blocks per branch, then fuses every branch into
every other one: strided 3x3 convs going down, a 1x1 conv plus nearest upsampling going up.

Two heads share the same backbone module:

* :class:`HRNet` — the ImageNet classification network (timm ``hrnet_w18_small`` ... ``hrnet_w64``):
  the "incre" bottlenecks lift each branch to 128/256/512/1024 channels, strided convs (with
  bias) fold them from high to low resolution, a 1x1 conv to 2048, global average pool, linear.
* :class:`HRNetSegmentation` — the HRNetV2 representation head of HRNet-Semantic-Segmentation:
  all branches upsampled (bilinear, align_corners=False) to the highest resolution,
  concatenated, 1x1 conv + BN + ReLU, 1x1 classifier. Per-pixel logits at 1/4 of the input size
  (rounded up). Registered as ``<name>_seg``, e.g.::

      model = flexvision.create_model("hrnet_w18_seg", num_classes=19)
      variables = model.init(jax.random.PRNGKey(0), images)           # images: (B, H, W, 3)
      logits = model.apply(variables, images)                         # (B, ceil(H/4), ceil(W/4), 19)
      # ImageNet-pretrained backbone from a timm classification checkpoint, head freshly made:
      model, variables = flexvision.convert.from_timm("hrnet_w18_seg", "hrnet_w18.safetensors",
                                                       num_classes=19)

Any input size works, not only multiples of 32: every strided 3x3 conv (padding 1) maps a size
``n`` to ``ceil(n / 2)``, and upsampling in the fuse layers goes to the exact size of the target
branch instead of a fixed factor of 2**k. For sizes that are multiples of 2**k this is exactly
timm's ``nn.Upsample(scale_factor=2**k, mode='nearest')``.

BatchNorm: ``train=True`` normalizes with batch statistics and updates the running averages, so
the 'batch_stats' collection must be mutable::

    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

``freeze_bn=True`` makes every BatchNorm torchvision's ``FrozenBatchNorm2d`` (running statistics
in training too, no gradient to scale/bias; ``layers.common.BatchNorm(frozen=True)``), as
detection backbones use it; Mask R-CNN on HRNet sets it by default
(``flexvision.detection.maskrcnn.build_maskrcnn``).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexvision.layers import common
from flexvision.layers.flex import resize_bilinear, resize_nearest, upsample_then_resize_bilinear
from flexvision.models.contract import Backbone, FeatureInfo, stage_strides
from flexvision.registry import register_model

BN_EPSILON = 1e-5
# PyTorch BatchNorm momentum 0.1 (timm's _BN_MOMENTUM), in Flax's convention.
BN_MOMENTUM = 0.9
# The classification neck's per-branch bottleneck widths (x4 expansion: 128, 256, 512, 1024).
HEAD_CHANNELS = (32, 64, 128, 256)
BOTTLENECK_EXPANSION = 4
STEM_CHANNELS = 64  # the stem's second conv (timm: 64 whatever stem_width)
# Upsampling of the upward fuse paths: timm / official HRNet ("nearest"), mmseg ("bilinear").
FUSE_MODES = ("nearest", "bilinear")

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming, fan_out, relu


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage: ``num_modules`` exchange units over ``len(num_channels)`` branches.

    ``num_channels`` are block widths; a bottleneck block outputs 4x its width.
    """

    num_modules: int
    block: str  # "basic" or "bottleneck"
    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]

    def __post_init__(self):
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if len(self.num_blocks) != len(self.num_channels):
            raise ValueError(f"num_blocks {self.num_blocks} and num_channels {self.num_channels} "
                             f"must name the same number of branches")

    @property
    def out_channels(self) -> tuple[int, ...]:
        expansion = BOTTLENECK_EXPANSION if self.block == "bottleneck" else 1
        return tuple(c * expansion for c in self.num_channels)


def hrnet_stages(width: int, *, stage1_blocks: int = 4, stage1_width: int = 64,
                 blocks: int = 4, modules: Sequence[int] = (1, 4, 3)) -> tuple[StageSpec, ...]:
    """The four stages of HRNet-W``width``: branches of width C, 2C, 4C, 8C (paper Sec. 3)."""
    return (
        StageSpec(1, "bottleneck", (stage1_blocks,), (stage1_width,)),
        StageSpec(modules[0], "basic", (blocks,) * 2, (width, 2 * width)),
        StageSpec(modules[1], "basic", (blocks,) * 3, (width, 2 * width, 4 * width)),
        StageSpec(modules[2], "basic", (blocks,) * 4, (width, 2 * width, 4 * width, 8 * width)),
    )


# timm's cfg_cls, by name.
HRNET_STAGES = {
    "hrnet_w18_small": hrnet_stages(16, stage1_blocks=1, stage1_width=32, blocks=2,
                                    modules=(1, 1, 1)),
    "hrnet_w18_small_v2": hrnet_stages(18, stage1_blocks=2, blocks=2, modules=(1, 3, 2)),
    **{f"hrnet_w{w}": hrnet_stages(w) for w in (18, 30, 32, 40, 44, 48, 64)},
}


# ------------------------------------------------------------------------------------------------
# Building blocks. Every conv is bias-free and followed by BatchNorm unless stated otherwise.

def _conv(features: int, kernel: int, strides: int = 1, *, use_bias: bool = False, dtype=None,
          name: str) -> nn.Conv:
    """PyTorch-style conv: symmetric padding ``kernel // 2`` (not 'SAME', which pads strided
    convs on even sizes asymmetrically)."""
    pad = kernel // 2
    return common.conv(features, (kernel, kernel), strides=strides,
                       padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                       kernel_init=_conv_init, dtype=dtype, name=name)


def _norm(module: nn.Module, name: str) -> common.BatchNorm:
    return common.batch_norm(momentum=module.bn_momentum, epsilon=BN_EPSILON, axes=("conv_out",),
                             dtype=module.dtype, frozen=module.freeze_bn, name=name)


class ConvNormAct(nn.Module):
    """conv -> BatchNorm (-> ReLU): the ``Sequential(Conv2d, BatchNorm2d[, ReLU])`` of HRNet."""

    features: int
    kernel: int = 3
    strides: int = 1
    use_bias: bool = False
    act: bool = True
    bn_momentum: float = BN_MOMENTUM
    freeze_bn: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.features, self.kernel, self.strides, use_bias=self.use_bias,
                  dtype=self.dtype, name="conv")(x)
        x = _norm(self, "bn")(x, use_running_average=not train)
        return nn.relu(x) if self.act else x


class ConvChain(nn.Module):
    """A chain of 3x3 ConvNormAct steps ``(features, strides, act)``: the transition layers
    (a new branch reached from the last one by stride-2 convs) and the downward fuse paths."""

    steps: tuple[tuple[int, int, bool], ...]
    bn_momentum: float = BN_MOMENTUM
    freeze_bn: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for k, (features, strides, act) in enumerate(self.steps):
            x = ConvNormAct(features, 3, strides, act=act, bn_momentum=self.bn_momentum,
                            freeze_bn=self.freeze_bn, dtype=self.dtype, name=f"step_{k}")(x, train)
        return x


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs and an identity (or projected) skip."""

    planes: int
    strides: int = 1
    bn_momentum: float = BN_MOMENTUM
    freeze_bn: bool = False
    dtype: Any = None
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        shortcut = _projection_if_needed(self, x, train)
        y = _conv(self.planes, 3, self.strides, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(_norm(self, "bn1")(y, use_running_average=not train))
        y = _conv(self.planes, 3, dtype=self.dtype, name="conv2")(y)
        y = _norm(self, "bn2")(y, use_running_average=not train)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """ResNet bottleneck (He et al. 2016): 1x1 reduce, 3x3, 1x1 expand to 4x ``planes``."""

    planes: int
    strides: int = 1
    bn_momentum: float = BN_MOMENTUM
    freeze_bn: bool = False
    dtype: Any = None
    expansion = BOTTLENECK_EXPANSION

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        shortcut = _projection_if_needed(self, x, train)
        y = _conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(_norm(self, "bn1")(y, use_running_average=not train))
        y = _conv(self.planes, 3, self.strides, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(_norm(self, "bn2")(y, use_running_average=not train))
        y = _conv(self.planes * self.expansion, 1, dtype=self.dtype, name="conv3")(y)
        y = _norm(self, "bn3")(y, use_running_average=not train)
        return nn.relu(y + shortcut)


def _projection_if_needed(block: nn.Module, x: jax.Array, train: bool) -> jax.Array:
    """The block's skip path: identity, or a 1x1 conv + BN ('downsample') when the width or the
    stride changes."""
    out_features = block.planes * block.expansion
    if block.strides == 1 and x.shape[-1] == out_features:
        return x
    return ConvNormAct(out_features, 1, block.strides, act=False, bn_momentum=block.bn_momentum,
                       freeze_bn=block.freeze_bn, dtype=block.dtype, name="downsample")(x, train)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ExchangeUnit(nn.Module):
    """One multi-resolution module (timm's ``HighResolutionModule``), paper Sec. 3 / Fig. 2:
    residual blocks per branch, then output ``i`` = ReLU(sum_j f_ij(x_j)) where f_ii is the
    identity, f_ij (j > i) a 1x1 conv + BN upsampled to branch i's exact size, and
    f_ij (j < i) ``i - j`` stride-2 3x3 convs + BN (ReLU between them, not after the last).

    ``fuse_mode``: "nearest" (timm) upsamples with nearest neighbours; "bilinear" (mmseg, BPR)
    upsamples bilinearly by 2**(j - i) and then resizes bilinearly to branch i's size
    (align_corners=False both), see ``flex.upsample_then_resize_bilinear``."""

    spec: StageSpec
    bn_momentum: float = BN_MOMENTUM
    freeze_bn: bool = False
    dtype: Any = None
    fuse_mode: str = "nearest"

    @nn.compact
    def __call__(self, xs: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
        block_cls = _BLOCKS[self.spec.block]
        kw = dict(bn_momentum=self.bn_momentum, freeze_bn=self.freeze_bn, dtype=self.dtype)
        xs = list(xs)
        for b, (depth, planes) in enumerate(zip(self.spec.num_blocks, self.spec.num_channels)):
            for k in range(depth):
                xs[b] = block_cls(planes, **kw, name=f"branch{b}_{k}")(xs[b], train)
        if len(xs) == 1:
            return xs
        widths = self.spec.out_channels
        fused = []
        for i in range(len(xs)):
            total = None
            for j, x in enumerate(xs):
                if j == i:
                    term = x
                elif j > i:
                    term = ConvNormAct(widths[i], 1, act=False, **kw, name=f"fuse_{i}_{j}")(x, train)
                    if self.fuse_mode == "bilinear":
                        term = upsample_then_resize_bilinear(term, 2 ** (j - i),
                                                             xs[i].shape[1:3])
                    else:
                        term = resize_nearest(term, xs[i].shape[1:3])
                else:
                    steps = tuple((widths[j], 2, True) for _ in range(i - j - 1))
                    steps += ((widths[i], 2, False),)
                    term = ConvChain(steps, **kw, name=f"fuse_{i}_{j}")(x, train)
                total = term if total is None else total + term
            fused.append(nn.relu(total))
        return fused


class HRNetBackbone(nn.Module):
    """Stem (two stride-2 3x3 convs, to 1/4), stage 1 (bottlenecks), then stages 2-4 with their
    transitions. Returns the stem output and the branch outputs, high to low resolution:
    branch ``k`` (0-based) has spatial size ``ceil(H / 2**(k + 2))``."""

    stages: tuple[StageSpec, ...]
    stem_width: int = 64
    bn_momentum: float = BN_MOMENTUM
    freeze_bn: bool = False
    dtype: Any = None
    fuse_mode: str = "nearest"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
        if len(self.stages) < 2 or len(self.stages[0].num_channels) != 1:
            raise ValueError(f"HRNet needs a one-branch stage 1 and at least one more stage, got "
                             f"{self.stages}")
        if self.fuse_mode not in FUSE_MODES:
            raise ValueError(f"fuse_mode must be one of {FUSE_MODES}, got {self.fuse_mode!r}")
        kw = dict(bn_momentum=self.bn_momentum, freeze_bn=self.freeze_bn, dtype=self.dtype)
        x = _conv(self.stem_width, 3, 2, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(_norm(self, "bn1")(x, use_running_average=not train))
        x = _conv(STEM_CHANNELS, 3, 2, dtype=self.dtype, name="conv2")(x)
        stem = nn.relu(_norm(self, "bn2")(x, use_running_average=not train))

        first = self.stages[0]
        x = stem
        for k in range(first.num_blocks[0]):
            x = _BLOCKS[first.block](first.num_channels[0], **kw, name=f"layer1_{k}")(x, train)
        xs = [x]
        for s, spec in enumerate(self.stages[1:], start=2):
            xs = self._transition(xs, spec.out_channels, f"transition{s - 1}", train)
            for m in range(spec.num_modules):
                xs = ExchangeUnit(spec, **kw, fuse_mode=self.fuse_mode,
                                  name=f"stage{s}_{m}")(xs, train)
        return stem, xs

    def _transition(self, xs: list[jax.Array], widths: tuple[int, ...], name: str,
                    train: bool) -> list[jax.Array]:
        """Existing branches keep their input (a 3x3 conv if the width changes); each new branch
        comes from the lowest-resolution one by stride-2 3x3 convs (paper Sec. 3)."""
        kw = dict(bn_momentum=self.bn_momentum, freeze_bn=self.freeze_bn, dtype=self.dtype)
        out = []
        for i, width in enumerate(widths):
            if i < len(xs):
                if xs[i].shape[-1] == width:
                    out.append(xs[i])
                else:
                    out.append(ConvChain(((width, 1, True),), **kw, name=f"{name}_{i}")(xs[i], train))
            else:
                last = xs[-1].shape[-1]
                steps = tuple((width if k == i - len(xs) else last, 2, True)
                              for k in range(i + 1 - len(xs)))
                out.append(ConvChain(steps, **kw, name=f"{name}_{i}")(xs[-1], train))
        return out


def hrnet_feature_info(stages: tuple[StageSpec, ...]) -> tuple[FeatureInfo, ...]:
    """'stem' (stride 4, 64 channels) and 'stage1'..'stageN': branch k after the last exchange
    unit, stride 4 * 2**(k-1), the last stage's widths. A map of stride s on an H x W input is
    ceil(H / s) x ceil(W / s)."""
    widths = stages[-1].out_channels
    return (FeatureInfo("stem", (4, 4), STEM_CHANNELS),
            *(FeatureInfo(f"stage{k + 1}", stride, width)
              for k, (stride, width) in enumerate(zip(stage_strides(4, len(widths)), widths))))


class HRNet(Backbone):
    """HRNet image classifier (timm ``HighResolutionNet``, head='classification').

    ``apply(v, x)`` -> logits; ``apply(v, x, method="features")`` -> dict with 'stem' (1/4,
    64 channels), 'stage1'..'stage4' (the branches, 1/4 .. 1/32), 'pre_logits' (pooled 2048
    features).
    """

    stages: tuple[StageSpec, ...] = HRNET_STAGES["hrnet_w18"]
    num_classes: int = 1000
    in_chans: int = 3
    stem_width: int = 64
    num_features: int = 2048
    head_conv_bias: bool = True
    drop_rate: float = 0.0
    bn_momentum: float = BN_MOMENTUM
    freeze_bn: bool = False
    dtype: Any = None
    fuse_mode: str = "nearest"

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        return self._forward(images, train)["logits"]

    def features(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        outputs = self._forward(images, train)
        del outputs["logits"]
        return outputs

    def feature_info(self) -> tuple[FeatureInfo, ...]:
        return hrnet_feature_info(self.stages)

    @nn.compact
    def _forward(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        self._check_inputs(images)
        kw = dict(bn_momentum=self.bn_momentum, freeze_bn=self.freeze_bn, dtype=self.dtype)
        stem, branches = HRNetBackbone(self.stages, self.stem_width, **kw,
                                       fuse_mode=self.fuse_mode, name="backbone")(images, train)
        outputs = collections.OrderedDict(
            stem=stem, **{f"stage{k + 1}": b for k, b in enumerate(branches)})

        y = None
        for i, branch in enumerate(branches):
            lifted = Bottleneck(HEAD_CHANNELS[i], **kw, name=f"incre{i}")(branch, train)
            if y is None:
                y = lifted
            else:
                y = lifted + ConvNormAct(HEAD_CHANNELS[i] * BOTTLENECK_EXPANSION, 3, 2,
                                         use_bias=self.head_conv_bias, **kw,
                                         name=f"downsamp{i - 1}")(y, train)
        y = ConvNormAct(self.num_features, 1, use_bias=self.head_conv_bias, **kw,
                        name="final_layer")(y, train)
        pooled = jnp.mean(y, axis=(1, 2))
        pooled = nn.with_logical_constraint(pooled, ("batch", "embed"))
        outputs["pre_logits"] = pooled
        pooled = nn.Dropout(self.drop_rate, deterministic=not train)(pooled)
        logits = pooled if self.num_classes == 0 else common.dense(
            self.num_classes, axes=("embed", "classes"), dtype=self.dtype,
            name="classifier")(pooled)
        outputs["logits"] = logits.astype(jnp.float32)
        return outputs


class HRNetV2Head(nn.Module):
    """HRNetV2 representation head (HRNet-Semantic-Segmentation ``seg_hrnet.py``): every branch
    upsampled bilinearly (align_corners=False) to the first branch's size, concatenated, 1x1 conv
    (bias) + BN + ReLU ('last_layer'), then a 1x1 conv classifier (bias). With
    ``conv_bias=False`` it is mmseg's ``FCNHead`` in BPR's configuration (input_transform
    'resize_concat', one bias-free 1x1 ConvModule, no concat_input, no dropout, ``conv_seg``).

    Returns ``(representation, logits)`` at the first branch's resolution.
    """

    num_classes: int
    drop_rate: float = 0.0
    bn_momentum: float = BN_MOMENTUM
    dtype: Any = None
    conv_bias: bool = True
    freeze_bn: bool = False

    @nn.compact
    def __call__(self, branches: Sequence[jax.Array], train: bool = False,
                 ) -> tuple[jax.Array, jax.Array]:
        size = branches[0].shape[1:3]
        y = jnp.concatenate([resize_bilinear(b, size) for b in branches], axis=-1)
        y = ConvNormAct(y.shape[-1], 1, use_bias=self.conv_bias, bn_momentum=self.bn_momentum,
                        freeze_bn=self.freeze_bn, dtype=self.dtype, name="last_layer")(y, train)
        representation = nn.with_logical_constraint(y, ("batch", None, None, "embed"))
        if self.num_classes == 0:  # no classifier: the representation is the output
            return representation, representation
        y = nn.Dropout(self.drop_rate, deterministic=not train)(representation)
        logits = common.conv(self.num_classes, (1, 1), padding="VALID", dtype=self.dtype,
                             name="classifier")(y)
        return representation, logits


class HRNetSegmentation(Backbone):
    """HRNetV2 semantic segmentation: :class:`HRNetBackbone` + :class:`HRNetV2Head` ('head').

    ``apply(v, x)`` -> per-pixel logits (B, ceil(H/4), ceil(W/4), num_classes); upsample them to
    the label size for the loss. ``method="features"`` -> 'stem', 'stage1'..'stage4' (the
    branches) and 'pre_logits' (here the per-pixel representation before the classifier, an
    NHWC map at stride 4).

    ``upsample_logits=True`` returns the logits resized bilinearly (align_corners=False) to the
    input size instead (mmseg ``EncoderDecoder.encode_decode``). ``fuse_mode``: see
    :class:`ExchangeUnit`; ``head_conv_bias``: see :class:`HRNetV2Head` (``conv_bias``).

    BPR's refinement network (``bpr_hrnet18s``, ``bpr_hrnet48``) is this model with
    ``in_chans=4`` (RGB + the coarse mask mapped to {-1, +1}), bilinear fuse, the bias-free FCN
    head, 2 classes and upsampled logits. BPR feeds the mask through its own 3x3 stride-2 conv
    ``conv_mask`` added to ``conv1(rgb)``; a convolution is linear in its input channels, so that
    is ``conv1`` over the 4 channels with the two kernels stacked on the input axis
    (``convert/bpr.py`` stacks them).
    """

    stages: tuple[StageSpec, ...] = HRNET_STAGES["hrnet_w48"]
    num_classes: int = 19
    in_chans: int = 3
    stem_width: int = 64
    drop_rate: float = 0.0
    bn_momentum: float = BN_MOMENTUM
    freeze_bn: bool = False
    dtype: Any = None
    fuse_mode: str = "nearest"
    head_conv_bias: bool = True
    upsample_logits: bool = False

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        return self._forward(images, train)["logits"]

    def features(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        outputs = self._forward(images, train)
        del outputs["logits"]
        return outputs

    def feature_info(self) -> tuple[FeatureInfo, ...]:
        return hrnet_feature_info(self.stages)

    @nn.compact
    def _forward(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        self._check_inputs(images)
        stem, branches = HRNetBackbone(self.stages, self.stem_width, bn_momentum=self.bn_momentum,
                                       freeze_bn=self.freeze_bn, dtype=self.dtype,
                                       fuse_mode=self.fuse_mode, name="backbone")(images, train)
        representation, logits = HRNetV2Head(self.num_classes, self.drop_rate, self.bn_momentum,
                                             freeze_bn=self.freeze_bn, dtype=self.dtype,
                                             conv_bias=self.head_conv_bias,
                                             name="head")(branches, train)
        if self.upsample_logits:
            logits = resize_bilinear(logits, images.shape[1:3])
        return collections.OrderedDict(
            stem=stem, **{f"stage{k + 1}": b for k, b in enumerate(branches)},
            pre_logits=representation, logits=logits.astype(jnp.float32))


for _name, _stages in HRNET_STAGES.items():
    register_model(_name, HRNet, family="hrnet", stages=_stages,
                   description=f"timm {_name}: HRNet classifier (incre neck, 2048-d pool)")
    register_model(f"{_name}_seg", HRNetSegmentation, family="hrnet", stages=_stages,
                   description=f"HRNetV2 segmentation head on the {_name} backbone")
register_model("hrnet_micro", HRNet, family="hrnet", tiny=True,
               stages=hrnet_stages(8, stage1_blocks=1, stage1_width=8, blocks=1,
                                   modules=(1, 1, 1))[:3],
               stem_width=8, num_features=64,
               description="micro HRNet for CPU tests: three stages (branches at strides 4, 8, "
                           "16 of width 8, 16, 32), one block per branch, 64-d pool")
for _name in ("hrnet_w18", "hrnet_w48"):
    register_model(f"{_name}_ssld", HRNet, family="hrnet", stages=HRNET_STAGES[_name],
                   head_conv_bias=False,
                   description=f"timm {_name}_ssld: {_name} with bias-free neck convs")

# BPR refinement networks (tinyalpha/BPR configs/bpr/hrnet18s_128.py and hrnet48_256.py): mmseg
# HRNetV2-W18-small / W48 with the coarse mask as 4th input channel, bilinear fuse, FCN head.
BPR_STAGES = {"bpr_hrnet18s": HRNET_STAGES["hrnet_w18_small_v2"],
              "bpr_hrnet48": HRNET_STAGES["hrnet_w48"]}
for _name, _stages in BPR_STAGES.items():
    register_model(_name, HRNetSegmentation, family="hrnet", stages=_stages, in_chans=4,
                   num_classes=2, fuse_mode="bilinear", head_conv_bias=False,
                   upsample_logits=True,
                   description=f"BPR refinement net ({_name}): image + coarse mask -> "
                               f"background/foreground logits at the input size")
