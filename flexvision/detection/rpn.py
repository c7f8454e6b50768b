"""Region proposal network (Ren et al. 2015, Faster R-CNN sec. 3.1) with static shapes.

torchvision models/detection/rpn.py: RPNHead (shared 3x3 conv + ReLU, 1x1 objectness and box
deltas per level), proposal selection (filter_proposals: per-level top-n of the objectness
logits, sigmoid, clip to each image, drop small boxes, score threshold, NMS within each level,
final top-n) and the training loss (matching, balanced sampling, BCE + smooth-L1 with beta 1/9).

Batches hold images of different sizes padded to one static size: anchors come from the padded
size (static, cached), clipping uses each image's own (traced) size, and proposals are
``post_nms_top_n`` slots per image with a validity mask.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexvision.detection import anchors as anchor_lib
from flexvision.detection.boxes import (batched_nms, clip_boxes, decode_boxes, encode_boxes,
                                        finite_boxes, large_enough)
from flexvision.detection.losses import rpn_loss
from flexvision.detection.roi_align import check_pyramid
from flexvision.detection.targets import balanced_sample, match_boxes
from flexvision.detection.boxes import box_iou
from flexvision.layers import common

_HEAD_INIT = nn.initializers.normal(0.01)  # torchvision RPNHead: normal(std=0.01), bias 0


class RPNHead(nn.Module):
    """Objectness logits and box deltas per anchor, with one set of weights for every level.

    Input: a list of NHWC maps (B, h, w, C). Output: (objectness list of (B, h, w, A),
    deltas list of (B, h, w, 4A)) with delta channel ``anchor * 4 + (dx, dy, dw, dh)``.
    ``conv_depth`` 3x3 convs with bias + ReLU (torchvision's ``conv.{i}.0``).
    """

    num_anchors: int
    conv_depth: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> tuple[list, list]:
        channels = check_pyramid(features, "RPN features")
        convs = [common.conv(channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_HEAD_INIT,
                             dtype=self.dtype, name=f"conv_{i}") for i in range(self.conv_depth)]
        cls = common.conv(self.num_anchors, (1, 1), kernel_init=_HEAD_INIT, dtype=self.dtype,
                          name="cls_logits")
        box = common.conv(4 * self.num_anchors, (1, 1), kernel_init=_HEAD_INIT, dtype=self.dtype,
                          name="bbox_pred")
        objectness, deltas = [], []
        for x in features:
            for conv in convs:
                x = nn.relu(conv(x))
            objectness.append(cls(x))
            deltas.append(box(x))
        return objectness, deltas


def flatten_predictions(objectness: Sequence[jax.Array], deltas: Sequence[jax.Array]
                        ) -> tuple[jax.Array, jax.Array]:
    """Per-level head outputs -> (B, A_total) logits and (B, A_total, 4) deltas in anchor order
    (level, y, x, anchor), torchvision's concat_box_prediction_layers in NHWC."""
    b = objectness[0].shape[0]
    obj = jnp.concatenate([o.reshape(b, -1) for o in objectness], axis=1)
    dl = jnp.concatenate([d.reshape(b, -1, 4) for d in deltas], axis=1)
    return obj.astype(jnp.float32), dl.astype(jnp.float32)


def top_n_per_level(objectness: jax.Array, num_anchors_per_level: Sequence[int],
                    pre_nms_top_n: int) -> tuple[jax.Array, np.ndarray]:
    """Indices (B, sum_L min(n, A_L)) of each level's top-n logits, levels concatenated, plus the
    (static) level of each column (torchvision RegionProposalNetwork._get_top_n_idx)."""
    out, levels, offset = [], [], 0
    for level, count in enumerate(num_anchors_per_level):
        k = min(int(pre_nms_top_n), int(count))
        _, idx = jax.lax.top_k(objectness[:, offset:offset + count], k)
        out.append(idx.astype(jnp.int32) + offset)
        levels.append(np.full(k, level, np.int32))
        offset += count
    return jnp.concatenate(out, axis=1), np.concatenate(levels)


def select_proposals(objectness: jax.Array, proposals: jax.Array, image_sizes: jax.Array,
                     num_anchors_per_level: Sequence[int], pre_nms_top_n: int,
                     post_nms_top_n: int, nms_thresh: float, score_thresh: float = 0.0,
                     min_size: float = 1e-3) -> dict[str, jax.Array]:
    """torchvision filter_proposals on a padded batch, static shapes.

    objectness (B, A) logits, proposals (B, A, 4) decoded boxes, image_sizes (B, 2) (h, w) per
    image. Returns {'boxes' (B, post, 4), 'scores' (B, post) sigmoid probabilities, 'valid'
    (B, post), 'top_n_idx' (B, sum_L min(pre, A_L))}: per image, the kept proposals in
    decreasing score order, padding after them.
    """
    top_idx, levels = top_n_per_level(objectness, num_anchors_per_level, pre_nms_top_n)
    logits = jnp.take_along_axis(objectness, top_idx, axis=1)
    boxes = jnp.take_along_axis(proposals, top_idx[..., None], axis=1)
    scores = jax.nn.sigmoid(logits)
    levels = jnp.asarray(levels)

    def per_image(boxes, scores, image_hw):
        boxes = clip_boxes(boxes, image_hw)
        keep = large_enough(boxes, min_size) & (scores >= score_thresh) & finite_boxes(boxes)
        idx, valid = batched_nms(boxes, scores, levels, nms_thresh, post_nms_top_n, valid=keep)
        return (jnp.where(valid[:, None], boxes[idx], 0.0), jnp.where(valid, scores[idx], 0.0),
                valid)

    out_boxes, out_scores, valid = jax.vmap(per_image)(boxes, scores,
                                                       jnp.asarray(image_sizes, jnp.float32))
    return {"boxes": out_boxes, "scores": out_scores, "valid": valid, "top_n_idx": top_idx}


def rpn_targets(anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array,
                fg_iou_thresh: float, bg_iou_thresh: float) -> dict[str, jax.Array]:
    """Anchor targets of one image (torchvision assign_targets_to_anchors + encode).

    anchors (A, 4), gt_boxes (G, 4) padded with gt_valid (G,). Returns {'matched_idxs' (A,)
    int32 (-1 background, -2 between thresholds), 'labels' (A,) float32 (1 fg, 0 bg, -1
    ignored), 'regression_targets' (A, 4) = encode(gt[max(matched, 0)], anchor) with weights 1}.
    No valid gt: every anchor is background.
    """
    quality = box_iou(gt_boxes, anchors)
    matched = match_boxes(quality, gt_valid, fg_iou_thresh, bg_iou_thresh, True)
    labels = jnp.where(matched >= 0, 1.0, jnp.where(matched == -1, 0.0, -1.0))
    targets = encode_boxes(gt_boxes[jnp.maximum(matched, 0)], anchors, (1.0, 1.0, 1.0, 1.0))
    return {"matched_idxs": matched, "labels": labels, "regression_targets": targets}


class RegionProposalNetwork(nn.Module):
    """RPN head + anchors + proposal selection (+ loss in training) on a padded batch.

    Call ``(features, image_sizes, image_shape, train=False, targets=None)``: features a list of
    NHWC maps, one per anchor level (finest first); image_sizes (B, 2) each image's (h, w)
    inside the padded batch; image_shape the static padded (H, W). In training, ``targets`` =
    {'boxes' (B, G, 4), 'valid' (B, G)} and an rng stream 'sampling' (seed it per step) give
    the losses. Returns {'boxes', 'scores', 'valid'} proposals ((B, post_nms_top_n, ...)) and,
    in training, {'loss_objectness', 'loss_rpn_box_reg'}. Defaults are torchvision's.
    """

    anchor_sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),)
    conv_depth: int = 1
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    score_thresh: float = 0.0
    min_size: float = 1e-3
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    dtype: Any = None

    def setup(self):
        per_location = anchor_lib.num_anchors_per_location(self.anchor_sizes, self.aspect_ratios)
        if len(set(per_location)) != 1:
            raise ValueError(f"the shared RPN head needs the same number of anchors at every "
                             f"level, got {per_location}")
        self.head = RPNHead(per_location[0], self.conv_depth, dtype=self.dtype)

    def anchors(self, image_shape, features) -> np.ndarray:
        """The (A, 4) anchors of a padded batch of ``image_shape`` (static, cached)."""
        return anchor_lib.anchor_grid(image_shape, [f.shape[1:3] for f in features],
                                      self.anchor_sizes, self.aspect_ratios)

    def __call__(self, features: Sequence[jax.Array], image_sizes: jax.Array,
                 image_shape: Sequence[int], train: bool = False,
                 targets: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
        features = list(features)
        check_pyramid(features, "RPN features")
        anchors = self.anchors(tuple(image_shape), features)
        objectness, deltas = self.head(features)
        obj, dl = flatten_predictions(objectness, deltas)
        b = obj.shape[0]
        proposals = decode_boxes(dl.reshape(-1, 4), jnp.tile(jnp.asarray(anchors), (b, 1)))
        proposals = proposals.reshape(b, -1, 4)
        per_level = [f.shape[1] * f.shape[2] * self.head.num_anchors for f in features]
        pre = self.pre_nms_top_n_train if train else self.pre_nms_top_n_test
        post = self.post_nms_top_n_train if train else self.post_nms_top_n_test
        out = select_proposals(jax.lax.stop_gradient(obj), jax.lax.stop_gradient(proposals),
                               image_sizes, per_level, pre, post, self.nms_thresh,
                               self.score_thresh, self.min_size)
        out.pop("top_n_idx")
        if train:
            if targets is None:
                raise ValueError("RegionProposalNetwork(train=True) needs targets={'boxes', "
                                 "'valid'} (see targets.pad_targets)")
            out.update(self.loss(obj, dl, jnp.asarray(anchors), targets,
                                 self.make_rng("sampling")))
        return out

    def loss(self, objectness, deltas, anchors, targets, key) -> dict[str, jax.Array]:
        """RPN losses of flattened predictions (B, A), (B, A, 4) against padded targets; sows
        each image's sampled anchor counts ('intermediates' / 'sampled_per_image': 'positive',
        'negative'). An image without valid gt samples only negatives."""
        assigned = jax.vmap(lambda g, v: rpn_targets(anchors, g, v, self.fg_iou_thresh,
                                                     self.bg_iou_thresh))(
            targets["boxes"], targets["valid"])
        keys = jax.random.split(key, objectness.shape[0])
        pos, neg = jax.vmap(lambda k, lab: balanced_sample(
            k, lab, self.batch_size_per_image, self.positive_fraction))(keys, assigned["labels"])
        self.sow("intermediates", "sampled_per_image", {"positive": jnp.sum(pos, axis=1),
                                                        "negative": jnp.sum(neg, axis=1)})
        loss_obj, loss_box = rpn_loss(objectness, deltas, jnp.maximum(assigned["labels"], 0.0),
                                      assigned["regression_targets"], pos, neg)
        return {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_box}
