"""Multi-host runs on JAX's own runtime: initialisation, process roles, sharded checkpoints.

Every host runs the same command; :func:`initialize` (first thing in ``main``, before any JAX
computation) connects them through ``jax.distributed.initialize``. Where the coordinator, the
process count and this process's id come from, first found wins:

1. explicit arguments;
2. ``config.distributed`` (``coordinator_address``, ``num_processes``, ``process_id``,
   ``local_device_ids``);
3. the environment: ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID`` (and ``JAX_LOCAL_DEVICE_IDS``, comma-separated);
4. a cluster JAX detects by itself: Cloud TPU pod slices (several TPU workers), SLURM jobs
   with more than one task, Open MPI (``mpirun``), Kubernetes/GKE JobSets;
5. otherwise a single process: nothing to do.

Checkpoints of multi-host runs go through :mod:`flexvision.engine.checkpoint` like any other.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands after :func:`initialize`."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    source: str  # "single-process", "arguments", "config", "environment" or "auto-detected"


def _from_config(config: Any, key: str) -> Any:
    block = config.get("distributed") if isinstance(config, Mapping) else getattr(
        config, "distributed", None) if config is not None else None
    if block is None:
        return None
    return block.get(key) if isinstance(block, Mapping) or hasattr(block, "get") else getattr(
        block, key, None)


def _parse_int(value: Any, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _parse_device_ids(value: Any) -> list[int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"local_device_ids must be integers (a list, or comma-separated in "
                         f"{ENV_LOCAL_DEVICE_IDS}), got {value!r}") from None


def detected_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process cluster this process runs in, if JAX can auto-detect it, else None."""
    env = os.environ if environ is None else environ

    def count(key: str) -> int:
        try:
            return int(env.get(key, "1").split("(")[0])
        except ValueError:
            return 1

    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "tpu"
    if "SLURM_JOB_ID" in env and max(count("SLURM_NTASKS"), count("SLURM_NPROCS")) > 1:
        return "slurm"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    if "JOBSET_NAME" in env and count("JAX_NUM_PROCESSES") != 1:
        return "gke"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Any = None, *,
               config: Any = None, environ: Mapping[str, str] | None = None,
               initialization_timeout: int = 300) -> ProcessInfo:
    """Connects this process to the others (``jax.distributed.initialize``); see the module doc.

    Safe to call twice and in single-process runs (then it does nothing). Must run before any
    JAX computation: JAX fixes the set of devices when its backend starts.
    """
    env = os.environ if environ is None else environ
    sources = (
        ("arguments", coordinator_address, num_processes, process_id, local_device_ids),
        ("config", _from_config(config, "coordinator_address"),
         _from_config(config, "num_processes"), _from_config(config, "process_id"),
         _from_config(config, "local_device_ids")),
        ("environment", env.get(ENV_COORDINATOR), env.get(ENV_NUM_PROCESSES),
         env.get(ENV_PROCESS_ID), env.get(ENV_LOCAL_DEVICE_IDS)),
    )
    kwargs: dict[str, Any] = {}
    source = "single-process"
    for name, address, count, index, device_ids in sources:
        if address is None and count is None and index is None:
            continue
        count = _parse_int(count, f"num_processes ({name})")
        index = _parse_int(index, f"process_id ({name})")
        if count is not None and count < 1:
            raise ValueError(f"num_processes ({name}) must be >= 1, got {count}")
        if count is not None and index is not None and not 0 <= index < count:
            raise ValueError(f"process_id ({name}) must be in [0, {count}), got {index}")
        if count is not None and count > 1 and (not address or index is None):
            raise ValueError(
                f"a {count}-process run needs the coordinator address (host:port of process 0) "
                f"and this process's id; from {name} got coordinator_address={address!r}, "
                f"process_id={index!r} (set {ENV_COORDINATOR} and {ENV_PROCESS_ID}, or the "
                f"config.distributed keys)")
        if address is not None and (not isinstance(address, str) or ":" not in address):
            raise ValueError(f"coordinator_address ({name}) must be 'host:port', got {address!r}")
        if count == 1:
            source = name
            break
        kwargs = dict(coordinator_address=address, num_processes=count, process_id=index,
                      local_device_ids=_parse_device_ids(device_ids))
        source = name
        break
    else:
        if detected_cluster(env) is not None:
            source = "auto-detected"

    if kwargs or source == "auto-detected":
        if jax.distributed.is_initialized():
            logging.info("jax.distributed is already initialised; not initialising again")
        else:
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            logging.info("jax.distributed.initialize(%s) from %s", kwargs, source)
            jax.distributed.initialize(initialization_timeout=initialization_timeout, **kwargs)
    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                       jax.device_count(), source)


def is_main_process() -> bool:
    """True on the process that writes logs, summaries and the resolved config (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Blocks until every process reaches the barrier ``name`` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def process_batch_size(global_batch_size: int) -> int:
    """Rows of each global batch this process reads: ``global_batch_size / process_count``."""
    count = jax.process_count()
    if global_batch_size % count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{count} processes; pick a multiple of {count}")
    return global_batch_size // count


def process_rows(global_batch_size: int) -> slice:
    """Rows ``[i * B/n, (i+1) * B/n)`` of a global batch that process ``i`` of ``n`` feeds."""
    per_process = process_batch_size(global_batch_size)
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def gather_to_host(tree: Any) -> Any:
    """Full NumPy copies of a tree of (possibly cross-host sharded) ``jax.Array``s, on every host."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
