r"""Mask R-CNN on a FlexiViT backbone, trained on the nuclei data (CPU, no download).

A micro FlexiViT (width 96, depth 4, 3 heads) under ViTDet's simple feature pyramid, the RPN
and the RoI heads (flexvision/detection/maskrcnn.py: ``maskrcnn_flexivit_micro``), trained
from scratch on the 35 training tiles (128 x 128, grayscale) of stardist's 2018 Data Science
Bowl nuclei image (flexvision/data/instances.py), with the patch size of every step drawn
uniformly from ``flexi.patch_sizes``. It is then evaluated on the held-out 128 x 512 region at
each of ``eval.patch_sizes``: COCO box/mask AP (pycocotools) and images/s per patch size from
one set of weights.

    python -m flexvision.train --config configs/maskrcnn_flexivit_nuclei.py \
        --workdir /tmp/maskrcnn_flexivit_nuclei

Outputs (flexvision/train/detection.py): final_eval.json (box/mask AP, AP50, AP75 and images/s
per patch size), final_eval.png (mask AP and images/s vs patch size), final_overlay.png (the
held-out region: ground truth, then predictions at each patch size), predictions/*.json (COCO
results and ground truth), metrics.jsonl and TensorBoard (train/loss_mask, test/mask_AP50/ps8,
...), checkpoints/.

Keys beyond those of configs/flexivit_digits.py:
  task                 "detection": Mask R-CNN training and COCO evaluation.
  model.name           a detector (flexvision.detection.list_detectors()); model.kwargs go to
                       build_maskrcnn: num_classes (WITH the background: dataset classes + 1),
                       neck_channels, backbone_overrides, rpn_overrides, roi_overrides (each
                       replaces the registered variant's dict as a whole).
  input.pp / eval.pp   det_* ops (flexvision/data/ops.py); both must run det_instances and
                       det_pad(size, max_instances) (max_instances >= the most instances of an
                       image of the split: checked at start-up).
  eval.timing_repeats  runs of each eval batch timed for images/s (median).
  eval.mask_threshold  binarisation of the pasted mask probabilities (0.5).
  eval.overlay_score   lowest score drawn in final_overlay.png.
"""

import ml_collections

from flexvision.engine import sharding

PATCH_SIZES = (4, 8, 16)
MAX_INSTANCES = 48  # training tiles hold at most 15 nuclei, the held-out region 36


def get_config(arg=None):
    """arg: unused (kept for the `configs/NAME.py:arg` convention)."""
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = "detection"

    config.model = ml_collections.ConfigDict()
    config.model.name = "maskrcnn_flexivit_micro"
    config.model.kwargs = ml_collections.ConfigDict({
        "num_classes": 2,  # background + nucleus
        "neck_channels": 32,
        "backbone_overrides": {"in_chans": 1},
        # The simple feature pyramid on a stride-8 grid (every patch size's tokens resampled
        # to it), levels at strides 4, 8, 16 and the pool at 32: the default stride-16 grid of
        # a 128 px tile is 8 x 8 cells for ~15 nuclei of 14-34 px.
        "neck_overrides": {"base_stride": 8, "scales": (2.0, 1.0, 0.5)},
        # 6 x stride anchors (24 px at stride 4): nuclei are 14-34 px wide (median 25).
        "rpn_overrides": {"anchor_sizes": ((24.0,), (48.0,), (96.0,), (192.0,)),
                          "pre_nms_top_n_train": 256, "post_nms_top_n_train": 128,
                          "pre_nms_top_n_test": 256, "post_nms_top_n_test": 128,
                          "batch_size_per_image": 128},
        "roi_overrides": {"representation_size": 128, "mask_layers": (32, 32),
                          "mask_dim_reduced": 32, "batch_size_per_image": 64,
                          "detections_per_img": 100},
    })

    config.input = ml_collections.ConfigDict()
    config.input.name = "nuclei"
    config.input.split = "train"
    config.input.data_dir = ml_collections.config_dict.placeholder(str)
    config.input.pp = (f"decode(1)|det_instances|det_flip_lr|det_flip_ud|"
                       f"det_scale_jitter(128, 0.8, 1.25)|det_pad(128, {MAX_INSTANCES})|"
                       f"value_range(-1, 1)")
    config.input.batch_size = 4
    config.input.shuffle_buffer = 64

    config.flexi = ml_collections.ConfigDict()
    config.flexi.patch_sizes = PATCH_SIZES
    config.flexi.probs = "uniform"

    config.lr = 2e-3
    config.schedule = ml_collections.ConfigDict(
        {"warmup_steps": 40, "decay_type": "cosine", "min_lr_ratio": 0.0})
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
    config.eval.patch_sizes = PATCH_SIZES
    config.eval.batch_size = 1
    config.eval.every = 0
    config.eval.timing_repeats = 3
    config.eval.mask_threshold = 0.5
    config.eval.overlay_score = 0.5

    config.mesh = (("data", -1),)
    config.sharding = sharding.default_config()
    config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
    return config
