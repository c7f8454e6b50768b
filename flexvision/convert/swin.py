"""timm Swin Transformer state dicts -> flexvision.models.swin.SwinTransformer variables.

    model, variables = convert.from_timm("swin_tiny_patch4_window7_224", "model.safetensors")

timm's names map one to one (``layers.N.blocks.M.attn.qkv.weight`` ->
``params/layers_N/blocks_M/attn/qkv/kernel``, ``patch_embed.proj`` -> ``patch_embed_proj``,
``head.fc`` -> ``head``). Both timm layouts are read: timm >= 0.9 (``layers.N.downsample`` at the
start of stages 2-4, ``head.fc``) and older checkpoints / the official repo (``downsample`` at the
end of stages 1-3, ``head``). Buffers (``relative_position_index``, ``attn_mask``) are ignored:
flexvision builds them from static shapes. A bias table made for another window is resampled
bicubically to the model's window (:func:`resize_relative_position_bias_table`).
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp

from flexvision.convert.common import (StateDict, abstract_variables, fit_to_template,
                                       register_converter, torch_conv_kernel, torch_linear_kernel)
from flexvision.layers.flex import resize_relative_position_bias_table
from flexvision.models.swin import stage_windows
from flexvision.registry import create_model

# timm constructor kwargs that change nothing in flexvision's model (any size is accepted).
_IGNORED_TIMM_KWARGS = ("dynamic_img_size", "dynamic_img_pad", "strict_img_size", "pretrained")
_SUPPORTED_TIMM_KWARGS = ("img_size", "in_chans", "patch_size", "embed_dim", "depths", "num_heads",
                          "window_size", "mlp_ratio", "qkv_bias", "num_classes", "drop_rate",
                          "proj_drop_rate", "attn_drop_rate", "drop_path_rate")


def _modernize(state_dict: StateDict) -> StateDict:
    """Old timm / official layout -> timm >= 0.9 (downsample moved to the next stage, head.fc)."""
    if not any(key.startswith("layers.0.downsample.") for key in state_dict):
        return state_dict  # timm >= 0.9 never has a downsample in stage 1
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.downsample",
                     lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        if key.startswith("head.") and not key.startswith("head.fc."):
            key = "head.fc." + key[len("head."):]
        out[key] = value
    return out


def _flax_name(key: str) -> str | None:
    """timm parameter name -> '/'-joined flax path (None for buffers flexvision rebuilds)."""
    if key.endswith(("relative_position_index", "attn_mask")):
        return None
    key = key.replace("patch_embed.proj.", "patch_embed_proj.")
    key = key.replace("patch_embed.norm.", "patch_embed_norm.")
    key = key.replace("head.fc.", "head.")
    key = re.sub(r"layers\.(\d+)\.", r"layers_\1.", key)
    key = re.sub(r"blocks\.(\d+)\.", r"blocks_\1.", key)
    return "params/" + key.replace(".", "/")


def _table_window(rows: int, stage_window: tuple[int, int]) -> tuple[int, int]:
    """The window a model's bias table of ``rows`` rows is made for: the stage's window, or the
    smaller square window a stage gets when its design map is smaller than the window."""
    if (2 * stage_window[0] - 1) * (2 * stage_window[1] - 1) == rows:
        return stage_window
    side = int(round(rows ** 0.5))
    return ((side + 1) // 2, (side + 1) // 2)


def _convert_tensor(path: str, value, template_shape, windows) -> Any:
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "weight":
        if value.ndim == 4:
            return path[:-len("weight")] + "kernel", torch_conv_kernel(value)
        if value.ndim == 2:
            return path[:-len("weight")] + "kernel", torch_linear_kernel(value)
        return path[:-len("weight")] + "scale", value  # LayerNorm
    if leaf == "relative_position_bias_table" and template_shape is not None:
        if tuple(value.shape) != tuple(template_shape):
            stage = int(re.match(r"params/layers_(\d+)/", path).group(1))
            value = resize_relative_position_bias_table(
                value, _table_window(template_shape[0], windows[stage]))
    return path, value


def _model_kwargs(timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = {}
    for key, value in timm_kwargs.items():
        if key == "global_pool" and value == "avg":
            continue
        if key in _IGNORED_TIMM_KWARGS:
            continue
        if key not in _SUPPORTED_TIMM_KWARGS:
            raise ValueError(f"timm Swin kwarg {key!r} is not supported by the importer; supported "
                             f"are {list(_SUPPORTED_TIMM_KWARGS)} (and, ignored because "
                             f"flexvision's Swin takes any size: {list(_IGNORED_TIMM_KWARGS)})")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return kwargs


@register_converter("timm", prefixes=("swin_",),
                    description="timm Swin Transformer (swin_*_patch4_window*)")
def convert_timm_swin(name: str, state_dict: StateDict, **timm_kwargs: Any):
    """Builds flexvision's ``name`` with timm's constructor kwargs and loads timm's state dict.

    Returns ``(model, variables)``. A relative-position bias table made for another window is
    resized bicubically (official Swin / timm's ``resize_rel_pos_bias_table_simple``).
    """
    kwargs = _model_kwargs(timm_kwargs)
    if "in_chans" not in kwargs and "patch_embed.proj.weight" in state_dict:
        kwargs["in_chans"] = int(state_dict["patch_embed.proj.weight"].shape[1])
    model = create_model(name, **kwargs)
    template = abstract_variables(model, jnp.zeros((1, 32, 32, model.in_chans), jnp.float32))
    from flax import traverse_util  # pylint: disable=import-outside-toplevel

    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(template, sep="/").items()}
    windows = stage_windows(model.window_size, len(model.depths))
    converted = {}
    for key, value in _modernize(state_dict).items():
        path = _flax_name(key)
        if path is None:
            continue
        path, value = _convert_tensor(path, value, shapes.get(path), windows)
        converted[path] = value
    return model, fit_to_template(template, converted, source=f"timm {name}")
