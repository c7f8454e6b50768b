r"""Distilling a fixed-patch ViT teacher into a FlexiViT student on the embedded digits (CPU).

Two commands: train the teacher (configs/vit_digits.py: vit_micro at patch 8, 48 px), then
distill it into flexivit_micro with a random patch size per step, initialised from the teacher:

    python -m flexvision.train --config configs/vit_digits.py --workdir /tmp/vit_digits
    python -m flexvision.train --config configs/distill_flexivit_digits.py:/tmp/vit_digits \
        --workdir /tmp/distill_digits

The arg after ':' is the teacher's workdir (or set ``--config.distill.teacher.workdir``). The
final table (workdir/final_eval.json) holds the student's accuracy per patch size, the
teacher's accuracy, and agreement@1 / KL with the teacher per patch size.

Config keys: see configs/flexivit_digits.py and flexvision/train/distill.py (config.distill).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flexivit_digits  # noqa: E402  (the student's recipe)


def get_config(arg=None):
    """arg: the teacher's workdir (a finished configs/vit_digits.py run)."""
    config = flexivit_digits.get_config()
    config.distill = ml_collections.ConfigDict()
    config.distill.teacher = ml_collections.ConfigDict()
    config.distill.teacher.source = "workdir"
    config.distill.teacher.workdir = arg or "/tmp/vit_digits"
    config.distill.teacher.name = ml_collections.config_dict.placeholder(str)
    config.distill.teacher.weights = ml_collections.config_dict.placeholder(str)
    config.distill.teacher.kwargs = ml_collections.ConfigDict()
    config.distill.teacher.patch_size = ml_collections.config_dict.placeholder(int)
    config.distill.teacher.resolution = 48
    config.distill.temperature = 1.0
    config.distill.label_weight = 0.0
    config.distill.init_from_teacher = True

    config.total_steps = 1200  # the labels-only baseline's budget, for a fair comparison
    config.schedule.warmup_steps = 50
    config.checkpoint_every = 400
    return config
