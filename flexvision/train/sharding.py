"""Device mesh and parameter/batch shardings from a config.

A mesh is a list of (axis name, size) pairs, e.g. ``[("data", -1)]`` (default: data parallel
over every device) or ``[("data", -1), ("fsdp", 2), ("model", 2)]``; a size of -1 takes the
remaining devices. The batch is split over the ``BATCH_AXES`` present in the mesh.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def create_mesh(axes: Sequence[tuple[str, int]] = (("data", -1),),
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` of the given named axis sizes over ``devices`` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    names = [str(name) for name, _ in axes]
    sizes = [int(size) for _, size in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axis names must be unique, got {names}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may have size -1, got {list(axes)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {list(axes)}: "
                             f"the fixed axes ({known} devices) must divide the device count")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {list(zip(names, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"but {len(devices)} are available; use -1 for one axis to fill them")
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


def tree_shardings(abstract_tree: Any, mesh: Mesh, config: Any = None) -> Any:
    """Shardings for a (possibly nn.Partitioned-boxed) tree of parameters or optimizer state.

    Data parallel: every leaf is replicated. ``config`` (the ``config.sharding`` block) selects
    other tactics.
    """
    del config
    return jax.tree_util.tree_map(lambda _: replicated(mesh), abstract_tree)
