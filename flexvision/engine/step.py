"""Train and eval step factories: pure functions of (state, batch), jitted per patch size.

The train state is a plain dict pytree::

    {"step": int32[], "params": ..., "opt_state": ..., ["batch_stats": ...]}

Batches are dicts with "image" [B, H, W, C] and "labels" [B, K] (one-hot or soft); eval
batches also carry "_mask" [B] (0 for padding rows). A step's randomness (dropout, drop path,
mixup) is derived from (seed, step) inside the step, so it needs no rng in the state and a
resumed run repeats it exactly.

A task whose loss is not ``loss_fn(logits, labels)`` (detection: the model computes its own
losses from targets in the batch) passes ``batch_loss`` (:data:`BatchLoss`) to
:func:`make_train_step`; the step, its optimizer update, norms, NaN flag and batch-stats
handling stay the same.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flexvision.engine.mixup import mixup
from flexvision.layers.flex import resize_images

State = dict[str, Any]

BatchLoss = Callable[..., tuple[jax.Array, dict[str, jax.Array], dict]]
"""``(model, variables, batch, rngs, patch_size) -> (loss, metrics, updates)``: a task's
training loss of one batch. ``variables`` {"params", ["batch_stats"]}; ``rngs`` the step's
named keys (:func:`batch_loss_rngs`); ``patch_size`` static (None: as built). Returns the
scalar loss that is differentiated, extra scalar metrics (logged as ``train/<name>``) and the
updated mutable collections (:func:`apply_train` gives them)."""


def accepts_patch_size(model: nn.Module) -> bool:
    """Whether the model takes a ``patch_size`` argument (FlexiViT-style models): the model
    contract's ``flex_kwargs`` (flexvision/models/contract.py) says so."""
    return "patch_size" in getattr(model, "flex_kwargs", ())


def model_kwargs(model: nn.Module, patch_size: int | None) -> dict[str, Any]:
    """Keyword arguments selecting ``patch_size`` for models that support it."""
    if patch_size is None:
        return {}
    if not accepts_patch_size(model):
        raise ValueError(f"{type(model).__name__} has no patch_size argument; leave "
                         f"config.flexi / eval patch sizes unset for this model")
    return {"patch_size": int(patch_size)}


