"""Model registry: timm-style names -> a flax.linen module with its default configuration.

Every architecture file in ``flexvision/models`` registers its variants at import time with
:func:`register_model`. The registry discovers those files itself, so adding a family never
touches this module.

    >>> import flexvision
    >>> model = flexvision.create_model("flexivit_small", num_classes=10)
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import pkgutil
from typing import Any, Callable, Mapping

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One registered configuration: ``builder(**defaults, **overrides)`` makes the module."""

    name: str
    family: str
    builder: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}
_NAME_RESOLVERS: list[Callable[[str], tuple[str, dict[str, Any]] | None]] = []
_FAMILIES_IMPORTED = False


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    family: str,
    description: str = "",
    **defaults: Any,
) -> None:
    """Registers ``name`` so that ``create_model(name)`` returns ``builder(**defaults)``."""
    if name in _REGISTRY:
        raise ValueError(f"model name {name!r} is registered twice (families "
                         f"{_REGISTRY[name].family!r} and {family!r})")
    _REGISTRY[name] = ModelEntry(name, family, builder, dict(defaults), description)


def register_name_resolver(resolver: Callable[[str], tuple[str, dict[str, Any]] | None]) -> None:
    """Adds a resolver for names outside the table (e.g. big_vision's ``"S/16"``).

    A resolver returns ``(registered_name, extra_overrides)`` for names it understands, else None.
    """
    _NAME_RESOLVERS.append(resolver)


def _import_families() -> None:
    global _FAMILIES_IMPORTED
    if _FAMILIES_IMPORTED:
        return
    _FAMILIES_IMPORTED = True
    from flexvision import models  # pylint: disable=import-outside-toplevel

    for info in pkgutil.iter_modules(models.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"flexvision.models.{info.name}")


def resolve(name: str) -> tuple[ModelEntry, dict[str, Any]]:
    """Returns the entry for ``name`` and any overrides implied by the name itself."""
    _import_families()
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {type(name).__name__}: {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name], {}
    for resolver in _NAME_RESOLVERS:
        resolved = resolver(name)
        if resolved is not None:
            registered, overrides = resolved
            return _REGISTRY[registered], dict(overrides)
    close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown model name {name!r}.{hint} flexvision.list_models() lists the "
        f"{len(_REGISTRY)} registered names (timm-style, e.g. 'flexivit_small').")


def _in_type_of(template: Any, value: Any) -> Any:
    """``value`` in the form of ``template``: a dict or list becomes the dataclass ``template``
    is an instance of, a list becomes a tuple where ``template`` is one (element by element
    against its first entry); anything else passes unchanged."""
    if dataclasses.is_dataclass(template) and not isinstance(template, type):
        if isinstance(value, dict):
            return type(template)(**{k: _in_type_of(getattr(template, k, None), v)
                                     for k, v in value.items()})
        if isinstance(value, (list, tuple)):
            names = [f.name for f in dataclasses.fields(template)]
            return type(template)(*(_in_type_of(getattr(template, n), v)
                                    for n, v in zip(names, value)))
        return value
    if isinstance(template, tuple) and isinstance(value, list):
        element = template[0] if template else None
        return tuple(_in_type_of(element, v) for v in value)
    return value


def coerce_overrides(name: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Model overrides in the types the model's fields hold, for options that came through
    JSON (``--overrides``, a workdir's config.json), which has no tuples and no dataclasses.

    A field whose default is a tuple of dataclasses (HRNet's ``stages``: ``StageSpec``) takes a
    list of dicts or of positional lists, e.g. ``{"stages": [[1, "bottleneck", [1], [8]]]}``.
    Values already of the field's type pass unchanged."""
    if not overrides:
        return {}
    return _in_field_types(*resolve(name), overrides)


def _in_field_types(entry: ModelEntry, implied: Mapping[str, Any],
                    overrides: Mapping[str, Any]) -> dict[str, Any]:
    defaults = {**{f.name: f.default for f in dataclasses.fields(entry.builder)
                   if dataclasses.is_dataclass(entry.builder)
                   and f.default is not dataclasses.MISSING},
                **entry.defaults, **implied}
    return {key: _in_type_of(defaults.get(key), value) for key, value in overrides.items()}


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds the registered model ``name``; keyword overrides replace its default fields
    (JSON-shaped values are put in the fields' types first: :func:`coerce_overrides`)."""
    entry, implied = resolve(name)
    kwargs = {**entry.defaults, **implied, **_in_field_types(entry, implied, overrides)}
    try:
        return entry.builder(**kwargs)
    except TypeError as err:
        fields = _accepted_fields(entry.builder)
        unknown = sorted(set(kwargs) - set(fields)) if fields else []
        if unknown:
            raise ValueError(
                f"{name}: unknown option(s) {unknown}; accepted options are {sorted(fields)}"
            ) from err
        raise


def _accepted_fields(builder: Callable[..., Any]) -> list[str]:
    if dataclasses.is_dataclass(builder):
        return [f.name for f in dataclasses.fields(builder) if f.name not in ("parent", "name")]
    return []


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Sorted registered names matching a shell-style ``pattern`` (and ``family`` if given)."""
    _import_families()
    return sorted(n for n, e in _REGISTRY.items()
                  if fnmatch.fnmatch(n, pattern) and (family is None or e.family == family))


def model_family(name: str) -> str:
    """The architecture family ('vit', 'swin', ...) of a registered or resolvable name."""
    return resolve(name)[0].family
