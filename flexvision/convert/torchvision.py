"""Import of torchvision Mask R-CNN head weights (models/detection: rpn.py, roi_heads.py).

    from flexvision import convert
    rpn, variables = convert.from_torchvision("rpn", state_dict)
    heads, variables = convert.from_torchvision("roi_heads", state_dict, num_classes=91)

``state_dict`` is torchvision's own (names as ``RegionProposalNetwork.state_dict()`` /
``RoIHeads.state_dict()``, or a whole MaskRCNN's with its ``rpn.`` / ``roi_heads.`` prefixes:
the part's entries are picked and the rest ignored). The names of torchvision < 0.13, in which
its published COCO checkpoints are saved (``rpn.head.conv.weight``,
``roi_heads.mask_head.mask_fcn1.weight``), are read too. Widths, depths and class counts are read
from the arrays; the kwargs are the flexvision module's fields (thresholds, pool sizes, ...).
torchvision's fc6 flattens pooled features (C, PH, PW); flexvision pools NHWC and flattens
(PH, PW, C), so fc6's input rows are permuted once here.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from flexvision.convert.common import (StateDict, abstract_variables, fit_to_template,
                                       register_converter, torch_conv_kernel, torch_linear_kernel)
from flexvision.detection.roi_heads import RoIHeads
from flexvision.detection.rpn import RegionProposalNetwork

PARTS = ("rpn", "roi_heads")


def _part(state_dict: StateDict, part: str) -> StateDict:
    """The entries of ``part``, with a whole model's ``{part}.`` prefix removed if present."""
    prefix = f"{part}."
    prefixed = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return prefixed or dict(state_dict)


def _get(sd: StateDict, name: str, part: str) -> np.ndarray:
    if name not in sd:
        raise ValueError(f"torchvision {part} checkpoint has no {name!r}; it holds "
                         f"{sorted(sd)[:12]}{' ...' if len(sd) > 12 else ''}")
    return np.asarray(sd[name], np.float32)


def _conv(sd, name, part):
    return {"kernel": torch_conv_kernel(_get(sd, f"{name}.weight", part)),
            "bias": _get(sd, f"{name}.bias", part)}


def _dense(sd, name, part):
    return {"kernel": torch_linear_kernel(_get(sd, f"{name}.weight", part)),
            "bias": _get(sd, f"{name}.bias", part)}


def rpn_params(state_dict: StateDict) -> tuple[dict, int]:
    """(flax params of RegionProposalNetwork, conv_depth) from torchvision RPN names."""
    sd = _part(state_dict, "rpn")
    if "head.conv.weight" in sd:  # torchvision < 0.13 (and its published COCO weights)
        head = {"conv_0": _conv(sd, "head.conv", "rpn")}
        depth = 1
    else:
        depth = len({k.split(".")[2] for k in sd if k.startswith("head.conv.")})
        head = {f"conv_{i}": _conv(sd, f"head.conv.{i}.0", "rpn") for i in range(depth)}
    head["cls_logits"] = _conv(sd, "head.cls_logits", "rpn")
    head["bbox_pred"] = _conv(sd, "head.bbox_pred", "rpn")
    return {"head": head}, depth


