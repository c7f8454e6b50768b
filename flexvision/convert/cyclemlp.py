"""Import of official CycleMLP checkpoints (ShoufaChen/CycleMLP, cycle_mlp.py ``CycleNet``).

    model, variables = convert.from_official(
        "cyclemlp", state_dict, layers=[2, 2, 4, 2], embed_dims=[64, 128, 320, 512],
        mlp_ratios=[4, 4, 4, 4], transitions=[True, True, True, True], num_classes=1000)

The kwargs are CycleNet's own. ``network.{k}`` in the official state dict interleaves stages
(``nn.Sequential`` of CycleBlocks) and Downsample transitions in construction order; each
CycleFC's ``offset`` buffer is a constant of the layer, checked here against the offsets the
flax model generates and then dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flexvision.convert.common import (StateDict, abstract_variables, fit_to_template,
                                       register_converter, torch_conv_kernel, torch_linear_kernel)
from flexvision.models.cyclemlp import CycleMLP, cycle_fc_offset_buffer

# CycleNet constructor arguments that change nothing at inference or that flexvision fixes.
_IGNORED_KWARGS = {"img_size", "segment_dim", "qk_scale", "drop_rate",
                   "attn_drop_rate", "norm_layer", "mlp_fn", "fork_feat", "pretrained"}


def _network_layout(depths, embed_dims, transitions) -> list[tuple[str, int]]:
    """``network.{k}`` entries of the official CycleNet: ('stage', i) or ('downsample', i + 1)."""
    layout = []
    for i in range(len(depths)):
        layout.append(("stage", i))
        if i == len(depths) - 1:
            break
        if transitions[i] or embed_dims[i] != embed_dims[i + 1]:
            layout.append(("downsample", i + 1))
    return layout


# (official name inside a CycleBlock, flax name) of its Linear layers.
_BLOCK_LINEARS = (("attn.reweight.fc1", "attn/reweight/fc1"),
                  ("attn.reweight.fc2", "attn/reweight/fc2"), ("attn.proj", "attn/proj"),
                  ("mlp.fc1", "mlp/fc1"), ("mlp.fc2", "mlp/fc2"))


def _block_params(sd: "_Reader", prefix: str) -> dict[str, np.ndarray]:
    """One CycleBlock: official ``{prefix}.*`` -> flax names."""
    out = {}
    for norm in ("norm1", "norm2"):
        out[f"{norm}/scale"] = sd[f"{prefix}.{norm}.weight"]
        out[f"{norm}/bias"] = sd[f"{prefix}.{norm}.bias"]
    attn = f"{prefix}.attn"
    out["attn/mlp_c/kernel"] = torch_linear_kernel(sd[f"{attn}.mlp_c.weight"])
    if f"{attn}.mlp_c.bias" in sd:
        out["attn/mlp_c/bias"] = sd[f"{attn}.mlp_c.bias"]
    for sfc, kernel_size in (("sfc_h", (1, 3)), ("sfc_w", (3, 1))):
        weight = sd[f"{attn}.{sfc}.weight"]
        if weight.shape[2:] != (1, 1):
            raise ValueError(f"{attn}.{sfc}.weight has shape {weight.shape}; CycleFC weights are "
                             f"(out, in, 1, 1)")
        out[f"attn/{sfc}/kernel"] = torch_linear_kernel(weight[:, :, 0, 0])
        if f"{attn}.{sfc}.bias" in sd:
            out[f"attn/{sfc}/bias"] = sd[f"{attn}.{sfc}.bias"]
        _check_offsets(sd, f"{attn}.{sfc}.offset", weight.shape[1], kernel_size)
    for official, flax_name in _BLOCK_LINEARS:
        out[f"{flax_name}/kernel"] = torch_linear_kernel(sd[f"{prefix}.{official}.weight"])
        out[f"{flax_name}/bias"] = sd[f"{prefix}.{official}.bias"]
    return out


class _Reader(dict):
    """A state dict that remembers which entries were read, to report the ones left over."""

    def __init__(self, state_dict: StateDict):
        super().__init__(state_dict)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> np.ndarray:
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def unread(self) -> list[str]:
        return sorted(set(self) - self.read)


def _check_offsets(sd: StateDict, key: str, channels: int, kernel_size) -> None:
    """The checkpoint's offset buffer must equal the constant Cycle FC offsets (gen_offset)."""
    if key not in sd:
        return  # a state dict saved without buffers
    expected = cycle_fc_offset_buffer(channels, kernel_size)
    got = np.asarray(sd[key], np.float32)  # reading marks the buffer as used
    if got.shape != expected.shape or not np.array_equal(got, expected):
        raise ValueError(
            f"{key}: the checkpoint's Cycle FC offsets differ from the official constants "
            f"(CycleFC.gen_offset for kernel {kernel_size[0]}x{kernel_size[1]}, {channels} "
            f"channels); flexvision implements exactly those fixed offsets and cannot load "
            f"learned or modified ones")


