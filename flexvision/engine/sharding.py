"""Device mesh, logical-axis rules and parameter/batch/activation shardings from a config.

A mesh is a list of (axis name, size) pairs, e.g. ``[("data", -1)]`` (default: data parallel
over every device) or ``[("data", -1), ("fsdp", 2), ("model", 2)]``; a size of -1 takes the
remaining devices. Three mesh axis names have a meaning here:

    data    pure data parallelism: the batch is split, parameters are replicated
    fsdp    the batch is split AND large parameters (and their optimizer state) are sharded
            over it (ZeRO-3 / fully sharded data parallel)
    model   tensor parallelism: attention heads, MLP hidden units and conv output channels
            are split over it (Megatron-style), through the logical-axis rules

The ``config.sharding`` block (a ConfigDict or dict; every key optional):

    rules           list of (logical axis name, mesh axis | tuple of mesh axes | None) that
                    come before :data:`DEFAULT_RULES` (first match wins, as in flax)
    params          a tactic for every parameter, or a list of (regex, tactic) pairs matched
                    against the "/"-joined parameter path (first match wins; unmatched leaves
                    are replicated). A tactic is ``replicate``, ``logical``, ``fsdp`` or
                    several joined by ``+`` and applied left to right (default ``logical+fsdp``)
    fsdp_axis       mesh axis the ``fsdp`` tactic shards over (default ``"fsdp"``)
    fsdp_min_size   tensors with fewer elements stay replicated under ``fsdp`` (default 2**14)

The batch is split over the :data:`BATCH_AXES` present in the mesh. Optimizer-state leaves take
the sharding of the parameter they mirror (matched by path suffix and shape), so Adam's ``mu``
and ``nu`` live exactly where their parameters live.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from flax.core import meta
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")
TACTICS = ("replicate", "logical", "fsdp")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("heads", "model"),
    ("mlp", "model"),
    ("conv_out", "model"),
)
"""Logical axis -> mesh axes. Logical names not listed (embed, kv, tokens, norm, ...) stay unsharded.
``batch`` is an activation axis (``nn.with_logical_constraint``); the others name parameter axes."""

DEFAULT_TACTIC = "logical+fsdp"
DEFAULT_FSDP_MIN_SIZE = 2 ** 14


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------

def _mesh_axes_from_spec(axes: Any) -> list[tuple[str, int]]:
    """Validates a mesh spec (pairs or a name -> size mapping) into a list of (name, size)."""
    if isinstance(axes, Mapping) or (hasattr(axes, "items") and not isinstance(axes, (list, tuple))):
        axes = list(axes.items())  # a dict or ConfigDict {name: size}, in insertion order
    if isinstance(axes, (str, bytes)) or not isinstance(axes, (list, tuple)):
        raise ValueError(f"mesh must be a list of (axis name, size) pairs such as "
                         f"[('data', -1), ('fsdp', 2)], got {axes!r}")
    pairs = []
    for entry in axes:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"mesh entry {entry!r} is not an (axis name, size) pair; a mesh looks "
                             f"like [('data', -1), ('fsdp', 2), ('model', 2)]")
        name, size = entry
        if not isinstance(name, str) or not name:
            raise ValueError(f"mesh axis name must be a non-empty string, got {name!r} in {list(axes)}")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} has size {size!r}; sizes are positive integers, "
                             f"or -1 for the axis that takes the remaining devices")
        pairs.append((name, int(size)))
    if not pairs:
        raise ValueError("mesh has no axes; use [('data', -1)] for plain data parallelism")
    return pairs


def create_mesh(axes: Sequence[tuple[str, int]] = (("data", -1),),
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` of the given named axis sizes over ``devices`` (default: all devices).

    Axes are ordered from the slowest network to the fastest (put ``data`` first and ``model``
    last): on TPU the device grid follows the physical torus (``mesh_utils.create_device_mesh``),
    elsewhere the global device order, in which each host's devices are contiguous, so the
    leading axis is the one that spans hosts.
    """
    pairs = _mesh_axes_from_spec(axes)
    devices = list(jax.devices() if devices is None else devices)
    names = [name for name, _ in pairs]
    sizes = [size for _, size in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axis names must be unique, got {names}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may have size -1, got {pairs}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {pairs}: "
                             f"the fixed axes ({known} devices) must divide the device count")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {list(zip(names, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"but {len(devices)} are available; use -1 for one axis to fill them")
    try:
        device_grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        device_grid = np.asarray(devices).reshape(sizes)
    return Mesh(device_grid, tuple(names))


def batch_spec(mesh: Mesh, ndim: int) -> PartitionSpec:
    """PartitionSpec splitting the leading (batch) axis over the mesh's batch axes."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    lead = axes if len(axes) > 1 else (axes[0] if axes else None)
    return PartitionSpec(lead, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 4) -> NamedSharding:
    """NamedSharding for a global batch whose leading axis is split over the batch axes."""
    return NamedSharding(mesh, batch_spec(mesh, ndim))


def replicated(mesh: Mesh) -> NamedSharding:
    """NamedSharding that keeps a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """This process's slice of the batch (a tree of NumPy arrays) as global ``jax.Array``s whose
    leading axis is split over the mesh's batch axes (``jax.make_array_from_process_local_data``).

    Every process passes the rows that belong to its own devices (process ``i`` of ``n`` holds
    rows ``[i * B/n, (i+1) * B/n)`` of the global batch ``B`` when the batch axes span hosts).
    """
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)),
                                                         np.asarray(x)),
        local_batch)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShardingOptions:
    """The resolved ``config.sharding`` block (see the module docstring)."""

    rules: tuple[tuple[str, Any], ...] = ()
    params: tuple[tuple[str, str], ...] = ((".*", DEFAULT_TACTIC),)
    fsdp_axis: str = "fsdp"
    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE


