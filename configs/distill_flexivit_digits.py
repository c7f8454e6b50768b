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

from flexvision.engine.configs import sibling

flexivit_digits = sibling(__file__, "flexivit_digits")  # the student's recipe
common = sibling(__file__, "common")


def get_config(arg=None):
    """arg: the teacher's workdir (a finished configs/vit_digits.py run)."""
    config = flexivit_digits.get_config()
    config.distill = common.distill_block("workdir", resolution=48,
                                          workdir=arg or "/tmp/vit_digits")
    config.total_steps = 1200  # the labels-only baseline's budget, for a fair comparison
    config.schedule.warmup_steps = 50
    config.checkpoint_every = 400
    return config