def step_rngs(seed: int, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(dropout key, mixup key) of one step: fold_in(key(seed), step), split in two."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return tuple(jax.random.split(key))


def batch_loss_rngs(seed: int, step: jax.Array) -> dict[str, jax.Array]:
    """The named keys a :data:`BatchLoss` gets: {"dropout", "sampling"}, the two keys of
    :func:`step_rngs` (the second is mixup's in classification)."""
    dropout_rng, other_rng = step_rngs(seed, step)
    return {"dropout": dropout_rng, "sampling": other_rng}


def apply_train(model: nn.Module, variables: dict, *args, rngs: dict[str, jax.Array],
                **kwargs) -> tuple[Any, dict]:
    """``model.apply(variables, *args, train=True, rngs=rngs, **kwargs)`` -> (output, updates):
    with "batch_stats" in ``variables`` (BatchNorm models, e.g. HRNet) they are mutable and
    ``updates`` holds their new values; otherwise ``updates`` is {}."""
    if "batch_stats" in variables:
        return model.apply(variables, *args, train=True, rngs=rngs, mutable=["batch_stats"],
                           **kwargs)
    return model.apply(variables, *args, train=True, rngs=rngs, **kwargs), {}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_fn: Callable[[jax.Array, jax.Array], jax.Array], *, seed: int,
                    patch_size: int | None = None, mixup_alpha: float = 0.0,
                    targets_fn: Callable[[Any, jax.Array, jax.Array], jax.Array] | None = None,
                    batch_loss: BatchLoss | None = None,
                    ) -> Callable[..., tuple[State, dict]]:
    """One optimizer step at ``patch_size``: (state, batch, frozen=None) -> (new state, metrics).

    Metrics: loss (mean over the batch), grad_norm, param_norm (after the update), finite
    (loss, gradients and updated parameters all finite: the NaN guard reads it).
    ``loss_fn(logits, labels) -> [B]`` is the per-example loss (see ``engine.losses``).
    ``targets_fn(frozen, images, labels) -> targets`` (optional) replaces the labels the loss
    sees, after mixup: the hook for distillation, where a frozen teacher turns the same images
    into soft targets. ``frozen`` (the teacher's variables) is an argument of the step, outside
    the gradient and the optimizer: jitted, it stays an input buffer instead of being embedded
    as constants in every per-patch-size executable (for a ViT-B teacher, 344 MB each).

    ``batch_loss`` (a :data:`BatchLoss`) replaces the whole classification loss (``loss_fn``,
    mixup and ``targets_fn`` must then be unused: ValueError otherwise); its metrics join the
    step's metrics.
    """
    kwargs = model_kwargs(model, patch_size)
    if batch_loss is not None and (loss_fn is not None or mixup_alpha or targets_fn is not None):
        raise ValueError("make_train_step: batch_loss computes the whole loss; pass loss_fn=None "
                         "and no mixup_alpha / targets_fn with it")

    def classification_loss(state: State, batch: dict, frozen: Any) -> Callable:
        dropout_rng, mixup_rng = step_rngs(seed, state["step"])
        images, labels = batch["image"], batch["labels"]
        if mixup_alpha:
            images, labels = mixup(mixup_rng, images, labels, mixup_alpha)
        if targets_fn is not None:
            labels = jax.lax.stop_gradient(targets_fn(frozen, images, labels))

        def loss_of(variables):
            logits, updates = apply_train(model, variables, images, rngs={"dropout": dropout_rng},
                                          **kwargs)
            return jnp.mean(loss_fn(logits, labels)), ({}, updates)
        return loss_of

    def task_loss(state: State, batch: dict, frozen: Any) -> Callable:
        del frozen
        rngs = batch_loss_rngs(seed, state["step"])

        def loss_of(variables):
            loss, metrics, updates = batch_loss(model, variables, batch, rngs, patch_size)
            return loss, (metrics, updates)
        return loss_of

    make_loss = classification_loss if batch_loss is None else task_loss

    def train_step(state: State, batch: dict, frozen: Any = None) -> tuple[State, dict]:
        has_bn = "batch_stats" in state
        loss_of_variables = make_loss(state, batch, frozen)

        def loss_of(params):
            variables = {"params": params}
            if has_bn:
                variables["batch_stats"] = state["batch_stats"]
            return loss_of_variables(variables)

        (loss, (extra, updates)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state["params"])
        param_updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(state, step=state["step"] + 1,
                         params=optax.apply_updates(state["params"], param_updates),
                         opt_state=opt_state)
        if has_bn:
            new_state["batch_stats"] = updates["batch_stats"]
        grad_norm = optax.tree.norm(grads)
        param_norm = optax.tree.norm(new_state["params"])
        metrics = {**extra, "loss": loss, "grad_norm": grad_norm, "param_norm": param_norm,
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                   & jnp.isfinite(param_norm)}
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, loss_fn: Callable[[jax.Array, jax.Array], jax.Array], *,
                   patch_size: int | None = None, resolution: int | None = None,
                   ) -> Callable[[dict, dict], dict]:
    """(variables, batch) -> sums of correct top-1, loss and count over unpadded examples.

    ``resolution``: resize the batch's images to resolution x resolution first
    (``flex.resize_images``).
    """
    kwargs = model_kwargs(model, patch_size)

    def eval_step(variables: dict, batch: dict) -> dict:
        images = resize_images(batch["image"], resolution)
        logits = model.apply(variables, images, train=False, **kwargs)
        mask = batch["_mask"]
        correct = jnp.argmax(logits, -1) == jnp.argmax(batch["labels"], -1)
        return {"correct": jnp.sum(correct * mask),
                "loss": jnp.sum(loss_fn(logits, batch["labels"]) * mask),
                "count": jnp.sum(mask)}

    return eval_step
