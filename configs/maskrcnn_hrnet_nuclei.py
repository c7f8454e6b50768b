r"""Mask R-CNN on an HRNet backbone (FPN neck, BatchNorm), trained on the nuclei data (CPU).

The second backbone family of the nuclei demo (the first: configs/maskrcnn_flexivit_nuclei.py,
whose docstring lists the detection keys and outputs): a micro HRNet (branches at strides 4, 8,
16 of width 8, 16, 32; ``maskrcnn_hrnet_micro``) under an FPN, the RPN and the RoI heads,
trained from scratch on the 35 training tiles of stardist's nuclei image and evaluated (COCO
box/mask AP by pycocotools, images/s) on the held-out 128 x 512 region. HRNet's batch
statistics are updated by the train step and used by the evals. No patch size here: the model
runs as built.

    python -m flexvision.train --config configs/maskrcnn_hrnet_nuclei.py \
        --workdir /tmp/maskrcnn_hrnet_nuclei

Built from configs/maskrcnn_flexivit_nuclei.py (same data, anchors, heads, optimizer and
steps), so the two demos cannot drift apart; only the backbone and its neck differ.
"""

from flexvision.engine.configs import sibling

flexivit_nuclei = sibling(__file__, "maskrcnn_flexivit_nuclei")  # one recipe, two backbones
MAX_INSTANCES = flexivit_nuclei.MAX_INSTANCES


def get_config(arg=None):
    """arg: unused (kept for the `configs/NAME.py:arg` convention)."""
    config = flexivit_nuclei.get_config(arg)
    config.model.name = "maskrcnn_hrnet_micro"
    kwargs = config.model.kwargs
    del kwargs["neck_overrides"]  # an FPN over HRNet's branches (strides 4, 8, 16), pool at 32
    # Trained from scratch: BatchNorm learns (build_maskrcnn freezes it by default, as for an
    # ImageNet-initialised backbone).
    kwargs.freeze_bn = False
    config.flexi = None  # fixed architecture: no patch size to draw
    config.eval.patch_sizes = ()
    return config
