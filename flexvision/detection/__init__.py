"""Dense-task parts: box ops, anchors, NMS, RoIAlign, the RPN, the RoI heads, the necks
(``necks.py``: FPN, ViTDet simple feature pyramid) and the model (``maskrcnn.py``) of Mask R-CNN.

Exact to torchvision's detection modules (``ops/`` and ``models/detection/``), with static shapes:
variable-length results are padded to a capacity and come with a boolean validity mask, so that
everything runs under ``jax.jit`` and shards over a mesh. NHWC feature maps; boxes are
(x1, y1, x2, y2) in input pixels.

BPR, the boundary patch refinement of instance masks (Tang et al. 2021), is ``bpr.py`` (patch
proposals with BPR's own mmcv NMS, reassembly, end-to-end ``refine``; host-side NumPy, since
patch counts are data-dependent) and ``bpr_data.py`` (its training data: coarse masks from
degraded ground truth, boundary patches as a TFDS dataset; imports TensorFlow, so it is not
imported here); the training recipe is configs/bpr_hrnet18s_nuclei.py through the trainer;
``boundary.py`` holds Boundary IoU (Cheng et al. 2021).
"""

from flexvision.detection.anchors import anchor_grid, anchor_strides, cell_anchors
from flexvision.detection.boxes import (batched_nms, box_area, box_iou, check_boxes, clip_boxes,
                                        decode_boxes, encode_boxes, large_enough, nms)
from flexvision.detection.masks import expanded_boxes_int, mask_targets, paste_masks
from flexvision.detection.roi_align import (FlatPyramid, adaptive_grid, flatten_pyramid,
                                            infer_scales, level_for_boxes,
                                            multiscale_roi_align, roi_align)
