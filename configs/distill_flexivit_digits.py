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

import importlib.util
import os

import ml_collections


def _sibling_config(name):
    """configs/NAME.py loaded by path (config files are loaded by path, not as a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_flexvision_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    """arg: the teacher's workdir (a finished configs/vit_digits.py run)."""
    config = _sibling_config("flexivit_digits").get_config()
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
