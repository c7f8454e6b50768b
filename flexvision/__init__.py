"""flexvision: vision backbones in JAX/Flax that run at any resolution and patch size.

Public API:
    create_model(name, **overrides)  -> flax.linen.Module
    list_models(pattern="*", family=None) -> list of registered names
    convert.from_timm / convert.from_big_vision / convert.from_official -> (model, variables)
"""

from flexvision import convert
from flexvision.registry import create_model, list_models

__all__ = ["convert", "create_model", "list_models"]
__version__ = "0.1.0"
