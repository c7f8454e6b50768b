"""Import of official AS-MLP checkpoints (svip-lab/AS-MLP, models/as_mlp.py ``AS_MLP``).

    model, variables = convert.from_official(
        "asmlp", state_dict, embed_dim=96, depths=[2, 2, 6, 2], shift_size=5, num_classes=1000)

The kwargs are AS_MLP's own. Its 1x1 convolutions become channel FCs; GroupNorm(1) weights map
to flax GroupNorm scale/bias. ``layers.{i}.downsample`` (the merging after stage i + 1) becomes
``downsample{i + 1}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flexvision.convert.common import (StateDict, abstract_variables, fit_to_template,
                                       register_converter, torch_conv_kernel, torch_linear_kernel)
from flexvision.models.asmlp import ASMLP

# AS_MLP constructor arguments that change nothing at inference or that flexvision fixes.
_IGNORED_KWARGS = {"img_size", "norm_layer", "use_checkpoint", "pretrained"}

_BLOCK_FCS = ("axial_shift.conv1", "axial_shift.conv2_1", "axial_shift.conv2_2",
              "axial_shift.conv3", "mlp.fc1", "mlp.fc2")
_BLOCK_NORMS = ("norm1", "norm2", "axial_shift.norm1", "axial_shift.norm2")


def _conv1x1_kernel(weight: np.ndarray, key: str) -> np.ndarray:
    """PyTorch 1x1 Conv2d weight (out, in, 1, 1) -> Dense kernel (in, out)."""
    if weight.ndim != 4 or weight.shape[2:] != (1, 1):
        raise ValueError(f"{key}: expected a 1x1 convolution weight (out, in, 1, 1), got shape "
                         f"{weight.shape}")
    return torch_linear_kernel(weight[:, :, 0, 0])


def convert_state_dict(sd: StateDict, depths) -> dict[str, np.ndarray]:
    """Official AS_MLP state dict -> flat flax variables ('params/...' names)."""
    params = {"patch_embed/kernel": torch_conv_kernel(sd.pop("patch_embed.proj.weight")),
              "patch_embed/bias": sd.pop("patch_embed.proj.bias"),
              "norm/scale": sd.pop("norm.weight"), "norm/bias": sd.pop("norm.bias")}
    if "patch_embed.norm.weight" in sd:
        params["patch_norm/scale"] = sd.pop("patch_embed.norm.weight")
        params["patch_norm/bias"] = sd.pop("patch_embed.norm.bias")
    if "head.weight" in sd:
        params["head/kernel"] = torch_linear_kernel(sd.pop("head.weight"))
        params["head/bias"] = sd.pop("head.bias")
    for i, depth in enumerate(depths):
        for j in range(depth):
            prefix, target = f"layers.{i}.blocks.{j}", f"stage{i + 1}_block{j}"
            for fc in _BLOCK_FCS:
                key = f"{prefix}.{fc}"
                params[f"{target}/{fc.replace('.', '/')}/kernel"] = _conv1x1_kernel(
                    sd.pop(f"{key}.weight"), key)
                if f"{key}.bias" in sd:
                    params[f"{target}/{fc.replace('.', '/')}/bias"] = sd.pop(f"{key}.bias")
            for norm in _BLOCK_NORMS:
                name = f"{target}/{norm.replace('.', '/')}"
                params[f"{name}/scale"] = sd.pop(f"{prefix}.{norm}.weight")
                params[f"{name}/bias"] = sd.pop(f"{prefix}.{norm}.bias")
        if i < len(depths) - 1:
            prefix, target = f"layers.{i}.downsample", f"downsample{i + 1}"
            params[f"{target}/reduction/kernel"] = _conv1x1_kernel(
                sd.pop(f"{prefix}.reduction.weight"), f"{prefix}.reduction")
            params[f"{target}/norm/scale"] = sd.pop(f"{prefix}.norm.weight")
            params[f"{target}/norm/bias"] = sd.pop(f"{prefix}.norm.bias")
    return {f"params/{k}": v for k, v in params.items()}


@register_converter("official", names={"asmlp"},
                    description="asmlp: svip-lab/AS-MLP AS_MLP state dicts")
def convert_official_asmlp(name: str, state_dict: StateDict, *, embed_dim: int = 96,
                           depths=(2, 2, 6, 2), shift_size: int = 5, num_classes: int = 1000,
                           in_chans: int | None = None,
                           patch_size: int = 4, mlp_ratio: float = 4.0, as_bias: bool = True,
                           patch_norm: bool = True, drop_rate: float = 0.0,
                           drop_path_rate: float = 0.0, pad_to_fit: bool = True, dtype=None,
                           **ignored: Any):
    """Builds flexvision's ASMLP from AS_MLP kwargs and loads the official state dict."""
    del name
    unknown = sorted(set(ignored) - _IGNORED_KWARGS)
    if unknown:
        raise ValueError(f"asmlp: unknown AS_MLP argument(s) {unknown}; accepted are embed_dim, "
                         f"depths, shift_size, num_classes, in_chans, patch_size, mlp_ratio, as_bias, "
                         f"patch_norm, drop_rate, drop_path_rate, pad_to_fit and "
                         f"{sorted(_IGNORED_KWARGS)}")
    depths = tuple(int(d) for d in depths)
    if in_chans is None:  # read from the patch embedding (AS_MLP's own default is 3)
        weight = state_dict.get("patch_embed.proj.weight")
        in_chans = 3 if weight is None else int(weight.shape[1])
    model = ASMLP(embed_dim=int(embed_dim), depths=depths, shift_size=int(shift_size),
                  in_chans=int(in_chans),
                  mlp_ratio=mlp_ratio, as_bias=as_bias, patch_size=int(patch_size),
                  patch_norm=patch_norm, num_classes=int(num_classes), drop_rate=drop_rate,
                  drop_path_rate=drop_path_rate, pad_to_fit=pad_to_fit, dtype=dtype)
    remaining = dict(state_dict)
    try:
        flat = convert_state_dict(remaining, depths)
    except KeyError as err:
        raise ValueError(f"asmlp: the state dict has no entry {err.args[0]!r} that AS_MLP with "
                         f"embed_dim={embed_dim}, depths={list(depths)} would have; check the "
                         f"kwargs") from err
    if remaining:
        raise ValueError(f"asmlp: {len(remaining)} entries of the state dict have no place in "
                         f"AS_MLP(embed_dim={embed_dim}, depths={list(depths)}): "
                         f"{sorted(remaining)[:10]}; check the kwargs")
    size = 8 * int(patch_size)
    template = abstract_variables(model, np.zeros((1, size, size, model.in_chans), np.float32))
    return model, fit_to_template(template, flat, source="asmlp (official)")
