"""FlexiViT's random patch-size schedule (Beyer et al. 2023, arXiv 2212.08013, sec. 3.1), the
one the trainer and the benchmark both draw from.

Each training step uses one patch size drawn from ``config.flexi.patch_sizes`` with
probabilities ``config.flexi.probs`` ('uniform' or a list of weights). The draw comes from a
NumPy generator seeded by (seed, step): every host picks the same size without communicating,
and a resumed run repeats the choices of an uninterrupted one.
"""

from __future__ import annotations

import numpy as np


def patch_size_distribution(flexi_config) -> tuple[list[int], np.ndarray]:
    """(patch sizes, probabilities) from ``config.flexi``; ValueError for bad settings."""
    sizes = [int(s) for s in flexi_config["patch_sizes"]]
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"config.flexi.patch_sizes must be a non-empty list of positive ints, "
                         f"got {list(flexi_config['patch_sizes'])!r}")
    probs = flexi_config.get("probs", "uniform")  # a ConfigDict or a plain dict
    if probs is None or probs == "uniform":
        weights = np.ones(len(sizes))
    else:
        weights = np.asarray(probs, np.float64)
        if weights.shape != (len(sizes),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"config.flexi.probs must be 'uniform' or {len(sizes)} non-negative "
                             f"weights (one per patch size {sizes}), got {probs!r}")
    return sizes, weights / weights.sum()


def uniform(patch_sizes) -> dict:
    """A ``config.flexi``-shaped block drawing uniformly from ``patch_sizes``."""
    return {"patch_sizes": [int(p) for p in patch_sizes], "probs": "uniform"}


def patch_size_for_step(flexi_config, seed: int, step: int) -> int:
    """The patch size of training step ``step``: a pure function of (config, seed, step).

    ``flexi_config``: ``config.flexi`` (a ConfigDict or dict with ``patch_sizes`` and optional
    ``probs``). The index is drawn with ``default_rng((seed, step)).choice(n, p=probs)``.
    """
    sizes, probs = patch_size_distribution(flexi_config)
    rng = np.random.default_rng((int(seed), int(step)))
    return int(sizes[rng.choice(len(sizes), p=probs)])
