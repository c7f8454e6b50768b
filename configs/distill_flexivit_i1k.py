r"""Distilling a ViT-B/8 teacher into FlexiViT-B on ImageNet-1k (big_vision's FlexiViT recipe).

After big_vision configs/proj/flexivit/i1k_deit3_distill.py (FlexiViT paper, sec. 3.4): the
teacher runs at its own resolution (224 px for ViT-B/8) on the same inception crop as the
student, which trains at 240 px with a patch size drawn uniformly per step from the ten sizes
that divide 240 (48 ... 8); the loss is KL(teacher || student) at temperature 1; the student
starts from the teacher's weights (its patch embedding and position embedding solved through
flex.py's PI-resize / posemb matrices, see flexvision.train.distill.init_student_from_teacher);
Adam, lr 1e-4 with 5k warmup steps and cosine decay, weight decay 1e-5, clipping at norm 1.

    python -m flexvision.train --config configs/distill_flexivit_i1k.py:epochs=90 \
        --workdir gs://BUCKET/distill_flexivit_b --config.input.data_dir=gs://BUCKET/tfds \
        --config.distill.teacher.weights=/path/vit_base_patch8_224.augreg2_in21k_ft_in1k.safetensors

The teacher is any registered model: ``teacher.source='timm'`` (name + .safetensors, as here),
``'big_vision'`` (.npz) or ``'workdir'`` (a flexvision run). DeiT III teachers (LayerScale) are
not importable yet; big_vision's DeiT III recipe differs only in the teacher (384 px).
Differences from big_vision: the teacher's view is the student's 240 px crop resized to the
teacher's resolution inside the step (big_vision resizes the raw crop twice), and mixup uses
one Beta(alpha, alpha) pair per batch (``mixup_alpha``) instead of big_vision's p=1, n=2 mixing.
``arg``: ``epochs=N`` (default 90). Keys: configs/flexivit_digits.py and train/distill.py.
"""

import ml_collections

PATCH_SIZES = (48, 40, 30, 24, 20, 16, 15, 12, 10, 8)
TRAIN_EXAMPLES = 1_281_167


def parse_arg(arg):
    """'epochs=90' -> {'epochs': 90}."""
    options = {"epochs": 90}
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key != "epochs" or not value.isdigit():
            raise ValueError(f"unknown config arg {part!r}; use epochs=N")
        options["epochs"] = int(value)
    return options


def get_config(arg=None):
    options = parse_arg(arg)
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "flexivit_base"
    config.model.kwargs = ml_collections.ConfigDict({"num_classes": 1000})

    config.input = ml_collections.ConfigDict()
    config.input.name = "imagenet2012"
    config.input.split = "train[:99%]"
    config.input.data_dir = ml_collections.config_dict.placeholder(str)
    config.input.pp = ("decode|inception_crop(240)|flip_lr|value_range(-1, 1)|"
                       "onehot(1000, key='label', key_result='labels')")
    config.input.batch_size = 1024
    config.input.shuffle_buffer = 250_000

    config.flexi = ml_collections.ConfigDict()
    config.flexi.patch_sizes = PATCH_SIZES
    config.flexi.probs = "uniform"

    config.distill = ml_collections.ConfigDict()
    config.distill.teacher = ml_collections.ConfigDict()
    config.distill.teacher.source = "timm"
    config.distill.teacher.name = "vit_base_patch8_224"
    config.distill.teacher.weights = ml_collections.config_dict.placeholder(str)
    config.distill.teacher.workdir = ml_collections.config_dict.placeholder(str)
    config.distill.teacher.kwargs = ml_collections.ConfigDict({"num_classes": 1000})
    config.distill.teacher.patch_size = ml_collections.config_dict.placeholder(int)
    config.distill.teacher.resolution = 224
    config.distill.temperature = 1.0
    config.distill.label_weight = 0.0
    config.distill.init_from_teacher = True

    config.loss = "softmax_xent"  # only the eval loss and label_weight > 0 use it
    config.label_smoothing = 0.0
    config.mixup_alpha = 0.2

    config.lr = 1e-4
    config.schedule = ml_collections.ConfigDict(
        {"warmup_steps": 5000, "decay_type": "cosine", "min_lr_ratio": 0.0})
    config.optax = ml_collections.ConfigDict(
        {"name": "adam", "kwargs": {"b1": 0.9, "b2": 0.999}, "weight_decay": 1e-5 / 1e-4,
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

    config.mesh = [("data", -1)]
    config.sharding = ml_collections.ConfigDict()
    config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
    return config
