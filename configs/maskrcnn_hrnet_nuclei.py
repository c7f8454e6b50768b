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
"""

import ml_collections

from flexvision.engine import sharding

MAX_INSTANCES = 48  # training tiles hold at most 15 nuclei, the held-out region 36


def get_config(arg=None):
    """arg: unused (kept for the `configs/NAME.py:arg` convention)."""
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = "detection"

    config.model = ml_collections.ConfigDict()
    config.model.name = "maskrcnn_hrnet_micro"
    config.model.kwargs = ml_collections.ConfigDict({
        "num_classes": 2,  # background + nucleus
        "neck_channels": 64,
        "backbone_overrides": {"in_chans": 1},
        # FPN levels at strides 4, 8, 16 and the pool at 32: 4 x stride anchors.
        "rpn_overrides": {"anchor_sizes": ((16.0,), (32.0,), (64.0,), (128.0,)),
                          "pre_nms_top_n_train": 600, "post_nms_top_n_train": 300,
                          "pre_nms_top_n_test": 600, "post_nms_top_n_test": 300,
                          "batch_size_per_image": 128},
        "roi_overrides": {"representation_size": 256, "mask_layers": (64, 64),
                          "mask_dim_reduced": 64, "batch_size_per_image": 128,
                          "detections_per_img": 100},
    })

    config.input = ml_collections.ConfigDict()
    config.input.name = "nuclei"
    config.input.split = "train"
    config.input.data_dir = ml_collections.config_dict.placeholder(str)
    config.input.pp = (f"decode(1)|det_instances|det_flip_lr|det_flip_ud|"
                       f"det_scale_jitter(128, 0.75, 1.5)|det_pad(128, {MAX_INSTANCES})|"
                       f"value_range(-1, 1)")
    config.input.batch_size = 8
    config.input.shuffle_buffer = 64

    config.flexi = None  # fixed architecture: no patch size to draw

    config.lr = 1e-3
    config.schedule = ml_collections.ConfigDict(
        {"warmup_steps": 50, "decay_type": "cosine", "min_lr_ratio": 0.0})
    config.optax = ml_collections.ConfigDict(
        {"name": "adam", "kwargs": {"b1": 0.9, "b2": 0.999}, "weight_decay": 1e-4,
         "grad_clip_norm": 1.0})

    config.total_steps = 600
    config.log_every = 25
    config.checkpoint_every = 200
    config.keep_checkpoints = 2

    config.eval = ml_collections.ConfigDict()
    config.eval.pp = (f"decode(1)|det_instances|det_pad((128, 512), {MAX_INSTANCES})|"
                      f"value_range(-1, 1)")
    config.eval.splits = ("test",)
    config.eval.patch_sizes = ()
    config.eval.batch_size = 1
    config.eval.every = 0
    config.eval.timing_repeats = 3
    config.eval.mask_threshold = 0.5
    config.eval.overlay_score = 0.5

    config.mesh = (("data", -1),)
    config.sharding = sharding.default_config()
    config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
    return config
