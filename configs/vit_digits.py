r"""Fixed-patch ViT baseline on the embedded digits (compare with configs/flexivit_digits.py).

Same model, data, optimizer and step count as the FlexiViT demo, but every step uses the
stored patch size 8. It is evaluated at the same patch sizes {4, 6, 8, 12, 16, 24}
(PI-resizing the kernel, as FlexiViT does): accuracy collapses away from patch size 8, which
is the failure FlexiViT's random patch-size training removes (FlexiViT paper, Fig. 1/3).

    python -m flexvision.train --config configs/vit_digits.py --workdir /tmp/vit_digits

Built from configs/flexivit_digits.py, so the two cannot drift apart. Config keys: see there.
"""

from flexvision.engine.configs import sibling

flexivit_digits = sibling(__file__, "flexivit_digits")  # one recipe, two configs

PATCH_SIZES = flexivit_digits.PATCH_SIZES


def get_config(arg=None):
    """arg: unused."""
    config = flexivit_digits.get_config(arg)
    config.model.name = "vit_micro"
    config.flexi = None  # one fixed patch size: the model's stored 8x8
    return config
