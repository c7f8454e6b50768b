r"""FlexiViT on your own images: a folder with one subfolder of JPEG/PNG files per class.

    python -m flexvision.train --config configs/flexivit_image_folder.py:/content/photos \
        --workdir workdirs/photos

``arg``: ``ROOT`` then optional comma-separated ``small|base|micro`` (model size, default
small), ``epochs=N`` (default 30) and ``size=S`` (input pixels, default 240; FlexiViT's patch
sizes are those of 48..8 that divide it). ROOT is either ``ROOT/<class>/*.jpg`` (then 90% of
the images train and the last 10% of the split's fixed shuffled order evaluate) or
``ROOT/<split>/<class>/*.jpg`` with a 'train' folder and a 'test' or 'validation' one. The
classes are counted from the folders when the config is read (flexvision/data/image_folder.py).

The input is the ImageNet recipe at ``size`` (inception crop, flip; resize_small + central crop
for evals); the optimizer and schedule are those of configs/flexivit_digits.py (Adam, warmup +
cosine), scaled to the number of images. Config keys: see configs/flexivit_digits.py.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flexivit_digits  # noqa: E402  (the small-data recipe)
import flexivit_i1k  # noqa: E402  (its patch sizes)

from flexvision.data import image_folder  # noqa: E402


def parse_arg(arg):
    """'ROOT,small,epochs=30,size=240' -> options dict; ValueError without ROOT."""
    parts = [p for p in (arg or "").split(",") if p]
    if not parts:
        raise ValueError("pass the image folder after the config path: --config configs/"
                         "flexivit_image_folder.py:/path/to/ROOT[,small,epochs=30,size=240]")
    options = {"root": parts[0], "model": "small", "epochs": 30, "size": 240}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        if not value and key in ("micro", "small", "base"):
            options["model"] = key
        elif key in ("epochs", "size") and value.isdigit():
            options[key] = int(value)
        else:
            raise ValueError(f"unknown config arg {part!r}; use ROOT,small|base|micro,epochs=N,"
                             f"size=S")
    return options


def get_config(arg=None):
    options = parse_arg(arg)
    folder = image_folder.ImageFolder(options["root"])
    classes, size = folder.num_classes, options["size"]
    eval_split = next((s for s in ("test", "validation", "val") if s in folder.splits), None)
    train_split = "train" if eval_split else "train[:90%]"
    patch_sizes = tuple(p for p in flexivit_i1k.PATCH_SIZES if size % p == 0)
    if not patch_sizes:
        raise ValueError(f"size={size} is divisible by none of the patch sizes "
                         f"{flexivit_i1k.PATCH_SIZES}; use e.g. 240 or 224")

    config = flexivit_digits.get_config()
    config.model.name = f"flexivit_{options['model']}"
    config.model.kwargs = ml_collections.ConfigDict({"num_classes": classes})

    config.input.name = image_folder.NAME
    config.input.data_dir = options["root"]
    config.input.split = train_split
    config.input.pp = (f"decode|inception_crop({size})|flip_lr|value_range(-1, 1)|"
                       f"onehot({classes})")
    config.input.batch_size = 64
    config.input.shuffle_buffer = 10_000

    config.flexi.patch_sizes = patch_sizes
    steps_per_epoch = max(1, folder.num_examples(train_split) // config.input.batch_size)
    config.total_steps = max(1, options["epochs"] * steps_per_epoch)
    config.schedule.warmup_steps = min(500, config.total_steps // 10)
    config.log_every = min(50, config.total_steps)
    config.checkpoint_every = min(1000, config.total_steps)

    config.eval.pp = (f"decode|resize_small({size * 8 // 7})|central_crop({size})|"
                      f"value_range(-1, 1)|onehot({classes})")
    config.eval.splits = (eval_split or "train[90%:]",)
    config.eval.patch_sizes = patch_sizes
    config.eval.batch_size = 64
    return config