def roi_heads_params(state_dict: StateDict, box_output_size: int = 7) -> tuple[dict, dict]:
    """(flax params of RoIHeads, the module fields read from the arrays) from torchvision names.

    fc6 (rep, C * S * S) in (C, S, S) order becomes a (S * S * C, rep) kernel in (S, S, C)
    order, S = ``box_output_size``.
    """
    sd = _part(state_dict, "roi_heads")
    fc6 = _get(sd, "box_head.fc6.weight", "roi_heads")
    rep, flat = fc6.shape
    s = int(box_output_size)
    if flat % (s * s):
        raise ValueError(f"box_head.fc6 takes {flat} inputs, not C * {s} * {s}; pass the "
                         f"checkpoint's box_output_size")
    c = flat // (s * s)
    fc6 = fc6.reshape(rep, c, s, s).transpose(2, 3, 1, 0).reshape(s * s * c, rep)
    params = {"box_head": {"fc6": {"kernel": np.ascontiguousarray(fc6),
                                   "bias": _get(sd, "box_head.fc6.bias", "roi_heads")},
                           "fc7": _dense(sd, "box_head.fc7", "roi_heads")},
              "box_predictor": {"cls_score": _dense(sd, "box_predictor.cls_score", "roi_heads"),
                                "bbox_pred": _dense(sd, "box_predictor.bbox_pred", "roi_heads")}}
    fields = {"num_classes": int(params["box_predictor"]["cls_score"]["bias"].shape[0]),
              "representation_size": int(rep), "box_output_size": s,
              "with_masks": any(k.startswith("mask_head.") for k in sd)}
    if fields["with_masks"]:
        depth = len({k.split(".")[1] for k in sd if k.startswith("mask_head.")})
        # torchvision < 0.13 (and its published COCO weights) names the convs mask_fcn1..N.
        legacy = "mask_head.mask_fcn1.weight" in sd
        params["mask_head"] = {
            f"conv_{i}": _conv(sd, f"mask_head.mask_fcn{i + 1}" if legacy else f"mask_head.{i}.0",
                               "roi_heads") for i in range(depth)}
        up = _get(sd, "mask_predictor.conv5_mask.weight", "roi_heads")  # (in, out, 2, 2)
        params["mask_predictor"] = {
            "kernel": np.ascontiguousarray(up.transpose(2, 3, 0, 1)),
            "bias": _get(sd, "mask_predictor.conv5_mask.bias", "roi_heads"),
            "mask_fcn_logits": _conv(sd, "mask_predictor.mask_fcn_logits", "roi_heads")}
        fields["mask_layers"] = tuple(int(params["mask_head"][f"conv_{i}"]["bias"].shape[0])
                                      for i in range(depth))
        fields["mask_dim_reduced"] = int(up.shape[1])
    return params, fields


def _template_features(channels: int, levels: int = 4, size: int = 32):
    return [jnp.zeros((1, size >> i, size >> i, channels), jnp.float32) for i in range(levels)]


@register_converter("torchvision", names=PARTS,
                    description="torchvision Mask R-CNN heads: 'rpn', 'roi_heads'")
def convert(part: str, state_dict: StateDict, **fields: Any):
    """torchvision ``part`` ('rpn' or 'roi_heads') -> (flax module, {'params': ...})."""
    if part == "rpn":
        params, depth = rpn_params(state_dict)
        model = RegionProposalNetwork(conv_depth=depth, **fields)
        channels = params["head"]["cls_logits"]["kernel"].shape[2]
        template = abstract_variables(
            model, _template_features(channels, len(model.anchor_sizes)),
            jnp.array([[128, 128]]), (128, 128))
    elif part == "roi_heads":
        params, read = roi_heads_params(state_dict, fields.pop("box_output_size", 7))
        overlap = {k: (fields[k], v) for k, v in read.items() if k in fields and fields[k] != v}
        if overlap:
            raise ValueError(f"kwargs contradict the checkpoint (given, checkpoint): {overlap}")
        model = RoIHeads(**{**read, **fields})
        s = model.box_output_size
        channels = params["box_head"]["fc6"]["kernel"].shape[0] // (s * s)
        template = abstract_variables(model, _template_features(channels),
                                      jnp.zeros((1, 2, 4)) + jnp.array([0, 0, 8, 8.]),
                                      jnp.ones((1, 2), bool), jnp.array([[128, 128]]), (128, 128))
    else:
        raise ValueError(f"unknown torchvision part {part!r}; accepted: {PARTS}")
    return model, {"params": fit_to_template(template["params"], params,
                                              source=f"torchvision {part}")}
