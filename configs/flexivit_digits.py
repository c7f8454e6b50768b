r"""FlexiViT on the embedded digits: the README demo (CPU, a few minutes, no download).

One micro FlexiViT (width 96, depth 4, 3 heads; kernel stored at patch 8) is trained on
scikit-learn's 8x8 digits upsampled to 48x48, with the patch size of every step drawn
uniformly from {4, 6, 8, 12, 16, 24} (all divide 48: 12x12 down to 2x2 tokens). It is then
evaluated at each of these patch sizes: one set of weights serves all of them.

    python -m flexvision.train --config configs/flexivit_digits.py --workdir /tmp/flexivit_digits

Compare with the fixed-patch baseline in configs/vit_digits.py. Any key can be overridden,
e.g. ``--config.total_steps=300 --config.input.batch_size=32``.

Config keys (shared by every config in configs/):
  seed                 seeds init, data order, augmentation, dropout and patch-size draws.
  model.name           a registered model (flexvision.list_models()); model.kwargs: overrides.
  input.name/split/data_dir   TFDS dataset; built-in 'flexvision_digits' builds itself.
  input.pp             preprocessing op string (flexvision.data.ops); input.batch_size: global.
  input.shuffle_buffer shuffle buffer (examples).
  flexi.patch_sizes    patch sizes drawn per step; flexi.probs: 'uniform' or weights.
                       Set flexi = None (or leave patch_sizes empty) for fixed-patch training.
  loss                 'softmax_xent' or 'sigmoid_xent'; label_smoothing: epsilon.
  mixup_alpha          Beta(alpha, alpha) mixup; 0 disables.
  lr, schedule.{warmup_steps, decay_type, min_lr_ratio}, optax.{name, kwargs, weight_decay,
                       grad_clip_norm}: see flexvision/engine/optim.py.
  total_steps, log_every, checkpoint_every, keep_checkpoints (0 keeps every checkpoint).
  eval.{pp, splits, patch_sizes, resolutions, batch_size, every}: flexvision/train/evaluator.py.
  mesh                 ((axis name, size), ...), default (("data", -1),) (data parallel);
                       e.g. --config.mesh="(('data', -1), ('fsdp', 2))" (docs/sharding.md).
  sharding             rules and parameter tactics (sharding.default_config(); docs/sharding.md).
  compilation_cache_dir   JAX persistent compilation cache (default ~/.cache/flexvision/...).
"""

import ml_collections

from flexvision.engine import sharding

PATCH_SIZES = (4, 6, 8, 12, 16, 24)


def get_config(arg=None):
    """arg: unused (kept for the `configs/NAME.py:arg` convention)."""
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "flexivit_micro"
    config.model.kwargs = ml_collections.ConfigDict({"num_classes": 10})

    config.input = ml_collections.ConfigDict()
    config.input.name = "flexvision_digits"
    config.input.split = "train"
    config.input.data_dir = ml_collections.config_dict.placeholder(str)
    config.input.pp = "decode|resize(52)|random_crop(48)|value_range(-1, 1)|onehot(10)"
    config.input.batch_size = 64
    config.input.shuffle_buffer = 1500

    config.flexi = ml_collections.ConfigDict()
    config.flexi.patch_sizes = PATCH_SIZES
    config.flexi.probs = "uniform"

    config.loss = "softmax_xent"
    config.label_smoothing = 0.0
    config.mixup_alpha = 0.0

    config.lr = 1e-3
    config.schedule = ml_collections.ConfigDict(
        {"warmup_steps": 100, "decay_type": "cosine", "min_lr_ratio": 0.0})
    config.optax = ml_collections.ConfigDict(
        {"name": "adam", "kwargs": {"b1": 0.9, "b2": 0.999}, "weight_decay": 1e-4,
         "grad_clip_norm": 1.0})

    config.total_steps = 1200
    config.log_every = 25
    config.checkpoint_every = 300
    config.keep_checkpoints = 2

    config.eval = ml_collections.ConfigDict()
    config.eval.pp = "decode|resize(52)|central_crop(48)|value_range(-1, 1)|onehot(10)"
    config.eval.splits = ("test",)
    config.eval.patch_sizes = PATCH_SIZES
    config.eval.resolutions = ()
    config.eval.batch_size = 128
    config.eval.every = 0

    config.mesh = (("data", -1),)
    config.sharding = sharding.default_config()
    config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
    return config
