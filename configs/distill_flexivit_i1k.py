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
``arg``: ``epochs=N`` (default 90). Built from configs/flexivit_i1k.py (FlexiViT-B, the same
data, patch sizes, mixup, clipping and evals); keys: configs/flexivit_digits.py and
flexvision/train/distill.py.
"""

from flexvision.engine.configs import sibling

flexivit_i1k = sibling(__file__, "flexivit_i1k")  # the student's recipe
common = sibling(__file__, "common")


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
    config = flexivit_i1k.get_config(f"base,epochs={options['epochs']}")
    config.input.batch_size = 1024
    config.distill = common.distill_block("timm", resolution=224, name="vit_base_patch8_224",
                                          kwargs={"num_classes": 1000})
    config.loss = "softmax_xent"  # only the eval loss and label_weight > 0 use it
    config.lr = 1e-4
    config.schedule.warmup_steps = 5000
    config.optax.weight_decay = 1e-5 / 1e-4
    config.total_steps = (options["epochs"] * flexivit_i1k.TRAIN_EXAMPLES
                          // config.input.batch_size)
    return config
