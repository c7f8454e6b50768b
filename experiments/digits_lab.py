"""Shared pieces of the small-scale FlexiViT experiments on scikit-learn's digits (no download).

Everything here runs in memory on CPU in minutes: the fixed 1500/297 digits split of
``flexvision.data.digits`` upsampled to 24x24 (or any size, 1 or 3 channels), a training loop
for the micro ViT / FlexiViT (``vit_micro`` / ``flexivit_micro``, a random patch size per step
from the trainer's schedule) and for any registered classifier (``train_variables``, BatchNorm
state included) that runs the trainer's own step and AdamW (``flexvision.engine``),
per-patch-size evaluation, and the two ways of moving a trained patch-embedding kernel to
another patch size (FlexiViT paper, arXiv 2212.08013, Sec. 3.4: bilinear resize vs
PI-resize). Compiled steps are cached per model configuration, so repeated runs (one per
patch-size distribution, say) compile once.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import flexvision
from flexvision.data.digits import digits_split_indices
from flexvision.engine import optim, patch_schedule
from flexvision.engine.losses import softmax_xent
from flexvision.engine.sharding import unbox
from flexvision.engine.state import eval_variables, train_state
from flexvision.engine.step import make_train_step, model_kwargs
from flexvision.layers.flex import bilinear_resize_kernel, pi_resize_kernel, resize_images

IMAGE_SIZE = 24  # small enough for minutes on 2 CPU cores; the configs/ demo uses 48
PATCH_SIZES = (3, 4, 6, 8, 12)
BASE_PATCH = 4
POSEMB_GRID = (6, 6)
# The micro ViT shrunk further for the experiments' --fast mode (tests): compiles in seconds.
FAST_MODEL_OVERRIDES = dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64)


def load_digits_split(image_size: int = IMAGE_SIZE, channels: int = 1
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train'|'test': (images (N, S, S, channels) float32 in [-1, 1], labels (N,) int32)}.

    The 8x8 digits are upsampled bilinearly to ``image_size``; ``channels=3`` repeats the gray
    level (for models whose stem expects RGB). Cached per (size, channels); arrays are read-only.
    """
    return dict(_digits_split(int(image_size), int(channels)))


@functools.lru_cache(maxsize=16)
def _digits_split(image_size: int, channels: int):
    from sklearn.datasets import load_digits

    if image_size < 1 or channels < 1:
        raise ValueError(f"image_size and channels must be positive, got {image_size} and "
                         f"{channels}")
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[..., None]
    images = np.asarray(resize_images(jnp.asarray(images), image_size))
    images = np.repeat(images * 2.0 - 1.0, channels, axis=-1)
    split = {}
    for name, idx in digits_split_indices().items():
        x, y = images[idx], digits.target[idx].astype(np.int32)
        x.setflags(write=False)
        y.setflags(write=False)
        split[name] = (x, y)
    return tuple(split.items())


def make_model(name: str = "flexivit_micro", **overrides):
    """A micro ViT for 1-channel 24x24 digits, 10 classes, base patch 4, 6x6 posemb."""
    kwargs = dict(num_classes=10, in_chans=1, patch_size=(BASE_PATCH, BASE_PATCH),
                  posemb_grid=POSEMB_GRID)
    kwargs.update(overrides)
    return flexvision.create_model(name, **kwargs)


def patch_size_probs(patch_sizes: Sequence[int], distribution: str,
                     base_patch: int = BASE_PATCH) -> np.ndarray:
    """Sampling weights of the training patch sizes (FlexiViT Sec. 3.2 and its ablation):

    'uniform' (the paper's choice), 'area' (proportional to p^2: favours large patches, i.e.
    few tokens), 'inverse_area' (proportional to 1/p^2: favours small patches, i.e. compute
    proportional), 'fixed' (all mass on ``base_patch``: a plain ViT).
    """
    sizes = np.asarray(patch_sizes, np.float64)
    if sizes.ndim != 1 or sizes.size == 0 or np.any(sizes <= 0):
        raise ValueError(f"patch_sizes must be a non-empty list of positive sizes, got "
                         f"{list(patch_sizes)}")
    if distribution == "uniform":
        weights = np.ones_like(sizes)
    elif distribution == "area":
        weights = sizes ** 2
    elif distribution == "inverse_area":
        weights = 1.0 / sizes ** 2
    elif distribution == "fixed":
        weights = (sizes == base_patch).astype(np.float64)
        if not weights.any():
            raise ValueError(f"'fixed' puts all mass on the base patch {base_patch}, which is "
                             f"not among the patch sizes {list(patch_sizes)}; add it or pass "
                             f"base_patch=")
    else:
        raise ValueError(f"unknown patch-size distribution {distribution!r}; accepted: "
                         "'uniform', 'area', 'inverse_area', 'fixed'")
    return weights / weights.sum()


