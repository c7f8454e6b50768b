"""Weight import from the checkpoints people already have.

    from flexvision import convert
    model, variables = convert.from_timm("flexivit_small", "model.safetensors", num_classes=10)
    model, variables = convert.from_big_vision("flexivit_s_i1k.npz")
    model, variables = convert.from_official("cyclemlp", state_dict, layers=[2, 2, 4, 2], ...)
    rpn, variables = convert.from_torchvision("rpn", maskrcnn_state_dict)
    logits = model.apply(variables, images_nhwc)

``state_dict`` is a mapping name -> array (numpy, jax or torch) or a path to a .safetensors or
.npz file; a checkpoint that nests it ({'model': sd, 'optimizer': ...}, 'state_dict',
'model_ema', a 'module.' prefix) is unwrapped, and a truncated or corrupted file is a ValueError
naming it (:func:`load_state_dict`). Each family's importer lives in its own file here and
registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from flexvision.convert.common import find_converter, load_state_dict

_IMPORTERS_LOADED = False


def _load_importers() -> None:
    global _IMPORTERS_LOADED
    if _IMPORTERS_LOADED:
        return
    _IMPORTERS_LOADED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "common" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def from_timm(name: str, state_dict: Any, **timm_kwargs: Any):
    """Imports a timm checkpoint of model ``name`` (timm's name and constructor kwargs).

    Returns ``(model, variables)``; the model carries timm's semantics (resize interpolation,
    norms, head), so ``model.apply(variables, x)`` reproduces timm's eval-mode output.
    """
    _load_importers()
    converter = find_converter("timm", name)
    return converter.convert(name, load_state_dict(state_dict), **timm_kwargs)


def from_big_vision(source: Any, **overrides: Any):
    """Imports a big_vision ViT/FlexiViT checkpoint (flat .npz names, with or without 'params/').

    The whole configuration is inferred from the arrays; ``overrides`` replace inferred fields.
    """
    _load_importers()
    converter = find_converter("big_vision", "vit")
    return converter.convert(load_state_dict(source), **overrides)


def from_official(family: str, state_dict: Any, **official_kwargs: Any):
    """Imports an official PyTorch checkpoint ('cyclemlp', 'asmlp', ...) with its constructor kwargs."""
    _load_importers()
    converter = find_converter("official", family)
    return converter.convert(family, load_state_dict(state_dict), **official_kwargs)


def from_torchvision(part: str, state_dict: Any, **fields: Any):
    """Imports torchvision Mask R-CNN heads: ``part`` is 'rpn' or 'roi_heads' (convert/torchvision.py)."""
    _load_importers()
    converter = find_converter("torchvision", part)
    return converter.convert(part, load_state_dict(state_dict), **fields)


__all__ = ["from_big_vision", "from_official", "from_timm", "from_torchvision", "load_state_dict"]
