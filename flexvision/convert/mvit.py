"""timm MViTv2 (``MultiScaleVit``) and SlowFast MViT v1 checkpoints -> flexvision ``MultiScaleVit``.

    model, variables = convert.from_timm("mvitv2_tiny", "mvitv2_tiny.safetensors")
    model, variables = convert.from_timm("mvitv2_tiny", state_dict, depths=(1, 2, 1, 1),
                                         embed_dim=24, num_heads=1, img_size=224)

Keyword arguments are fields of timm's ``MultiScaleVitCfg`` (depths, embed_dim, num_heads,
expand_attn, use_cls_token, ...), ``cfg=`` (a dict or timm's dataclass holding them), ``img_size``
and the model's own fields (global_pool, drop_path_rate, dtype). ``num_classes``, ``in_chans`` and
the presence of a class token / absolute position embedding are read from the checkpoint unless
given. SlowFast/official MViT names (``blocks.N``, ``blocks.N.proj``, ``head.projection``,
optionally under ``model_state.``) are accepted too and remapped to timm's stage layout, as timm's
``checkpoint_filter_fn`` does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from flexvision import registry
from flexvision.convert.common import (StateDict, abstract_variables, fit_to_template,
                                       register_converter, torch_conv_kernel,
                                       torch_linear_kernel)
from flexvision.layers import flex
from flexvision.models import mvit as mvit_models

_MODEL_FIELDS = frozenset(mvit_models.TIMM_CFG_FIELDS)


def _cfg_as_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if dataclasses.is_dataclass(cfg):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    raise ValueError(f"cfg must be a dict or timm's MultiScaleVitCfg, got {type(cfg).__name__}")


def _as_tuples(value: Any) -> Any:
    """JSON lists -> tuples, so the module's fields are hashable (static under jit)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def _official_to_timm_names(state: StateDict, depths: tuple[int, ...], expand_attn: bool
                            ) -> StateDict:
    """Flat official block indices -> timm's stages.S.blocks.B (timm ``checkpoint_filter_fn``)."""
    if any(k.startswith("stages.") for k in state):
        return state
    block_to_stage = {}
    for stage, depth in enumerate(depths):
        for i in range(depth):
            block_to_stage[len(block_to_stage)] = (stage, i)
    shortcut = "shortcut_proj_attn" if expand_attn else "shortcut_proj_mlp"
    renamed = {}
    for key, value in state.items():
        key = key.removeprefix("model_state.")
        match = re.match(r"blocks\.(\d+)\.(.*)", key)
        if match:
            index = int(match.group(1))
            if index not in block_to_stage:
                raise ValueError(f"checkpoint has block {index} but depths {depths} give "
                                 f"{len(block_to_stage)} blocks; pass the right depths=")
            stage, block = block_to_stage[index]
            rest = match.group(2)
            rest = re.sub(r"^proj\.", f"{shortcut}.", rest)
            key = f"stages.{stage}.blocks.{block}.{rest}"
        key = key.replace("head.projection.", "head.fc.")
        renamed[key] = value
    return renamed


_LEAF = {"weight": "kernel", "bias": "bias"}
_NORMS = ("norm1", "norm2", "norm_q", "norm_k", "norm_v")


def _convert_tensor(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """One timm tensor -> (flax '/'-path under params, array in flax layout)."""
    if key in ("cls_token", "pos_embed"):
        return key, value
    if key.startswith("patch_embed.proj."):
        leaf = key.rsplit(".", 1)[1]
        return f"patch_embed/{_LEAF[leaf]}", torch_conv_kernel(value) if leaf == "weight" else value
    if key.startswith("norm."):
        return f"norm/{'scale' if key.endswith('weight') else 'bias'}", value
    if key.startswith("head.fc."):
        leaf = key.rsplit(".", 1)[1]
        return f"head/{_LEAF[leaf]}", torch_linear_kernel(value) if leaf == "weight" else value
    match = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key)
    if not match:
        raise ValueError(f"unexpected tensor {key!r} in an MViT checkpoint")
    block = f"stages_{match.group(1)}_blocks_{match.group(2)}"
    parts = match.group(3).split(".")
    *modules, leaf = parts
    path = "/".join([block, *modules])
    if modules[-1:] and modules[-1] in _NORMS:
        return f"{path}/{'scale' if leaf == 'weight' else 'bias'}", value
    if leaf in ("rel_pos_h", "rel_pos_w"):
        return f"{path}/{leaf}", value
    if modules[-1].startswith("pool_"):
        return f"{path}/kernel", torch_conv_kernel(value)
    return f"{path}/{_LEAF[leaf]}", torch_linear_kernel(value) if leaf == "weight" else value


@register_converter("timm", prefixes=("mvitv2_", "mvit_"),
                    description="MViTv2 / MViT (timm MultiScaleVit, SlowFast MViT names)")
def convert_mvit(name: str, state_dict: StateDict, **kwargs: Any):
    """Builds flexvision's MultiScaleVit for timm model ``name`` and imports ``state_dict``."""
    kwargs = {**_cfg_as_dict(kwargs.pop("cfg", None)), **kwargs}
    kwargs = {k: _as_tuples(v) for k, v in kwargs.items()}
    unknown = sorted(set(kwargs) - _MODEL_FIELDS)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; accepted are the fields of "
                         f"timm's MultiScaleVitCfg and the model: {sorted(_MODEL_FIELDS)}")
    state = {k.removeprefix("model_state."): v for k, v in state_dict.items()}
    head = state.get("head.fc.weight", state.get("head.projection.weight"))
    kwargs.setdefault("num_classes", 0 if head is None else int(head.shape[0]))
    if "patch_embed.proj.weight" in state:
        kwargs.setdefault("in_chans", int(state["patch_embed.proj.weight"].shape[1]))
    kwargs.setdefault("use_cls_token", "cls_token" in state)
    kwargs.setdefault("use_abs_pos", "pos_embed" in state)
    has_rel_pos = any(k.endswith("rel_pos_h") for k in state)
    kwargs.setdefault("rel_pos_type", "spatial" if has_rel_pos else "none")
    num_blocks = sum(k.endswith(".norm1.weight") for k in state)
    num_pooled_q = sum(k.endswith(".attn.pool_q.weight") for k in state)
    if 0 < num_pooled_q < num_blocks:  # SlowFast v1: q pooled only at the stage transitions
        kwargs.setdefault("pool_q_all_blocks", False)

    try:
        model = registry.create_model(name, **kwargs)
    except ValueError as err:
        if not str(err).startswith("unknown model name"):
            raise
        model = mvit_models.MultiScaleVit(**kwargs)
    state = _official_to_timm_names(state, tuple(model.depths), model.expand_attn)
    converted = dict(_convert_tensor(k, v) for k, v in state.items())
    converted = {f"params/{k}": v for k, v in converted.items()}

    size = flex.to_pair(model.img_size, "img_size")
    template = abstract_variables(model, jnp.zeros((1, *size, model.in_chans), jnp.float32))
    try:
        variables = fit_to_template(template, converted, source=f"timm {name}")
    except ValueError as err:
        if "rel_pos_" in str(err) or "pos_embed" in str(err):
            raise ValueError(f"{err}\nThe position tables are sized by img_size: pass the size the "
                             f"checkpoint was trained at (img_size={model.img_size} here); the "
                             f"model then runs at any input size.") from None
        raise
    return model, variables