def optimizer_config(steps: int, lr: float = 1e-3, weight_decay: float = 1e-4):
    """The trainer config block for AdamW with linear warmup (10% of ``steps``) and cosine
    decay to 0, global-norm clipping at 1 (read by ``engine.optim.make_optimizer``, which decays
    kernels only)."""
    import ml_collections

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return ml_collections.ConfigDict({
        "lr": float(lr), "total_steps": int(steps),
        "schedule": {"warmup_steps": max(1, steps // 10) if steps > 1 else 0,
                     "decay_type": "cosine"},
        "optax": {"name": "adam", "weight_decay": float(weight_decay), "grad_clip_norm": 1.0}})


@functools.lru_cache(maxsize=64)
def _train_step(model, steps: int, lr: float, weight_decay: float, seed: int,
                patch_size: int | None):
    """(optimizer, jitted engine train step) of ``model`` at ``patch_size``, cached per
    configuration: repeated runs with the same settings reuse the compiled executable."""
    tx, _ = optim.make_optimizer(optimizer_config(steps, lr, weight_decay))
    step = make_train_step(model, tx, softmax_xent, seed=seed, patch_size=patch_size)
    return tx, jax.jit(step, donate_argnums=0)


def train_variables(model, data, *, steps: int, patch_sizes: Sequence[int] | None = None,
                    probs: Sequence[float] | None = None, batch_size: int = 64,
                    lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                    log: Callable[[str], None] | None = print) -> dict:
    """Trains any flexvision classifier on ``data['train']`` with the trainer's own step and
    optimizer (``flexvision.engine``); returns all its variables ('params' and, for BatchNorm
    models, 'batch_stats').

    ``patch_sizes`` None: the model is called without ``patch_size`` (any family); else each
    step's patch size comes from the trainer's schedule over ``patch_sizes`` with ``probs``
    (``engine.patch_schedule``, FlexiViT Sec. 3.2). Batches are drawn with replacement from
    ``np.random.default_rng(seed)``.
    """
    images, labels = data["train"]
    rng = np.random.default_rng(seed)
    # Jitted init with the 'rbg' PRNG: eager init runs op by op and threefry's per-parameter
    # random bits take XLA on CPU tens of seconds to compile for a model with many tensors.
    first_patch = None if patch_sizes is None else int(patch_sizes[0])
    init = jax.jit(functools.partial(model.init, **model_kwargs(model, first_patch)))
    variables = unbox(dict(init(jax.random.key(seed, impl="rbg"),
                                jnp.zeros((1, *images.shape[1:])))))
    flexi = None if patch_sizes is None else {
        "patch_sizes": list(patch_sizes), "probs": "uniform" if probs is None else list(probs)}
    state = None
    num_classes = int(jax.eval_shape(
        lambda v, x: model.apply(v, x, **model_kwargs(model, first_patch)), variables,
        jnp.zeros((1, *images.shape[1:]))).shape[-1])
    for i in range(steps):
        idx = rng.integers(0, len(images), batch_size)
        patch = None if flexi is None else patch_schedule.patch_size_for_step(flexi, seed, i)
        tx, jitted = _train_step(model, steps, float(lr), float(weight_decay), seed, patch)
        state = train_state(variables, tx) if state is None else state
        batch = {"image": images[idx], "labels": jax.nn.one_hot(labels[idx], num_classes)}
        state, metrics = jitted(state, batch)
        if log and (i % max(1, steps // 5) == 0 or i == steps - 1):
            log(f"step {i + 1}/{steps} patch {patch} loss {float(metrics['loss']):.3f}")
    return variables if state is None else eval_variables(state)


def train(model, data, *, steps: int, patch_sizes: Sequence[int] = (BASE_PATCH,),
          probs: Sequence[float] | None = None, batch_size: int = 64, lr: float = 1e-3,
          seed: int = 0, log: Callable[[str], None] | None = print) -> dict:
    """Trains a micro ViT / FlexiViT with AdamW (warmup + cosine) and a per-step patch size
    drawn from ``patch_sizes`` with ``probs`` (:func:`train_variables`); returns the params."""
    return train_variables(model, data, steps=steps, patch_sizes=patch_sizes, probs=probs,
                           batch_size=batch_size, lr=lr, seed=seed, log=log)["params"]


@functools.lru_cache(maxsize=128)
def _predict(model, patch_size):
    return jax.jit(lambda v, x: model.apply(v, x, train=False, **model_kwargs(model, patch_size)))


def _as_variables(params_or_variables: dict) -> dict:
    if "params" in params_or_variables:
        return params_or_variables
    return {"params": params_or_variables}


def predict_labels(model, variables, images: np.ndarray, patch_size=None,
                   batch_size: int = 297) -> np.ndarray:
    """Argmax class of each image (evaluation mode; BatchNorm uses its running statistics)."""
    apply = _predict(model, patch_size)
    variables = _as_variables(variables)
    preds = [np.asarray(apply(variables, images[start:start + batch_size])).argmax(-1)
             for start in range(0, len(images), batch_size)]
    return np.concatenate(preds)


def accuracy(model, params, data, patch_size=None, batch_size: int = 297) -> float:
    """Top-1 accuracy on the test split at ``patch_size`` (None: the model's base patch).

    ``params``: a ViT's params, or the full variables of any model (with 'batch_stats')."""
    images, labels = data["test"]
    return float(np.mean(predict_labels(model, params, images, patch_size, batch_size) == labels))


def with_resized_patch_embed(name: str, params: dict, new_patch: int, how: str, **overrides):
    """(model, params) of a ViT whose stored kernel is moved to ``new_patch`` by ``how``
    ('pi' or 'bilinear'); the position embedding stays and is resampled per call.
    ``overrides``: the model's other :func:`make_model` fields (e.g. its posemb_grid)."""
    kernel = params["patch_embed"]["kernel"]
    if how == "pi":
        new_kernel = pi_resize_kernel(kernel, new_patch, "timm")
    elif how == "bilinear":
        new_kernel = bilinear_resize_kernel(kernel, new_patch)
    else:
        raise ValueError(f"how must be 'pi' or 'bilinear', got {how!r}")
    new_params = dict(params)
    new_params["patch_embed"] = dict(params["patch_embed"], kernel=new_kernel)
    model = make_model(name, **{**overrides, "patch_size": (new_patch, new_patch)})
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
