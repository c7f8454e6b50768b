"""Mask R-CNN (He et al. 2017) on any flexvision backbone: backbone + neck + RPN + RoI heads.

    model = create_detector("maskrcnn_swin_tiny", num_classes=2)   # background + 1 class
    variables = model.init({"params": key}, images)                # images (B, H, W, 3) NHWC
    out = model.apply(variables, images, image_sizes)              # eval: padded detections
    losses = model.apply(variables, images, image_sizes, train=True, targets=targets,
                         rngs={"sampling": key, "dropout": key})  # {'loss_objectness', ...}

torchvision ``models/detection/generalized_rcnn.py`` + ``mask_rcnn.py`` composition: the batch
is zero-padded (bottom/right) to a multiple of ``size_divisibility`` (torchvision's
GeneralizedRCNNTransform: 32; for the ViT family lcm(32, patch size), so that the patch grid
and the stride-16 neck grid tile it), the backbone's maps go through the neck
(:mod:`flexvision.detection.necks`), the RPN reads every neck level, the RoI heads every level but
'pool'. Anchor sizes are 8 x each level's stride (32 at stride 4 ... 512 at 64, torchvision's).

Detectors live in their own table (:func:`register_detector`, :func:`create_detector`,
:func:`list_detectors`), not in ``flexvision.registry``: that registry lists backbones, whose
contract (``features``/``feature_info``/classification logits) a detector does not implement.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexvision import registry
from flexvision.detection.necks import build_neck
from flexvision.detection.roi_heads import RoIHeads
from flexvision.detection.rpn import RegionProposalNetwork
from flexvision.detection.targets import prepare_targets
from flexvision.layers.flex import to_pair

LOSS_KEYS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
             "loss_mask")


class MaskRCNN(nn.Module):
    """Backbone (a flexvision ``Backbone`` built with ``num_classes=0``) + neck + RPN + RoI heads.

    Call ``(images, image_sizes=None, *, train=False, targets=None, patch_size=None)``:
    images (B, H, W, C) float NHWC, image_sizes (B, 2) int each image's own (h, w) inside the
    batch (default: all (H, W)); ``patch_size`` for the ViT family (static). Train (rng streams
    'sampling', and 'dropout' if the backbone drops; targets from ``targets.pad_targets`` or the
    ``det_pad`` op: {'boxes' (B, G, 4), 'labels' (B, G), 'valid' (B, G), 'masks' (B, G, H, W)}
    at the unpadded batch size) returns the five losses of :data:`LOSS_KEYS` and their sum
    'loss' (L = L_rpn_cls + L_rpn_box + L_cls + L_box + L_mask). Eval returns the RoI heads'
    padded detections {'boxes' (B, D, 4) input pixels, 'scores', 'labels', 'valid', 'masks'
    (B, D, 28, 28) probabilities; paste them with ``masks.paste_masks``}.

    Ground truth in training (host-side checks: ``targets.pad_targets``/``check_labels``):
    boxes are clipped to their own image and objects left without area are ignored
    (``targets.prepare_targets``); an image without objects trains as all-background; an empty
    mask is an all-zero mask target; a label outside 1..num_classes-1 gives NaN RoI losses.
    A backbone built with ``freeze_bn=True`` (see :func:`build_maskrcnn`) reads its
    'batch_stats' without writing them: train needs no ``mutable``.
    """

    backbone: nn.Module
    neck: nn.Module
    rpn: RegionProposalNetwork
    roi_heads: RoIHeads
    size_divisibility: int = 32

    @property
    def flex_kwargs(self) -> tuple[str, ...]:
        """The backbone's run-time options (model contract), e.g. ('patch_size',) for ViTs."""
        return tuple(getattr(self.backbone, "flex_kwargs", ()))

    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) at which every parameter shape is defined: the backbone's."""
        return tuple(self.backbone.input_shape())

    def divisor(self, patch_size=None) -> int:
        """The multiple the batch is padded to (static)."""
        divisor = int(self.size_divisibility)
        if "patch_size" in getattr(self.backbone, "flex_kwargs", ()):
            patch = to_pair(self.backbone.patch_size if patch_size is None else patch_size,
                            "patch_size")
            divisor = math.lcm(divisor, *patch)
        return divisor

    def __call__(self, images: jax.Array, image_sizes: jax.Array | None = None, *,
                 train: bool = False, targets: Mapping[str, jax.Array] | None = None,
                 patch_size: int | Sequence[int] | None = None) -> dict[str, jax.Array]:
        b, h, w = images.shape[:3]
        if image_sizes is None:
            image_sizes = jnp.tile(jnp.array([[h, w]], jnp.int32), (b, 1))
        d = self.divisor(patch_size)
        padded = (-(-h // d) * d, -(-w // d) * d)
        images = jnp.pad(images, ((0, 0), (0, padded[0] - h), (0, padded[1] - w), (0, 0)))
        flex = {} if patch_size is None else {"patch_size": patch_size}
        maps = self.backbone.features(images, train=train, **flex)
        if hasattr(self.neck, "base_stride"):  # SimpleFeaturePyramid: the map's stride
            grid = maps[self.neck.in_feature].shape[1]
            pyramid = self.neck(maps, padded[0] // grid)
        else:
            pyramid = self.neck(maps)
        levels = list(pyramid.values())
        if train:
            if targets is None:
                raise ValueError("MaskRCNN(train=True) needs targets={'boxes', 'labels', "
                                 "'valid', 'masks'} (see detection.targets.pad_targets)")
            targets = prepare_targets(targets, image_sizes)
            if "masks" in targets:
                m = targets["masks"]
                targets["masks"] = jnp.pad(m, ((0, 0), (0, 0), (0, padded[0] - m.shape[2]),
                                               (0, padded[1] - m.shape[3])))
        proposals = self.rpn(levels, image_sizes, padded, train=train, targets=targets)
        roi = self.roi_heads(levels[:-1], proposals["boxes"], proposals["valid"], image_sizes,
                             padded, train=train, targets=targets)
        if not train:
            return roi
        losses = {k: v for k, v in {**proposals, **roi}.items() if k.startswith("loss")}
        losses["loss"] = sum(losses[k] for k in LOSS_KEYS if k in losses)
        return losses


def build_maskrcnn(backbone: str | nn.Module, num_classes: int = 91, *, neck_channels: int = 256,
                   backbone_overrides: Mapping[str, Any] | None = None,
                   neck_overrides: Mapping[str, Any] | None = None,
                   rpn_overrides: Mapping[str, Any] | None = None,
                   roi_overrides: Mapping[str, Any] | None = None, dtype: Any = None,
                   size_divisibility: int = 32, freeze_bn: bool | None = None) -> MaskRCNN:
    """Mask R-CNN on the registered backbone ``backbone`` (its head removed, num_classes=0), or
    on a backbone module (e.g. the model an importer returned; its head is removed the same way).

    ``num_classes`` counts the background (torchvision: 91 for COCO; 2 for one object class).
    Anchor sizes follow the neck's strides (8 x stride, aspect ratios 0.5, 1, 2); the other
    RPN / RoI-head settings are torchvision's unless overridden.

    ``freeze_bn``: for a backbone with BatchNorm (a family whose modules have a ``freeze_bn``
    field: HRNet), True (the default: None, unless ``backbone_overrides`` sets it) makes its
    norms torchvision's FrozenBatchNorm2d (torchvision resnet_fpn_backbone / detectron2
    FrozenBN: running statistics in training, scale and bias without gradient), so small
    detection batches never touch the ImageNet statistics; False trains BatchNorm as in
    classification (mutable 'batch_stats'). True on a backbone without BatchNorm is a
    ValueError; False there changes nothing."""
    if isinstance(backbone, str):
        body = registry.create_model(backbone, num_classes=0, **dict(backbone_overrides or {}))
    else:
        body = backbone.clone(num_classes=0, **dict(backbone_overrides or {}))
    if dtype is not None:
        body = body.clone(dtype=dtype)
    has_bn = "freeze_bn" in {f.name for f in dataclasses.fields(body)}
    if freeze_bn and not has_bn:
        raise ValueError(f"freeze_bn=True: the {type(body).__name__} backbone has no BatchNorm "
                         f"to freeze; leave freeze_bn unset (None) or False")
    if has_bn:
        if freeze_bn is None:
            freeze_bn = dict(backbone_overrides or {}).get("freeze_bn", True)
        body = body.clone(freeze_bn=bool(freeze_bn))
    neck = build_neck(body, neck_channels, dtype=dtype, **dict(neck_overrides or {}))
    strides = [i.stride[0] for i in neck.feature_info()]
    rpn = RegionProposalNetwork(**{"anchor_sizes": tuple((8.0 * s,) for s in strides),
                                   "dtype": dtype, **dict(rpn_overrides or {})})
    heads = RoIHeads(**{"num_classes": num_classes, "dtype": dtype,
                        **dict(roi_overrides or {})})
    return MaskRCNN(body, neck, rpn, heads, size_divisibility)


@dataclasses.dataclass(frozen=True)
class DetectorEntry:
    """One registered detector: ``build_maskrcnn(backbone, **defaults)``."""

    name: str
    family: str
    backbone: str
    defaults: Mapping[str, Any]
    tiny: bool = False


_DETECTORS: dict[str, DetectorEntry] = {}


def register_detector(name: str, backbone: str, *, tiny: bool = False, **defaults) -> None:
    """Registers ``name`` = Mask R-CNN on the registered backbone ``backbone``; its family is
    the backbone's. One tiny variant per family (``tiny=True``) for tests."""
    if name in _DETECTORS:
        raise ValueError(f"detector name {name!r} is registered twice")
    family = registry.model_family(backbone)
    if tiny and any(e.tiny and e.family == family for e in _DETECTORS.values()):
        raise ValueError(f"backbone family {family!r} already has a tiny detector")
    _DETECTORS[name] = DetectorEntry(name, family, backbone, dict(defaults), tiny)


def list_detectors(tiny: bool | None = None) -> list[str]:
    """Sorted registered detector names (only tiny or only full-size ones if ``tiny`` is set)."""
    return sorted(n for n, e in _DETECTORS.items() if tiny is None or e.tiny == tiny)


def detector_entry(name: str) -> DetectorEntry:
    if name not in _DETECTORS:
        raise ValueError(f"unknown detector {name!r}; registered: {list_detectors()}")
    return _DETECTORS[name]


def create_detector(name: str, **overrides) -> MaskRCNN:
    """Builds the registered detector ``name``; ``overrides`` replace :func:`build_maskrcnn`'s
    arguments (e.g. ``num_classes=2``, ``rpn_overrides={...}``)."""
    entry = detector_entry(name)
    return build_maskrcnn(entry.backbone, **{**entry.defaults, **overrides})


def load_backbone(variables: Mapping[str, Any], backbone_variables: Mapping[str, Any]) -> dict:
    """``variables`` of a MaskRCNN with its backbone's replaced by ``backbone_variables`` (e.g.
    the second result of ``flexvision.convert.from_timm``/``from_big_vision``/``from_official``
    for the same architecture), every other collection and module untouched.

    The classifier head of an imported model (which the detector's ``num_classes=0`` backbone
    lacks) is dropped. Boxed (logically partitioned) leaves keep their axis names.
    Raises ValueError naming the first parameter missing or of another shape."""
    out = {k: dict(v) for k, v in variables.items()}
    for collection, tree in backbone_variables.items():
        if collection not in out or "backbone" not in out[collection]:
            continue
        out[collection]["backbone"] = _fill(out[collection]["backbone"], tree,
                                            f"{collection}/backbone")
    return out


def _fill(template: Any, source: Any, path: str) -> Any:
    if isinstance(template, Mapping):
        if not isinstance(source, Mapping):
            raise ValueError(f"{path}: the imported backbone has a leaf where the detector has "
                             f"a module")
        missing = [k for k in template if k not in source]
        if missing:
            raise ValueError(f"{path}: the imported backbone lacks {missing}; was it converted "
                             f"for the same architecture and configuration?")
        return {k: _fill(v, source[k], f"{path}/{k}") for k, v in template.items()}
    value = source.value if isinstance(source, nn.Partitioned) else source
    target = template.value if isinstance(template, nn.Partitioned) else template
    if tuple(np.shape(value)) != tuple(target.shape):
        raise ValueError(f"{path}: imported shape {tuple(np.shape(value))} != the detector's "
                         f"{tuple(target.shape)}")
    value = jnp.asarray(value, target.dtype)
    return template.replace(value=value) if isinstance(template, nn.Partitioned) else value


_TINY_RPN = dict(pre_nms_top_n_train=64, post_nms_top_n_train=32, pre_nms_top_n_test=64,
                 post_nms_top_n_test=32, batch_size_per_image=32)
_TINY_ROI = dict(representation_size=32, mask_layers=(16,), mask_dim_reduced=16,
                 batch_size_per_image=16, detections_per_img=8)
_TINY = dict(neck_channels=16, rpn_overrides=_TINY_RPN, roi_overrides=_TINY_ROI)

for _name, _backbone in (("maskrcnn_flexivit_small", "flexivit_small"),
                         ("maskrcnn_flexivit_base", "flexivit_base"),
                         ("maskrcnn_vit_small", "vit_small_patch16_224"),
                         ("maskrcnn_vit_base", "vit_base_patch16_224"),
                         ("maskrcnn_deit_small", "deit_small_patch16_224"),
                         ("maskrcnn_swin_tiny", "swin_tiny_patch4_window7_224"),
                         ("maskrcnn_mvitv2_tiny", "mvitv2_tiny"),
                         ("maskrcnn_hrnet_w18_small", "hrnet_w18_small"),
                         ("maskrcnn_cyclemlp_b1", "cyclemlp_b1"),
                         ("maskrcnn_asmlp_tiny", "asmlp_tiny")):
    register_detector(_name, _backbone)
for _name, _backbone in (("maskrcnn_flexivit_micro", "flexivit_micro"),
                         ("maskrcnn_swin_micro", "swin_micro"),
                         ("maskrcnn_mvitv2_micro", "mvitv2_micro"),
                         ("maskrcnn_hrnet_micro", "hrnet_micro"),
                         ("maskrcnn_cyclemlp_micro", "cyclemlp_micro"),
                         ("maskrcnn_asmlp_micro", "asmlp_micro")):
    register_detector(_name, _backbone, tiny=True, **_TINY)
