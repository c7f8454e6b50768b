"""Model registry: timm-style names -> a flax.linen module with its default configuration.

Every architecture file in ``flexvision/models`` registers its variants at import time with
:func:`register_model`. The registry discovers those files itself, so adding a family never
touches this module.

    >>> import flexvision
    >>> model = flexvision.create_model("flexivit_small", num_classes=10)
    >>> registry.tiny_variant("swin")       # 'swin_micro': each family's tiny CPU variant

Each family registers exactly one *tiny* variant (``tiny=True``) for tests, benchmarks and
experiments on a CPU; :func:`tiny_variant` finds it and names a family that has none. Code that
registers models for a while (tests) uses :func:`scoped_registrations`, which removes them again.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import contextlib
import pkgutil
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One registered configuration: ``builder(**defaults, **overrides)`` makes the module."""

    name: str
    family: str
    builder: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    description: str = ""
    tiny: bool = False
    aliases: Callable[[dict[str, Any]], dict[str, Any]] | None = None


_REGISTRY: dict[str, ModelEntry] = {}
_NAME_RESOLVERS: list[Callable[[str], tuple[str, dict[str, Any]] | None]] = []
_FAMILIES_IMPORTED = False


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    family: str,
    description: str = "",
    tiny: bool = False,
    aliases: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **defaults: Any,
) -> None:
    """Registers ``name`` so that ``create_model(name)`` returns ``builder(**defaults)``.

    ``tiny=True`` marks the family's one tiny variant (see :func:`tiny_variant`). ``aliases``
    translates options given in another codebase's names into the builder's (e.g. big_vision's
    ``width`` -> ``embed_dim`` for the ViT family); it is applied to ``create_model``'s overrides.
    """
    if name in _REGISTRY:
        raise ValueError(f"model name {name!r} is registered twice (families "
                         f"{_REGISTRY[name].family!r} and {family!r})")
    if tiny:
        other = [n for n, e in _REGISTRY.items() if e.family == family and e.tiny]
        if other:
            raise ValueError(f"family {family!r} already has a tiny variant ({other[0]!r}); "
                             f"register {name!r} without tiny=True")
    _REGISTRY[name] = ModelEntry(name, family, builder, dict(defaults), description, tiny,
                                 aliases)


@contextlib.contextmanager
def scoped_registrations() -> Iterator[None]:
    """Models registered inside the ``with`` block are removed when it ends (tests' models
    cannot leak into the rest of the process)::

        with registry.scoped_registrations():
            registry.register_model("toy", Toy, family="toy", tiny=True)
            ...
    """
    _import_families()
    before, resolvers = dict(_REGISTRY), list(_NAME_RESOLVERS)
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(before)
        _NAME_RESOLVERS[:] = resolvers


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
    entry, implied = resolve(name)
    if entry.aliases is not None:
        overrides = entry.aliases(dict(overrides))
    return _in_field_types(entry, implied, overrides)


def _in_field_types(entry: ModelEntry, implied: Mapping[str, Any],
                    overrides: Mapping[str, Any]) -> dict[str, Any]:
    defaults = {**{f.name: f.default for f in dataclasses.fields(entry.builder)
                   if dataclasses.is_dataclass(entry.builder)
                   and f.default is not dataclasses.MISSING},
                **entry.defaults, **implied}
    return {key: _in_type_of(defaults.get(key), value) for key, value in overrides.items()}


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds the registered model ``name``; keyword overrides replace its default fields
    (JSON-shaped values are put in the fields' types first: :func:`coerce_overrides`; options in
    the family's alias names, e.g. big_vision's for the ViT family, are translated first).

    Raises ValueError for unknown names, unknown options and ``num_classes`` < 0."""
    entry, implied = resolve(name)
    if entry.aliases is not None:
        overrides = entry.aliases(dict(overrides))
    if "num_classes" in overrides:
        from flexvision.models.contract import check_num_classes  # pylint: disable=import-outside-toplevel

        check_num_classes(overrides["num_classes"], name)
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


def families() -> list[str]:
    """Sorted names of every registered family."""
    _import_families()
    return sorted({entry.family for entry in _REGISTRY.values()})


def tiny_variant(family: str) -> str:
    """The registered name of ``family``'s tiny variant (CPU-sized, compiles in seconds).

    Raises ValueError naming the family when it has none (register one with ``tiny=True`` in
    the family's own model file) or when the family is unknown.
    """
    _import_families()
    if family not in families():
        raise ValueError(f"unknown model family {family!r}; registered families: {families()}")
    for name, entry in sorted(_REGISTRY.items()):
        if entry.family == family and entry.tiny:
            return name
    raise ValueError(f"model family {family!r} has no tiny variant: register one in its model "
                     f"file with register_model(..., family={family!r}, tiny=True) (as "
                     f"'vit_micro' is), so that the contract test, benchmarks and experiments can "
                     f"run the family on a CPU")