def _get(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def _check_tactic(tactic: Any, where: str) -> str:
    if not isinstance(tactic, str) or not tactic:
        raise ValueError(f"{where}: a tactic is a string such as 'logical+fsdp', got {tactic!r}")
    for part in tactic.split("+"):
        if part not in TACTICS:
            raise ValueError(f"{where}: unknown sharding tactic {part!r} in {tactic!r}; tactics are "
                             f"{list(TACTICS)}, combined with '+' (e.g. 'logical+fsdp')")
    return tactic


def _check_mesh_axes(value: Any, where: str) -> Any:
    """A rule's right-hand side: None, a mesh axis name, or a tuple of names."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{where}: a rule maps a logical axis to None, a mesh axis name or a tuple of "
                     f"mesh axis names, got {value!r}")


def default_config():
    """A ``config.sharding`` block with every key at its default, so that each one can be
    overridden on the command line (``--config.sharding.params=fsdp``,
    ``--config.sharding.rules="(('mlp', None),)"``)."""
    import ml_collections
    return ml_collections.ConfigDict({"rules": (), "params": DEFAULT_TACTIC, "fsdp_axis": "fsdp",
                                      "fsdp_min_size": DEFAULT_FSDP_MIN_SIZE})


def sharding_options(config: Any = None) -> ShardingOptions:
    """Reads and validates ``config.sharding`` (None, a dict or a ConfigDict)."""
    if isinstance(config, ShardingOptions):
        return config
    known = {"rules", "params", "fsdp_axis", "fsdp_min_size"}
    keys = set(config.keys()) if hasattr(config, "keys") else set()
    if keys - known:
        raise ValueError(f"config.sharding has unknown keys {sorted(keys - known)}; "
                         f"accepted keys are {sorted(known)}")
    rules = []
    for i, rule in enumerate(_get(config, "rules", ())):
        if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"config.sharding.rules[{i}] = {rule!r} is not a pair (logical axis "
                             f"name, mesh axes), e.g. ('mlp', 'model') or ('embed', None)")
        rules.append((rule[0], _check_mesh_axes(rule[1], f"config.sharding.rules[{i}]")))
    params = _get(config, "params", DEFAULT_TACTIC)
    if isinstance(params, str):
        params = ((".*", _check_tactic(params, "config.sharding.params")),)
    else:
        pairs = []
        for i, entry in enumerate(params):
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"config.sharding.params[{i}] = {entry!r} is not a (regex, tactic) "
                                 f"pair, e.g. ('.*/kernel$', 'fsdp')")
            pattern, tactic = entry
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(f"config.sharding.params[{i}]: bad regex {pattern!r}: {error}")
            pairs.append((pattern, _check_tactic(tactic, f"config.sharding.params[{i}]")))
        params = tuple(pairs)
    min_size = _get(config, "fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"config.sharding.fsdp_min_size must be a non-negative integer "
                         f"(elements), got {min_size!r}")
    fsdp_axis = _get(config, "fsdp_axis", "fsdp")
    if not isinstance(fsdp_axis, str):
        raise ValueError(f"config.sharding.fsdp_axis must be a mesh axis name, got {fsdp_axis!r}")
    return ShardingOptions(tuple(rules), params, fsdp_axis, int(min_size))


def logical_rules(mesh: Mesh, config: Any = None) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules for ``mesh``: ``config.sharding.rules`` first, then the defaults.

    Mesh axes a default rule names but the mesh lacks are dropped (``("mlp", "model")`` does
    nothing on a data-parallel mesh); a configured rule that names a missing mesh axis is an error.
    """
    options = sharding_options(config)
    resolved = []
    for source, rules in (("config.sharding.rules", options.rules), ("default", DEFAULT_RULES)):
        for logical, mesh_axes in rules:
            names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
            missing = [n for n in names if n not in mesh.axis_names]
            if missing and source != "default":
                raise ValueError(f"{source} maps {logical!r} to mesh axes {mesh_axes!r}, but the "
                                 f"mesh only has axes {list(mesh.axis_names)}; add "
                                 f"{missing} to config.mesh or change the rule")
            kept = tuple(n for n in names if n in mesh.axis_names)
            value = None if not kept else (kept[0] if len(kept) == 1 else kept)
            resolved.append((logical, value))
    return tuple(resolved)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, config: Any = None) -> Iterator[tuple[tuple[str, Any], ...]]:
    """Context in which ``nn.with_logical_constraint`` in model code shards activations on ``mesh``.

    Wrap model init/apply (or the code that first calls the jitted step, where tracing happens)::

        with sharding.activation_rules(mesh, config.sharding):
            state = init_fn(rng)
            state, metrics = train_step(state, batch)
    """
    rules = logical_rules(mesh, config)
    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
        yield rules


