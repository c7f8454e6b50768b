"""Optimizer and learning-rate schedule from the config.

Config keys:
  config.lr                      peak learning rate.
  config.schedule.warmup_steps   linear warmup from 0 to ``lr``.
  config.schedule.decay_type     'cosine' (to ``lr * min_lr_ratio``), 'linear', 'poly', or
                                 'constant'.
  config.schedule.min_lr_ratio   final lr as a fraction of ``lr`` (default 0).
  config.schedule.power          'poly' only (default 0.9): mmcv's ``PolyLrUpdaterHook`` by
                                 iteration, lr_i = (lr - min_lr) (1 - i / T)^power + min_lr over
                                 the T steps after warmup (BPR's and mmseg's schedule).
  config.optax.name              'adam' (Adam with decoupled weight decay, i.e. AdamW),
                                 'sgd' (momentum), or 'lion'.
  config.optax.kwargs            passed to optax's scale_by_* transform (b1, b2, eps, momentum).
  config.optax.weight_decay      decoupled weight decay (Loshchilov & Hutter 2019), applied to
                                 parameters with ndim >= 2 only (kernels, not biases/norms) and
                                 scaled by the schedule like the update; 0 switches it off.
  config.optax.grad_clip_norm    clip the gradients' global norm (None: no clipping).

The chain always has the same four slots (clip, scale, weight decay, lr), with
``optax.identity()`` standing in for clipping or weight decay when they are off. Both keep no
state (EmptyState, like identity's), so the optimizer state has the same tree structure with or
without them: a run resumes after clipping is switched on (the NaN guard's advice) or off.
"""

from __future__ import annotations

import jax
import optax

_SCALERS = {
    "adam": optax.scale_by_adam,
    "sgd": lambda **kw: optax.trace(decay=kw.pop("momentum", 0.9), **kw),
    "lion": optax.scale_by_lion,
}


def make_schedule(config) -> optax.Schedule:
    """Linear warmup to ``config.lr``, then cosine/linear/poly decay or constant, over
    total_steps."""
    sched = config.get("schedule", {}) or {}
    warmup = int(sched.get("warmup_steps", 0))
    total = int(config.total_steps)
    decay_type = sched.get("decay_type", "cosine")
    end = config.lr * float(sched.get("min_lr_ratio", 0.0))
    if warmup >= total and total > 0:
        raise ValueError(f"schedule.warmup_steps ({warmup}) must be below total_steps ({total})")
    decay_steps = max(total - warmup, 1)
    if decay_type == "cosine":
        decay = optax.cosine_decay_schedule(config.lr, decay_steps, alpha=end / config.lr if config.lr else 0.0)
    elif decay_type == "linear":
        decay = optax.linear_schedule(config.lr, end, decay_steps)
    elif decay_type == "poly":
        power = float(sched.get("power", 0.9))
        if not power > 0:
            raise ValueError(f"schedule.power must be positive, got {power!r}")
        decay = optax.polynomial_schedule(config.lr, end, power, decay_steps)
    elif decay_type == "constant":
        decay = optax.constant_schedule(config.lr)
    else:
        raise ValueError(f"schedule.decay_type must be 'cosine', 'linear', 'poly' or "
                         f"'constant', got {decay_type!r}")
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), decay], [warmup])


def _decay_mask(params):
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain described in this module's docstring, and its lr schedule."""
    opt = config.optax
    name = opt.get("name", "adam")
    if name not in _SCALERS:
        raise ValueError(f"config.optax.name must be one of {sorted(_SCALERS)}, got {name!r}")
    schedule = make_schedule(config)
    clip = (optax.clip_by_global_norm(float(opt.grad_clip_norm)) if opt.get("grad_clip_norm")
            else optax.identity())
    decay = (optax.add_decayed_weights(float(opt.weight_decay), mask=_decay_mask)
             if opt.get("weight_decay") else optax.identity())
    scale = _SCALERS[name](**dict(opt.get("kwargs", {}) or {}))
    return optax.chain(clip, scale, decay, optax.scale_by_learning_rate(schedule)), schedule
