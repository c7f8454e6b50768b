r"""Fixed-patch ViT baseline on the embedded digits (compare with configs/flexivit_digits.py).

Same model, data, optimizer and step count as the FlexiViT demo, but every step uses the
stored patch size 8. It is evaluated at the same patch sizes {4, 6, 8, 12, 16, 24}
(PI-resizing the kernel, as FlexiViT does): accuracy collapses away from patch size 8, which
is the failure FlexiViT's random patch-size training removes (FlexiViT paper, Fig. 1/3).

    python -m flexvision.train --config configs/vit_digits.py --workdir /tmp/vit_digits

Config keys: see configs/flexivit_digits.py.
"""

import ml_collections

from flexvision.train import sharding

PATCH_SIZES = (4, 6, 8, 12, 16, 24)


def get_config(arg=None):
    """arg: unused."""
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "vit_micro"
    config.model.kwargs = ml_collections.ConfigDict({"num_classes": 10})

    config.input = ml_collections.ConfigDict()
    config.input.name = "flexvision_digits"
    config.input.split = "train"
    config.input.data_dir = ml_collections.config_dict.placeholder(str)
    config.input.pp = "decode|resize(52)|random_crop(48)|value_range(-1, 1)|onehot(10)"
    config.input.batch_size = 64
    config.input.shuffle_buffer = 1500

    config.flexi = None  # one fixed patch size: the model's stored 8x8

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
