r"""FlexiViT on ImageNet-1k from scratch, after big_vision's configs/proj/flexi/ recipes.

240 px inputs; every step's patch size is drawn uniformly from the ten sizes that divide 240,
48 down to 8 (5x5 to 30x30 tokens); Adam with decoupled weight decay, linear warmup + cosine
decay, gradient clipping at global norm 1, mixup, inception crop + flip; sigmoid
cross-entropy. Evaluated on the validation split at every training patch size.

    python -m flexvision.train --config configs/flexivit_i1k.py:base,epochs=90 \
        --workdir gs://BUCKET/flexivit_b_i1k --config.input.data_dir=gs://BUCKET/tfds

Needs ImageNet prepared with TFDS (``imagenet2012``, manual download). ``arg``:
comma-separated ``small|base|large`` and ``epochs=N`` (default ``base,epochs=90``).
Weight decay: big_vision applies ``w -= wd * schedule * w`` with wd=1e-4; here decay is
AdamW-style (scaled by the lr), so ``optax.weight_decay = 1e-4 / lr`` gives the same decay.
Config keys: see configs/flexivit_digits.py. The same file with ``flexi = None`` is the fixed
patch-size baseline configs/vit_i1k.py.
"""

import ml_collections

from flexvision.engine import sharding

PATCH_SIZES = (48, 40, 30, 24, 20, 16, 15, 12, 10, 8)
TRAIN_EXAMPLES = 1_281_167


def parse_arg(arg):
    """'base,epochs=90' -> {'size': 'base', 'epochs': 90}."""
    options = {"size": "base", "epochs": 90}
    for part in filter(None, (arg or "").split(",")):
        if "=" in part:
            key, value = part.split("=", 1)
            if key != "epochs":
                raise ValueError(f"unknown config arg {key!r}; use small|base|large,epochs=N")
            options["epochs"] = int(value)
        elif part in ("small", "base", "large"):
            options["size"] = part
        else:
            raise ValueError(f"unknown config arg {part!r}; use small|base|large,epochs=N")
    return options


def get_config(arg=None):
    options = parse_arg(arg)
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = f"flexivit_{options['size']}"
    config.model.kwargs = ml_collections.ConfigDict({"num_classes": 1000})

    config.input = ml_collections.ConfigDict()
    config.input.name = "imagenet2012"
    config.input.split = "train[:99%]"
    config.input.data_dir = ml_collections.config_dict.placeholder(str)
    config.input.pp = ("decode|inception_crop(240)|flip_lr|value_range(-1, 1)|"
                       "onehot(1000, key='label', key_result='labels')")
    config.input.batch_size = 4096
    config.input.shuffle_buffer = 250_000

    config.flexi = ml_collections.ConfigDict()
    config.flexi.patch_sizes = PATCH_SIZES
    config.flexi.probs = "uniform"

    config.loss = "sigmoid_xent"
    config.label_smoothing = 0.0
    config.mixup_alpha = 0.2

    config.lr = 0.003
    config.schedule = ml_collections.ConfigDict(
        {"warmup_steps": 10_000, "decay_type": "cosine", "min_lr_ratio": 0.0})
    config.optax = ml_collections.ConfigDict(
        {"name": "adam", "kwargs": {"b1": 0.9, "b2": 0.999}, "weight_decay": 1e-4 / 0.003,
         "grad_clip_norm": 1.0})

    config.total_steps = options["epochs"] * TRAIN_EXAMPLES // config.input.batch_size
    config.log_every = 50
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3

    config.eval = ml_collections.ConfigDict()
    config.eval.pp = ("decode|resize_small(274)|central_crop(240)|value_range(-1, 1)|"
                      "onehot(1000, key='label', key_result='labels')")
    config.eval.splits = ("validation", "train[99%:]")
    config.eval.patch_sizes = PATCH_SIZES
    config.eval.resolutions = ()
    config.eval.batch_size = 1024
    config.eval.every = 5000

    config.mesh = (("data", -1),)
    config.sharding = sharding.default_config()
    config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
    return config
