"""Shared machinery of the weight importers: reading checkpoints, layout changes, shape checks.

Each family's importer lives in its own file in this package and registers itself with
:func:`register_converter`; ``flexvision.convert`` dispatches to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import zipfile
import zlib
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


# Keys under which training scripts nest the state dict (timm's load_state_dict order: the plain
# weights first, the EMA copy only when nothing else is there; 'module' is DataParallel's).
_WRAPPER_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")
_SAVE_AS_SAFETENSORS = ("convert it once where torch is installed: sd = torch.load(path, "
                        "map_location='cpu'); sd = sd.get('model', sd); "
                        "safetensors.torch.save_file(sd, 'model.safetensors')")


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> StateDict:
    """Reads a checkpoint as ``{name: array}`` with floating arrays in float32.

    Accepts a mapping (numpy, jax or torch arrays), or a path to a ``.safetensors`` or ``.npz``
    file. float16 and bfloat16 arrays are upcast to float32. A mapping that wraps its state dict
    the way training scripts save it (``{'model': sd, 'optimizer': ..., 'epoch': ...}``, also
    'state_dict', 'module', 'model_ema', 'state_dict_ema') is unwrapped, the plain weights
    preferred to the EMA copy (a warning names the other copies); DataParallel's 'module.'
    name prefix is dropped; nested mappings (flax variables) are flattened with '/'.

    Raises ValueError for a missing, truncated or corrupted file (naming the file, its size and
    what is wrong), an unsupported file type, or an entry that is not an array.
    """
    if isinstance(source, Mapping):
        return _from_mapping(source, "the state dict")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ValueError(f"checkpoint file {path!r} does not exist")
        if path.endswith(".safetensors"):
            items = _read_safetensors(path)
        elif path.endswith(".npz"):
            items = _read_npz(path)
        elif path.endswith((".pth", ".pt", ".bin")):
            raise ValueError(f"checkpoint {path!r} is a PyTorch pickle, which flexvision does not "
                             f"read (torch is not a dependency): pass the dict torch.load returns, "
                             f"or {_SAVE_AS_SAFETENSORS}")
        else:
            raise ValueError(f"checkpoint {path!r}: unsupported file type; accepted are "
                             ".safetensors and .npz files, or a mapping of name -> array")
        return _from_mapping(dict(items), repr(path))
    raise ValueError(f"state_dict must be a mapping of name -> array or a path to a "
                     f".safetensors/.npz file, got {type(source).__name__}")


def _from_mapping(source: Mapping[str, Any], what: str) -> StateDict:
    """Unwraps, flattens and converts a mapping (see :func:`load_state_dict`)."""
    wrappers = [k for k in _WRAPPER_KEYS if isinstance(source.get(k), Mapping)]
    if wrappers:
        if len(wrappers) > 1:
            warnings.warn(f"{what} holds state dicts under {wrappers}; loading {wrappers[0]!r} "
                          f"(pass checkpoint[{wrappers[1]!r}] to load another one)", stacklevel=3)
        source = source[wrappers[0]]
    flat = {}
    for key, value in source.items():
        if isinstance(value, Mapping):  # flax variables: {'params': {'embedding': {...}}}
            for sub, leaf in traverse_util.flatten_dict(dict(value), sep="/").items():
                flat[f"{key}/{sub}"] = leaf
        else:
            flat[str(key)] = value
    if flat and all(k.startswith("module.") for k in flat):  # DataParallel
        flat = {k[len("module."):]: v for k, v in flat.items()}
    out = {}
    for key, value in flat.items():
        if not hasattr(value, "shape"):  # numpy, jax and torch arrays have one
            raise ValueError(f"{what}: entry {key!r} is a {type(value).__name__}, not an array. "
                             f"Pass the weights themselves (name -> array); checkpoints that "
                             f"nest them under one of {list(_WRAPPER_KEYS)} are unwrapped")
        out[key] = _to_float32_numpy(value)
    return out


def _corrupt(path: str, what: str) -> ValueError:
    size = os.path.getsize(path)
    return ValueError(f"checkpoint {path!r} ({size} bytes) is truncated or corrupted: {what}. "
                      f"An interrupted download or copy leaves such files; fetch or write it again")


def _read_safetensors(path: str) -> list[tuple[str, np.ndarray]]:
    """Checks the .safetensors layout (8-byte little-endian header length, JSON header, data
    whose offsets the header gives; huggingface/safetensors docs) before reading the arrays."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise _corrupt(path, "shorter than the 8-byte header length that starts a "
                                 ".safetensors file")
        header_len = int.from_bytes(head, "little")
        if 8 + header_len > size:
            raise _corrupt(path, f"its header should be {header_len} bytes long but only "
                                 f"{size - 8} bytes follow the length field")
        try:
            header = json.loads(file.read(header_len))
        except ValueError as err:
            raise _corrupt(path, f"its header is not valid JSON ({err})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} \
        if isinstance(header, dict) else {}
    ends = {k: v["data_offsets"][1] for k, v in tensors.items()
            if isinstance(v, dict) and len(v.get("data_offsets", ())) == 2}
    if ends:
        last = max(ends, key=ends.get)
        expected = 8 + header_len + ends[last]
        if size < expected:
            raise _corrupt(path, f"the header describes {len(ends)} tensors in {expected} bytes "
                                 f"but the file has {size}; tensor {last!r} and maybe others end "
                                 f"past the end of the file")
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    try:
        return list(load_file(path).items())
    except Exception as err:  # safetensors raises its own SafetensorError, not a ValueError
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None


def _read_npz(path: str) -> list[tuple[str, np.ndarray]]:
    """The arrays of an .npz (zip) archive; ValueError naming the file and member on failure."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise _corrupt(path, f"not a readable .npz (zip) archive ({type(err).__name__}: {err}); "
                             f"a truncated archive has lost its zip directory, which sits at "
                             f"the end") from None
    if not hasattr(npz, "files"):
        raise ValueError(f"checkpoint {path!r} holds a single array, not an .npz archive of "
                         f"named arrays (write it with np.savez(path, **arrays))")
    items = []
    with npz:
        for key in npz.files:
            try:
                items.append((key, npz[key]))
            except ValueError as err:
                if "allow_pickle" in str(err):
                    raise ValueError(f"checkpoint {path!r}: array {key!r} is a pickled object "
                                     f"array; only numeric arrays are read") from None
                raise _corrupt(path, f"array {key!r} cannot be read ({err})") from None
            except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
                raise _corrupt(path, f"array {key!r} cannot be read ({type(err).__name__}: "
                                     f"{err})") from None
    return items


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
