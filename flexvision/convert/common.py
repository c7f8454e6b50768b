"""Shared machinery of the weight importers: reading checkpoints, layout changes, shape checks.

Each family's importer lives in its own file in this package and registers itself with
:func:`register_converter`; ``flexvision.convert`` dispatches to it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

StateDict = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Converter:
    """An importer for one source ('timm', 'big_vision', 'official') and a set of model names."""

    source: str
    matches: Callable[[str], bool]
    convert: Callable[..., Any]
    description: str


_CONVERTERS: list[Converter] = []


def register_converter(source: str, *, prefixes: Iterable[str] = (), names: Iterable[str] = (),
                       description: str = ""):
    """Decorator registering ``fn(name, state_dict, **kwargs) -> (model, variables)``.

    The converter handles names equal to one of ``names`` or starting with one of ``prefixes``.
    """
    prefixes, names = tuple(prefixes), frozenset(names)

    def matches(name: str) -> bool:
        return name in names or any(name.startswith(p) for p in prefixes)

    def wrap(fn):
        _CONVERTERS.append(Converter(source, matches, fn, description or fn.__doc__ or ""))
        return fn

    return wrap


def find_converter(source: str, name: str) -> Converter:
    """The registered converter of ``source`` for model ``name``; ValueError if there is none."""
    for conv in _CONVERTERS:
        if conv.source == source and conv.matches(name):
            return conv
    known = sorted({c.description.strip().splitlines()[0] for c in _CONVERTERS
                    if c.source == source and c.description.strip()})
    raise ValueError(f"no {source} importer for model {name!r}. Importers available: "
                     f"{known or 'none'}")


def _to_float32_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    array = np.asarray(value)
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        return array.astype(np.float32)
    return array


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> StateDict:
    """Reads a checkpoint as ``{name: array}`` with floating arrays in float32.

    Accepts a mapping (numpy, jax or torch arrays), or a path to a ``.safetensors`` or ``.npz``
    file. float16 and bfloat16 arrays are upcast to float32.
    """
    if isinstance(source, Mapping):
        items = source.items()
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ValueError(f"checkpoint file {path!r} does not exist")
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

            items = load_file(path).items()
        elif path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                items = [(k, npz[k]) for k in npz.files]
        else:
            raise ValueError(f"checkpoint {path!r}: unsupported file type; accepted are "
                             ".safetensors and .npz files, or a mapping of name -> array")
    else:
        raise ValueError(f"state_dict must be a mapping of name -> array or a path to a "
                         f".safetensors/.npz file, got {type(source).__name__}")
    return {str(k): _to_float32_numpy(v) for k, v in items}


def torch_linear_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight (out, in) -> flax Dense kernel (in, out)."""
    return np.ascontiguousarray(weight.T)


def torch_conv_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight (out, in/groups, kh, kw) -> flax Conv kernel (kh, kw, in/groups, out)."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def fit_to_template(template: Any, converted: Mapping[str, Any], *, source: str) -> dict:
    """Checks converted variables against the model's own shapes and returns them as a tree.

    ``template`` is the model's variables (or their ``jax.eval_shape``), ``converted`` a nested
    or '/'-flat dict of arrays. Missing, unexpected and mis-shaped entries raise one ValueError
    that lists each with the shape the model expects and the shape the checkpoint gave.
    """
    template = _unbox(template)
    want = traverse_util.flatten_dict(template, sep="/")
    flat_converted = (traverse_util.flatten_dict(converted, sep="/")
                      if any(isinstance(v, Mapping) for v in converted.values()) else dict(converted))
    got = {k: np.asarray(v) for k, v in flat_converted.items()}
    problems = []
    for key in sorted(set(want) - set(got)):
        problems.append(f"missing {key} (model expects shape {tuple(want[key].shape)})")
    for key in sorted(set(got) - set(want)):
        problems.append(f"unexpected {key} with shape {tuple(got[key].shape)}")
    for key in sorted(set(want) & set(got)):
        if tuple(want[key].shape) != tuple(got[key].shape):
            problems.append(f"{key}: checkpoint gives shape {tuple(got[key].shape)}, "
                            f"model expects {tuple(want[key].shape)}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{source}: the checkpoint does not fit the model "
                         f"({len(problems)} problem(s)); check the model name and kwargs "
                         f"(width, depth, heads, classes) against the checkpoint:\n  {shown}{more}")
    return traverse_util.unflatten_dict(
        {k: got[k].astype(want[k].dtype) for k in want}, sep="/")


def _unbox(tree: Any) -> Any:
    """Strips flax partitioning metadata (nn.Partitioned boxes) from a variables tree."""
    from flax.core import meta  # pylint: disable=import-outside-toplevel

    return meta.unbox(jax.tree_util.tree_map(lambda x: x, tree))


def abstract_variables(model, *args, **kwargs) -> Any:
    """``model.init`` shapes without computing anything (``jax.eval_shape``), boxes removed."""
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))
    return _unbox(variables)
