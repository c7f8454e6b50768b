"""Shared pieces of the small-scale FlexiViT experiments on scikit-learn's digits (no download).

Everything here runs in memory on CPU in minutes: the fixed 1500/297 digits split of
``flexvision.data.digits`` upsampled to 24x24 (or any size, 1 or 3 channels), a jitted AdamW
training loop for the micro ViT / FlexiViT (``vit_micro`` / ``flexivit_micro``, a random patch
size per step) and for any registered classifier (``train_variables``, BatchNorm state
included), per-patch-size evaluation, and the two ways of moving a trained patch-embedding
kernel to another patch size (FlexiViT paper, arXiv 2212.08013, Sec. 3.4: bilinear resize vs
PI-resize). Compiled steps are cached per model configuration, so repeated runs (one per
patch-size distribution, say) compile once.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable, Sequence

import flax.linen as nn
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
    images = np.asarray(jax.image.resize(
        jnp.asarray(images), (len(images), image_size, image_size, 1), "bilinear"))
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


def make_optimizer(steps: int, lr: float = 1e-3, weight_decay: float = 1e-4
                   ) -> optax.GradientTransformation:
    """AdamW with linear warmup (10% of ``steps``) and cosine decay, global-norm clipping at 1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    warmup = max(1, steps // 10) if steps > 1 else 0
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=weight_decay))


def _apply_kwargs(patch_size) -> dict:
    return {} if patch_size is None else {"patch_size": patch_size}


@functools.lru_cache(maxsize=64)
def _train_step(model, steps: int, lr: float, weight_decay: float, stateful: tuple[str, ...]):
    """One jitted AdamW step of ``model``, cached per (model, schedule): every run with the same
    configuration reuses the compiled executables (one per patch size, a static argument)."""
    tx = make_optimizer(steps, lr, weight_decay)

    def step(variables, opt_state, x, y, key, patch):
        state = {k: variables[k] for k in stateful}

        def loss_fn(params):
            out = model.apply({"params": params, **state}, x, train=True,
                              rngs={"dropout": key}, mutable=list(stateful) or False,
                              **_apply_kwargs(patch))
            logits, new_state = out if stateful else (out, {})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, **new_state}, opt_state, loss

    return tx, jax.jit(step, static_argnums=5)


def train_variables(model, data, *, steps: int, patch_sizes: Sequence[int] | None = None,
                    probs: Sequence[float] | None = None, batch_size: int = 64,
                    lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                    log: Callable[[str], None] | None = print) -> dict:
    """Trains any flexvision classifier on ``data['train']``; returns all its variables
    ('params' and, for BatchNorm models, 'batch_stats').

    ``patch_sizes`` None: the model is called without ``patch_size`` (any family); else each
    step draws its patch size from ``patch_sizes`` with ``probs`` (FlexiViT Sec. 3.2).
    """
    images, labels = data["train"]
    rng = np.random.default_rng(seed)
    # Jitted init with the 'rbg' PRNG: eager init runs op by op and threefry's per-parameter
    # random bits take XLA on CPU tens of seconds to compile for a model with many tensors.
    init = jax.jit(functools.partial(
        model.init, **_apply_kwargs(None if patch_sizes is None else int(patch_sizes[0]))))
    variables = dict(nn.meta.unbox(init(jax.random.key(seed, impl="rbg"),
                                        jnp.zeros((1, *images.shape[1:])))))
    stateful = tuple(sorted(k for k in variables if k != "params"))
    tx, jitted = _train_step(model, steps, float(lr), float(weight_decay), stateful)
    opt_state = tx.init(variables["params"])
    probs = None if probs is None else np.asarray(probs, np.float64)
    dropout_key = jax.random.key(seed + 1, impl="rbg")
    for i in range(steps):
        idx = rng.integers(0, len(images), batch_size)
        patch = None if patch_sizes is None else int(rng.choice(patch_sizes, p=probs))
        variables, opt_state, loss = jitted(variables, opt_state, images[idx], labels[idx],
                                            jax.random.fold_in(dropout_key, i), patch)
        if log and (i % max(1, steps // 5) == 0 or i == steps - 1):
            log(f"step {i + 1}/{steps} patch {patch} loss {float(loss):.3f}")
    return variables


def train(model, data, *, steps: int, patch_sizes: Sequence[int] = (BASE_PATCH,),
          probs: Sequence[float] | None = None, batch_size: int = 64, lr: float = 1e-3,
          seed: int = 0, log: Callable[[str], None] | None = print) -> dict:
    """Trains a micro ViT / FlexiViT with AdamW (warmup + cosine) and a per-step patch size
    drawn from ``patch_sizes`` with ``probs``; returns the params. One jitted step per patch
    size, compiled once per model configuration and schedule."""
    return train_variables(model, data, steps=steps, patch_sizes=patch_sizes, probs=probs,
                           batch_size=batch_size, lr=lr, seed=seed, log=log)["params"]


def flexvision_boxed():
    return nn.meta.AxisMetadata


@functools.lru_cache(maxsize=128)
def _predict(model, patch_size):
    return jax.jit(lambda v, x: model.apply(v, x, train=False, **_apply_kwargs(patch_size)))


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


def bilinear_resize_kernel(kernel_hwio: jax.Array, new_patch: int) -> jax.Array:
    """The naive alternative to PI-resize: resize the kernel like an image (bilinear).
    Token norms then scale with the patch area, which PI-resize avoids (FlexiViT Sec. 3.4)."""
    return jax.image.resize(kernel_hwio, (new_patch, new_patch, *kernel_hwio.shape[2:]),
                            "bilinear", antialias=False)


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
