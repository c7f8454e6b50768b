"""Hand process-local numpy batches to JAX as global arrays sharded over the mesh."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from flexvision.train import sharding


def to_global(batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Each process's rows of the batch -> one global jax.Array per key, batch axis split over
    the mesh's batch axes (``jax.make_array_from_process_local_data``)."""
    return {key: jax.make_array_from_process_local_data(
                sharding.batch_sharding(mesh, np.ndim(value)), np.asarray(value))
            for key, value in batch.items()}
