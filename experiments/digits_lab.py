"""Shared pieces of the small-scale FlexiViT experiments on scikit-learn's digits (no download).

Everything here runs in memory on CPU in minutes: the fixed 1500/297 digits split of
``flexvision.data.digits`` upsampled to 24x24, a plain jitted Adam training loop for the
micro ViT / FlexiViT (``vit_micro`` / ``flexivit_micro``), per-patch-size evaluation, and the
two ways of moving a trained patch-embedding kernel to another patch size (FlexiViT paper,
arXiv 2212.08013, Sec. 3.4: bilinear resize vs PI-resize).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flexvision
from flexvision.data.digits import digits_split_indices
from flexvision.layers.flex import pi_resize_kernel

IMAGE_SIZE = 24  # small enough for minutes on 2 CPU cores; the configs/ demo uses 48
PATCH_SIZES = (3, 4, 6, 8, 12)
BASE_PATCH = 4
POSEMB_GRID = (6, 6)


def load_digits_split(image_size: int = IMAGE_SIZE) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train'|'test': (images (N, S, S, 1) float32 in [-1, 1], labels (N,) int32)}."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[..., None]
    images = np.asarray(jax.image.resize(
        jnp.asarray(images), (len(images), image_size, image_size, 1), "bilinear"))
    images = images * 2.0 - 1.0
    return {split: (images[idx], digits.target[idx].astype(np.int32))
            for split, idx in digits_split_indices().items()}


def make_model(name: str = "flexivit_micro", **overrides):
    """A micro ViT for 1-channel 24x24 digits, 10 classes, base patch 4, 6x6 posemb."""
    kwargs = dict(num_classes=10, in_chans=1, patch_size=(BASE_PATCH, BASE_PATCH),
                  posemb_grid=POSEMB_GRID)
    kwargs.update(overrides)
    return flexvision.create_model(name, **kwargs)


def patch_size_probs(patch_sizes: Sequence[int], distribution: str) -> np.ndarray:
    """Sampling weights of the training patch sizes (FlexiViT Sec. 3.2 and its ablation):

    'uniform' (the paper's choice), 'area' (proportional to p^2: favours large patches, i.e.
    few tokens), 'inverse_area' (proportional to 1/p^2: favours small patches, i.e. compute
    proportional), 'fixed' (all mass on the base patch size: a plain ViT).
    """
    sizes = np.asarray(patch_sizes, np.float64)
    if distribution == "uniform":
        weights = np.ones_like(sizes)
    elif distribution == "area":
        weights = sizes ** 2
    elif distribution == "inverse_area":
        weights = 1.0 / sizes ** 2
    elif distribution == "fixed":
        weights = (sizes == BASE_PATCH).astype(np.float64)
    else:
        raise ValueError(f"unknown patch-size distribution {distribution!r}; accepted: "
                         "'uniform', 'area', 'inverse_area', 'fixed'")
    return weights / weights.sum()


def train(model, data, *, steps: int, patch_sizes: Sequence[int] = (BASE_PATCH,),
          probs: Sequence[float] | None = None, batch_size: int = 64, lr: float = 1e-3,
          seed: int = 0, log: Callable[[str], None] | None = print) -> dict:
    """Trains ``model`` with Adam (warmup + cosine) and a per-step patch size drawn from
    ``patch_sizes`` with ``probs``; returns the params. One jitted step per patch size."""
    images, labels = data["train"]
    rng = np.random.default_rng(seed)
    params = model.init(jax.random.key(seed), jnp.zeros((1, *images.shape[1:])))["params"]
    params = jax.tree_util.tree_map(
        lambda x: x.value if isinstance(x, flexvision_boxed()) else x, params,
        is_leaf=lambda x: isinstance(x, flexvision_boxed()))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    opt_state = tx.init(params)

    def step(params, opt_state, x, y, patch):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, patch_size=patch)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, static_argnums=4)
    probs = None if probs is None else np.asarray(probs, np.float64)
    for i in range(steps):
        idx = rng.integers(0, len(images), batch_size)
        patch = int(rng.choice(patch_sizes, p=probs))
        params, opt_state, loss = jitted(params, opt_state, images[idx], labels[idx], patch)
        if log and (i % max(1, steps // 5) == 0 or i == steps - 1):
            log(f"step {i + 1}/{steps} patch {patch} loss {float(loss):.3f}")
    return params


def flexvision_boxed():
    import flax.linen as nn
    return nn.meta.AxisMetadata


def accuracy(model, params, data, patch_size=None, batch_size: int = 297) -> float:
    """Top-1 accuracy on the test split at ``patch_size`` (None: the model's base patch)."""
    images, labels = data["test"]
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, patch_size=patch_size))
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = apply(params, images[start:start + batch_size])
        correct += int((np.asarray(logits).argmax(-1) == labels[start:start + batch_size]).sum())
    return correct / len(images)


def bilinear_resize_kernel(kernel_hwio: jax.Array, new_patch: int) -> jax.Array:
    """The naive alternative to PI-resize: resize the kernel like an image (bilinear).
    Token norms then scale with the patch area, which PI-resize avoids (FlexiViT Sec. 3.4)."""
    return jax.image.resize(kernel_hwio, (new_patch, new_patch, *kernel_hwio.shape[2:]),
                            "bilinear", antialias=False)


def with_resized_patch_embed(name: str, params: dict, new_patch: int, how: str):
    """(model, params) of a ViT whose stored kernel is moved to ``new_patch`` by ``how``
    ('pi' or 'bilinear'); the position embedding stays and is resampled per call."""
    kernel = params["patch_embed"]["kernel"]
    if how == "pi":
        new_kernel = pi_resize_kernel(kernel, new_patch, "timm")
    elif how == "bilinear":
        new_kernel = bilinear_resize_kernel(kernel, new_patch)
    else:
        raise ValueError(f"how must be 'pi' or 'bilinear', got {how!r}")
    new_params = dict(params)
    new_params["patch_embed"] = dict(params["patch_embed"], kernel=new_kernel)
    model = make_model(name, patch_size=(new_patch, new_patch))
    return model, new_params


def write_json(outdir: str, name: str, table: dict) -> str:
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=2, sort_keys=True)
    return path


def save_figure(fig, outdir: str, name: str) -> str:
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f"{name}.png")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return path
