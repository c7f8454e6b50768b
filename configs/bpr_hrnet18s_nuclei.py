r"""BPR's refinement network trained on nuclei boundary patches through the trainer (issue 18).

A reduced-width ``bpr_hrnet18s`` (BPR's HRNetV2-W18-small refiner: image + coarse mask in,
background/foreground logits at the input size out; here one module per stage, branches of 8,
16, 32 channels, three stages) learns to refine the boundary patches of
``flexvision_bpr_patches`` (flexvision/detection/bpr_data.py: 16 px patches along degraded
ground-truth masks of the nuclei training tiles, resized to 32 px; built locally, no download).
BPR's recipe (tinyalpha/BPR configs/bpr/hrnet18s_128.py, configs/_base_/schedules/
schedule_160k.py): random horizontal flip of image, coarse mask and label together, mmseg's
photometric distortion, mmseg normalisation, the mask mapped to {-1, +1} as 4th channel,
per-pixel softmax cross-entropy, SGD with momentum 0.9 and the poly schedule (power 0.9,
min lr = lr / 100; BPR: 0.01 -> 1e-4 over 160k steps of batch 8 x 8 GPUs). Sized for 2 CPU
cores: 300 steps of batch 32 at lr 0.05, a few minutes.

    python -m flexvision.train --config configs/bpr_hrnet18s_nuclei.py --workdir /tmp/bpr_nuclei

The eval (flexvision/train/segmentation.py) scores the refined held-out patches (pixel accuracy,
mean/foreground IoU, patch Boundary IoU) next to the coarse masks they were given. Measured
(seed 0; 56 s in all on 2 CPU cores shared with other jobs, load ~8), coarse -> refined on the
221 held-out patches: pixel accuracy 0.916 -> 0.934, foreground IoU 0.821 -> 0.859, mean IoU
0.842 -> 0.875, patch Boundary IoU 0.415 -> 0.509. The trained workdir refines whole images
(a detector's COCO results) with ``python -m experiments.bpr_nuclei --refiner_workdir DIR
--coarse_predictions FILE``.

Departure from BPR: torch SGD's weight decay is coupled (added to the gradient before the
momentum); flexvision's optimizer (engine/optim.py) decays decoupled, kernels only, after the
momentum. With momentum m a coupled decay wd acts at steady state like a decoupled
wd / (1 - m): 5e-4 in BPR, 5e-3 here.
"""

import ml_collections

from flexvision.detection import bpr
from flexvision.engine import sharding

# One module per stage, 8/16/32-wide branches: the full stem and head, small enough for CPUs.
SMALL_STAGES = [[1, "bottleneck", [1], [8]], [1, "basic", [1, 1], [8, 16]],
                [1, "basic", [1, 1, 1], [8, 16, 32]]]
NORMALIZE = (f"standardize({tuple(bpr.IMAGE_MEAN)}, {tuple(bpr.IMAGE_STD)})|"
             f"value_range(-1, 1, 0, 1, key='mask')|concat_channels(('image', 'mask'))|"
             f"squeeze('label')|onehot(2, key='label', key_result='labels')|"
             f"keep('image', 'labels')")


def get_config(arg=None):
    """arg: unused."""
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = "segmentation"

    config.model = ml_collections.ConfigDict()
    config.model.name = "bpr_hrnet18s"
    config.model.kwargs = ml_collections.ConfigDict({"stages": SMALL_STAGES})

    config.input = ml_collections.ConfigDict()
    config.input.name = "flexvision_bpr_patches"
    config.input.split = "train"
    config.input.data_dir = ml_collections.config_dict.placeholder(str)
    config.input.pp = ("decode|flip_lr(('image', 'mask', 'label'))|photometric_distortion|"
                       + NORMALIZE)
    config.input.batch_size = 32
    config.input.shuffle_buffer = 2000

    config.flexi = None
    config.loss = "softmax_xent"
    config.label_smoothing = 0.0
    config.mixup_alpha = 0.0

    config.lr = 0.05
    config.schedule = ml_collections.ConfigDict(
        {"warmup_steps": 0, "decay_type": "poly", "power": 0.9, "min_lr_ratio": 0.01})
    config.optax = ml_collections.ConfigDict(
        {"name": "sgd", "kwargs": {"momentum": 0.9}, "weight_decay": 5e-3,
         "grad_clip_norm": None})

    config.total_steps = 300
    config.log_every = 25
    config.checkpoint_every = 100
    config.keep_checkpoints = 2

    config.eval = ml_collections.ConfigDict()
    config.eval.pp = "decode|" + NORMALIZE
    config.eval.splits = ("test",)
    config.eval.patch_sizes = ()
    config.eval.resolutions = ()
    config.eval.batch_size = 64
    config.eval.every = 0
    config.eval.coarse_channel = 3
    # 4 px of the 32 px network input = 2 px of the 16 px patch: the width of the image-level
    # Boundary IoU of experiments/bpr_nuclei.py (at 1 px the 2x nearest-upsampled ground truth
    # favours the equally upsampled coarse mask's pixel grid)
    config.eval.boundary_width = 4

    config.mesh = (("data", -1),)
    config.sharding = sharding.default_config()
    config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
    return config