def convert_state_dict(state_dict: StateDict, depths, embed_dims, transitions) -> dict:
    """Official CycleNet state dict -> flat flax params ('/'-joined names)."""
    sd = state_dict if isinstance(state_dict, _Reader) else _Reader(state_dict)
    params: dict[str, np.ndarray] = {
        "patch_embed/kernel": torch_conv_kernel(sd["patch_embed.proj.weight"]),
        "patch_embed/bias": sd["patch_embed.proj.bias"],
        "norm/scale": sd["norm.weight"],
        "norm/bias": sd["norm.bias"],
    }
    if "head.weight" in sd:
        params["head/kernel"] = torch_linear_kernel(sd["head.weight"])
        params["head/bias"] = sd["head.bias"]
    for k, (kind, i) in enumerate(_network_layout(depths, embed_dims, transitions)):
        if kind == "downsample":
            params[f"downsample{i}/kernel"] = torch_conv_kernel(sd[f"network.{k}.proj.weight"])
            params[f"downsample{i}/bias"] = sd[f"network.{k}.proj.bias"]
            continue
        for j in range(depths[i]):
            for name, value in _block_params(sd, f"network.{k}.{j}").items():
                params[f"stage{i + 1}_block{j}/{name}"] = value
    return {f"params/{k}": v for k, v in params.items()}


@register_converter("official", names={"cyclemlp"},
                    description="cyclemlp: ShoufaChen/CycleMLP CycleNet state dicts")
def convert_official_cyclemlp(name: str, state_dict: StateDict, *, layers, embed_dims,
                              mlp_ratios, transitions=None, num_classes: int = 1000,
                              in_chans: int | None = None, patch_size: Any = None, qkv_bias: bool = False,
                              skip_lam: float = 1.0, drop_path_rate: float = 0.0, dtype=None,
                              **ignored: Any):
    """Builds flexvision's CycleMLP from CycleNet kwargs and loads the official state dict.

    ``patch_size`` is accepted for CycleNet's signature; the official patch embedding is always
    7x7 with stride 4 whatever it says.
    """
    del name, patch_size
    unknown = sorted(set(ignored) - _IGNORED_KWARGS)
    if unknown:
        raise ValueError(f"cyclemlp: unknown CycleNet argument(s) {unknown}; accepted are layers, "
                         f"embed_dims, mlp_ratios, transitions, num_classes, in_chans, patch_size, "
                         f"qkv_bias, skip_lam, drop_path_rate and {sorted(_IGNORED_KWARGS)}")
    depths = tuple(int(d) for d in layers)
    transitions = tuple(bool(t) for t in (transitions or [False] * len(depths)))
    if in_chans is None:  # read from the patch embedding (CycleNet's own default is 3)
        weight = state_dict.get("patch_embed.proj.weight")
        in_chans = 3 if weight is None else int(weight.shape[1])
    model = CycleMLP(depths=depths, embed_dim=tuple(int(d) for d in embed_dims),
                     mlp_ratio=tuple(float(r) for r in mlp_ratios), transitions=transitions,
                     num_classes=int(num_classes), in_chans=int(in_chans), qkv_bias=qkv_bias,
                     skip_lam=skip_lam, drop_path_rate=drop_path_rate, dtype=dtype)
    reader = _Reader(state_dict)
    try:
        flat = convert_state_dict(reader, depths, model.embed_dims, transitions)
    except KeyError as err:
        raise ValueError(f"cyclemlp: the state dict has no entry {err.args[0]!r} that CycleNet "
                         f"with layers={list(depths)}, embed_dims={list(model.embed_dims)}, "
                         f"transitions={list(transitions)} would have; check the kwargs") from err
    if reader.unread():
        raise ValueError(f"cyclemlp: {len(reader.unread())} entries of the state dict have no "
                         f"place in CycleNet(layers={list(depths)}, embed_dims="
                         f"{list(model.embed_dims)}, transitions={list(transitions)}): "
                         f"{reader.unread()[:10]}; check the kwargs")
    template = abstract_variables(model, np.zeros((1, 32, 32, model.in_chans), np.float32))
    return model, fit_to_template(template, flat, source="cyclemlp (official)")