# --------------------------------------------------------------------------------------------
# Parameter tactics
# --------------------------------------------------------------------------------------------

def _axis_size(mesh: Mesh, axes: Any) -> int:
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[n] for n in names])) if names else 1


def _used_axes(spec: Sequence[Any]) -> set[str]:
    used = set()
    for entry in spec:
        if isinstance(entry, str):
            used.add(entry)
        elif isinstance(entry, tuple):
            used.update(entry)
    return used


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: Sequence[tuple[str, Any]]) -> list[Any]:
    """Per-dimension mesh axes for a tensor whose dimensions carry logical ``names``.

    flax's priority rules (``nn.logical_to_mesh_axes``); a dimension not divisible by its mesh
    axes is left unsharded (e.g. 3 heads on a 2-way model axis) rather than padded.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical axis names {tuple(names)} do not match shape {tuple(shape)}")
    spec = list(nn.logical_to_mesh_axes(tuple(names), tuple(rules)))
    for dim, axes in enumerate(spec):
        if axes is not None and shape[dim] % _axis_size(mesh, axes):
            logging.info("not sharding dim %d (%s, size %d) over %s: not divisible by %d",
                         dim, names[dim], shape[dim], axes, _axis_size(mesh, axes))
            spec[dim] = None
    return spec


def fsdp_spec(spec: Sequence[Any], shape: Sequence[int], mesh: Mesh, axis: str = "fsdp",
              min_size: int = DEFAULT_FSDP_MIN_SIZE) -> list[Any]:
    """Adds ``axis`` to the largest still-unsharded dimension divisible by its size.

    big_vision's ``fsdp`` tactic (big_vision/sharding.py): tensors with fewer than ``min_size``
    elements, or without a divisible free dimension, are left as they are.
    """
    spec = list(spec)
    if axis not in mesh.axis_names or mesh.shape[axis] == 1 or axis in _used_axes(spec):
        return spec
    if int(np.prod(shape)) < min_size:
        return spec
    for dim in np.argsort(shape, kind="stable")[::-1]:
        if spec[dim] is None and shape[dim] % mesh.shape[axis] == 0:
            spec[dim] = axis
            break
    return spec


def leaf_spec(path: str, shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh,
              options: ShardingOptions, rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
    """The PartitionSpec of one tensor: the first (regex, tactic) matching ``path`` applied."""
    tactic = "replicate"
    for pattern, candidate in options.params:
        if re.search(pattern, path):
            tactic = candidate
            break
    spec: list[Any] = [None] * len(shape)
    for part in tactic.split("+"):
        if part == "replicate":
            spec = [None] * len(shape)
        elif part == "logical" and names is not None:
            logical = logical_spec(names, shape, mesh, rules)
            spec = [s if s is not None else l for s, l in zip(spec, logical)]
        elif part == "fsdp":
            spec = fsdp_spec(spec, shape, mesh, options.fsdp_axis, options.fsdp_min_size)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def _param_key(path: tuple[str, ...]) -> tuple[str, ...]:
    """The path of a parameter without the leading 'params' collection/field names."""
    while path and path[0] == "params":
        path = path[1:]
    return path


def _named_leaves(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple]]:
    """Parameter path -> (shape, logical names) for every ``nn.Partitioned`` leaf of ``tree``."""
    table = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]:
        if _is_box(leaf) and hasattr(leaf, "names"):
            key = _param_key(tuple(_key_name(k) for k in path))
            table.setdefault(key, (tuple(np.shape(leaf.value)), tuple(leaf.names)))
    return table


def tree_shardings(abstract_tree: Any, mesh: Mesh, config: Any = None, *,
                   reference: Any = None) -> Any:
    """Shardings for a (possibly ``nn.Partitioned``-boxed) tree of parameters or train state.

    Returns a tree of ``NamedSharding`` with exactly the structure of ``abstract_tree`` (boxes are
    kept, holding the sharding). A boxed leaf takes its logical names from its box; an unboxed
    leaf (optimizer state of unboxed params, or params unboxed before ``eval_shape``) takes the
    names of the boxed parameter, in ``abstract_tree`` or in ``reference`` (e.g. the boxed
    ``jax.eval_shape(model.init, ...)``), whose path is a suffix of its own path and whose shape
    equals its own. ``config`` is the ``config.sharding`` block; None means data parallel plus
    the defaults (tensor parallel over ``model``, fsdp over ``fsdp``, where those axes exist).
    """
    options = sharding_options(config)
    rules = logical_rules(mesh, options)
    named = _named_leaves(reference) if reference is not None else {}
    named.update(_named_leaves(abstract_tree))

    def names_for(path: tuple[str, ...], shape: tuple[int, ...]):
        for start in range(len(path)):
            entry = named.get(path[start:])
            if entry is not None and entry[0] == shape:
                return path[start:], entry[1]
        return None, None

    def sharding_for(key_path, leaf):
        path = tuple(_key_name(k) for k in key_path)
        value = leaf.value if _is_box(leaf) else leaf
        shape = tuple(np.shape(value))
        param_path, names = names_for(_param_key(path), shape)
        if _is_box(leaf) and hasattr(leaf, "names"):
            names = tuple(leaf.names)
        regex_path = "/".join(param_path if param_path is not None else path)
        sharding = NamedSharding(mesh, leaf_spec(regex_path, shape, names, mesh, options, rules))
        return leaf.replace_boxed(sharding) if _is_box(leaf) else sharding

    return jax.tree_util.tree_map_with_path(sharding_for, abstract_tree, is_leaf=_is_box)


def unbox(tree: Any) -> Any:
    """``tree`` with every flax ``AxisMetadata`` box (``nn.Partitioned``) replaced by its value;
    no sharding constraint is applied. Works on arrays, ShapeDtypeStructs and shardings alike."""
    return jax.tree_util.tree_map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def sharded_abstract(abstract_tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct``s carrying the target shardings: the restore target for orbax.

    Restoring a checkpoint into this tree (``ocp.args.StandardRestore(target)``) reshards it onto
    the current mesh, whatever mesh wrote it.
    """
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
        unbox(abstract_tree), unbox(shardings))


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
    """Bytes the largest device holds of ``abstract_tree`` when laid out with ``shardings``."""
    totals: dict[Any, int] = {}
    for leaf, sharding in zip(jax.tree_util.tree_leaves(unbox(abstract_tree)),
                              jax.tree_util.tree_leaves(unbox(shardings))):
        shard_bytes = int(np.prod(sharding.shard_shape(np.shape(leaf)))) * np.dtype(leaf.dtype).itemsize
        for device in sharding.device_set:
            totals[device] = totals.get(device, 0) + shard_bytes
    return max(totals.values()) if totals else 0


def live_bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes each addressable device actually holds of the ``jax.Array``s in ``tree``."""
    totals: dict[Any, int] = {}
    for leaf in jax.tree_util.tree_leaves(unbox(tree)):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals
