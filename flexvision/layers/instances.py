"""Ground-truth instances padded to a static capacity: the one layout that the tf.data op
``det_pad`` (:mod:`flexvision.data.ops`) and the host-side
:func:`flexvision.detection.targets.pad_targets` both produce and the jitted detectors read.

Per example, with K the capacity: ``boxes`` (K, 4) float32 (x1, y1, x2, y2 pixels), ``labels``
(K,) int32, ``masks`` (K, H, W) uint8 in {0, 1} (the padded image size), ``valid`` (K,) bool.
The n real instances fill slots 0..n-1 in their given order (``valid`` = slot < n); the other
slots are zeros. More than K instances is an error naming the config key to raise (see
:func:`capacity_error`). Here (NumPy only) so that data/ (TensorFlow) and detection/ (JAX)
import one definition.
"""

from __future__ import annotations

import numpy as np

#: dtype of each padded key; trailing shapes: boxes (4,), labels (), masks (H, W), valid ().
PADDED_DTYPES = {"boxes": np.float32, "labels": np.int32, "masks": np.uint8, "valid": np.bool_}


def capacity_error(capacity: int, key: str = "max_instances", count: int | None = None) -> str:
    """The message for an example with more instances (``count``, when known on the host) than
    the capacity; ``key`` is the config field that sets it."""
    if count is None:
        return (f"more ground-truth instances than the padded capacity {capacity}; raise config "
                f"key '{key}'")
    return (f"{count} ground-truth instances, more than the padded capacity {capacity}; raise "
            f"config key '{key}' to at least {count}")
