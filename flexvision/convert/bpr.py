"""tinyalpha/BPR refinement-network checkpoints -> flexvision ``bpr_hrnet18s`` / ``bpr_hrnet48``.

    model, variables = convert.from_official("bpr_hrnet18s", state_dict)
    model, variables = convert.from_official("bpr_hrnet18s", state_dict, extra=cfg_backbone_extra)
    logits = model.apply(variables, x)   # x: (B, H, W, 4) normalised RGB + mask in {-1, +1}

BPR checkpoints are mmseg ``EncoderDecoderRefine`` state dicts (the ``state_dict`` entry of the
.pth file): ``backbone.*`` (``HRNetRefine``: mmseg's HRNet, whose module names are timm's, plus
``conv_mask``) and ``decode_head.*`` (``FCNHead``: ``convs.0.{conv,bn}`` and ``conv_seg``). The
HRNet stages are those of ``extra`` (the mmseg config's ``model.backbone.extra`` dict) when given,
otherwise read off the checkpoint's tensor names and shapes (:func:`infer_stages`).

``conv_mask`` (64, 1, 3, 3) is stacked after ``conv1`` (64, 3, 3, 3) on the input-channel axis:
conv1(rgb) + conv_mask(mask) is one convolution over the 4 channels (see
``models/hrnet.py`` ``HRNetSegmentation``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flexvision import registry
from flexvision.convert.common import (StateDict, abstract_variables, fit_to_template,
                                       register_converter)
from flexvision.convert.hrnet import convert_state_dict
from flexvision.models.hrnet import BPR_STAGES, StageSpec

_MMSEG_BLOCKS = {"BASIC": "basic", "BOTTLENECK": "bottleneck"}
# mmseg FCNHead module -> the HRNetV2 head names convert/hrnet.py reads ('last_layer.{0,1,3}').
_HEAD_MODULES = {"convs.0.conv": "last_layer.0", "convs.0.bn": "last_layer.1",
                 "conv_seg": "last_layer.3"}


def stages_from_mmseg(extra: Mapping[str, Any]) -> tuple[StageSpec, ...]:
    """mmseg HRNet ``extra`` (``stage1`` .. ``stage4`` dicts with num_modules, num_branches, block
    'BASIC'/'BOTTLENECK', num_blocks, num_channels) -> flexvision :class:`StageSpec` tuple."""
    stages = []
    for s in range(1, 5):
        cfg = extra.get(f"stage{s}") if isinstance(extra, Mapping) else None
        if cfg is None:
            raise ValueError(f"mmseg HRNet extra must have 'stage1'..'stage4' dicts, got "
                             f"{sorted(extra) if isinstance(extra, Mapping) else extra!r}")
        block = _MMSEG_BLOCKS.get(str(cfg["block"]).upper())
        if block is None:
            raise ValueError(f"stage{s}: block {cfg['block']!r} is not one of "
                             f"{sorted(_MMSEG_BLOCKS)}")
        spec = StageSpec(int(cfg["num_modules"]), block, tuple(int(b) for b in cfg["num_blocks"]),
                         tuple(int(c) for c in cfg["num_channels"]))
        if int(cfg.get("num_branches", len(spec.num_channels))) != len(spec.num_channels):
            raise ValueError(f"stage{s}: num_branches {cfg['num_branches']} does not match "
                             f"num_channels {spec.num_channels}")
        stages.append(spec)
    return tuple(stages)


def infer_stages(state_dict: StateDict) -> tuple[StageSpec, ...]:
    """The HRNet stages of a ``backbone.*`` state dict: modules, blocks per branch, block widths
    and block types counted from the tensor names and shapes."""
    def count(pattern: str) -> int:
        found = {int(m[1]) for k in state_dict for m in [re.fullmatch(pattern, k)] if m}
        return max(found) + 1 if found else 0

    def block_type(prefix: str) -> str:
        return "bottleneck" if f"{prefix}.conv3.weight" in state_dict else "basic"

    layer1 = count(r"backbone\.layer1\.(\d+)\.conv1\.weight")
    if not layer1:
        raise ValueError("not a BPR/mmseg HRNet checkpoint: no backbone.layer1.* tensors")
    stages = [StageSpec(1, block_type("backbone.layer1.0"), (layer1,),
                        (int(state_dict["backbone.layer1.0.conv1.weight"].shape[0]),))]
    for s in (2, 3, 4):
        modules = count(rf"backbone\.stage{s}\.(\d+)\..*")
        branches = count(rf"backbone\.stage{s}\.0\.branches\.(\d+)\..*")
        if not modules:
            break
        blocks, widths = [], []
        for b in range(branches):
            prefix = rf"backbone\.stage{s}\.0\.branches\.{b}"
            blocks.append(count(rf"{prefix}\.(\d+)\.conv1\.weight"))
            widths.append(int(state_dict[f"backbone.stage{s}.0.branches.{b}.0.conv1.weight"]
                              .shape[0]))
        stages.append(StageSpec(modules, block_type(f"backbone.stage{s}.0.branches.0.0"),
                                tuple(blocks), tuple(widths)))
    return tuple(stages)


def to_hrnet_names(state_dict: StateDict) -> StateDict:
    """BPR/mmseg names -> the names ``convert/hrnet.py`` reads (timm HRNet + HRNetV2 head), with
    ``conv_mask`` stacked into ``conv1``; ValueError for tensors BPR's network does not have."""
    out, unexpected = {}, []
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            name = key[len("backbone."):]
            if name != "conv_mask.weight":
                out[name] = value
        elif key.startswith("decode_head."):
            module, _, leaf = key[len("decode_head."):].rpartition(".")
            if module in _HEAD_MODULES:
                out[f"{_HEAD_MODULES[module]}.{leaf}"] = value
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"BPR checkpoint: unexpected tensors {unexpected[:10]}; expected "
                         f"backbone.* (HRNetRefine) and decode_head.{{convs.0.conv, convs.0.bn, "
                         f"conv_seg}} (FCNHead with one conv, no concat_input)")
    if "backbone.conv_mask.weight" in state_dict and "conv1.weight" in out:
        out["conv1.weight"] = np.concatenate(
            [out["conv1.weight"], np.asarray(state_dict["backbone.conv_mask.weight"])], axis=1)
    return out


@register_converter("official", names=set(BPR_STAGES),
                    description="bpr_hrnet18s / bpr_hrnet48: tinyalpha/BPR refinement-network "
                                "checkpoints (mmseg EncoderDecoderRefine: backbone.*, "
                                "decode_head.*)")
def convert_bpr(name: str, state_dict: StateDict, *, extra: Mapping[str, Any] | None = None,
                **overrides: Any):
    """Imports a BPR state dict as ``(model, variables)``; see the module docstring.

    ``overrides`` are flexvision constructor fields (e.g. ``dtype``); ``num_classes`` is read from
    ``decode_head.conv_seg.weight``.
    """
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    stages = stages_from_mmseg(extra) if extra is not None else infer_stages(state_dict)
    kwargs = {"stages": stages, **overrides}
    if "decode_head.conv_seg.weight" in state_dict:
        kwargs.setdefault("num_classes", int(state_dict["decode_head.conv_seg.weight"].shape[0]))
    model = registry.create_model(name, **kwargs)
    converted = convert_state_dict(to_hrnet_names(state_dict))
    template = abstract_variables(model, jnp.zeros((1, 32, 32, model.in_chans), jnp.float32))
    variables = fit_to_template(template, converted, source=f"BPR {name}")
    return model, jax.tree_util.tree_map(jnp.asarray, variables)
