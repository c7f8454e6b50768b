"""RoI heads of Mask R-CNN (He et al. 2017) with static shapes: box head, predictor, mask head,
mask predictor, postprocess and training losses.

torchvision models/detection/roi_heads.py (RoIHeads), faster_rcnn.py (TwoMLPHead,
FastRCNNPredictor) and mask_rcnn.py (MaskRCNNHeads, MaskRCNNPredictor). Proposals are
(B, N, 4) per padded batch with a validity mask; detections are ``detections_per_img`` slots per
image with a validity mask. Pooled features are NHWC and flattened (PH, PW, C): the importer
permutes torchvision's fc6 (which flattens (C, PH, PW)) once.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexvision.detection.boxes import (batched_nms, box_iou, clip_boxes, decode_boxes,
                                        encode_boxes, finite_boxes, large_enough)
from flexvision.detection.losses import fastrcnn_loss, maskrcnn_loss
from flexvision.detection.masks import mask_targets
from flexvision.detection.roi_align import (FlatPyramid, check_pyramid, flatten_pyramid,
                                            infer_scales, multiscale_roi_align)
from flexvision.detection.targets import balanced_sample, match_boxes, sampled_indices
from flexvision.layers import common


def _kaiming_relu():
    """torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu') for mask convs."""
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class TwoMLPHead(nn.Module):
    """fc6 -> ReLU -> fc7 -> ReLU on pooled (K, PH, PW, C) features -> (K, representation)."""

    representation_size: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(common.dense(self.representation_size, axes=("embed", "mlp"),
                                 dtype=self.dtype, name="fc6")(x))
        return nn.relu(common.dense(self.representation_size, axes=("mlp", "embed"),
                                    dtype=self.dtype, name="fc7")(x))


class FastRCNNPredictor(nn.Module):
    """Class logits (K, num_classes) and per-class box deltas (K, 4 * num_classes)."""

    num_classes: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        scores = common.dense(self.num_classes, axes=("embed", "classes"), dtype=self.dtype,
                              kernel_init=nn.initializers.normal(0.01), name="cls_score")(x)
        deltas = common.dense(4 * self.num_classes, axes=("embed", "classes"), dtype=self.dtype,
                              kernel_init=nn.initializers.normal(0.001), name="bbox_pred")(x)
        return scores, deltas


class MaskRCNNHeads(nn.Module):
    """3x3 convs (+bias, ReLU, ``dilation``) of widths ``layers`` on (K, 14, 14, C)."""

    layers: Sequence[int] = (256, 256, 256, 256)
    dilation: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.dilation
        for i, width in enumerate(self.layers):
            x = nn.relu(nn.Conv(width, (3, 3), padding=((d, d), (d, d)), kernel_dilation=(d, d),
                                dtype=self.dtype, name=f"conv_{i}",
                                kernel_init=common.param_init(_kaiming_relu(), common.CONV_AXES),
                                bias_init=common.param_init(nn.initializers.zeros,
                                                            ("conv_out",)))(x))
        return x


class MaskRCNNPredictor(nn.Module):
    """2x2 stride-2 transposed conv + ReLU, then a 1x1 conv to per-class mask logits.

    (K, h, w, C) -> (K, 2h, 2w, num_classes). The transposed conv is
    :func:`flexvision.layers.common.conv_transpose_2x2`; its kernel is (2, 2, in, out)
    (torchvision's ConvTranspose2d weight (in, out, 2, 2) permuted).
    """

    num_classes: int
    dim_reduced: int = 256
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", common.param_init(_kaiming_relu(), common.CONV_AXES),
                            (2, 2, x.shape[-1], self.dim_reduced), jnp.float32)
        bias = self.param("bias", common.param_init(nn.initializers.zeros, ("conv_out",)),
                          (self.dim_reduced,), jnp.float32)
        up = nn.relu(common.conv_transpose_2x2(x, kernel, bias, self.dtype))
        return common.conv(self.num_classes, (1, 1), dtype=self.dtype, name="mask_fcn_logits",
                           kernel_init=_kaiming_relu())(up)


def postprocess_detections(class_logits: jax.Array, box_regression: jax.Array,
                           proposals: jax.Array, proposal_valid: jax.Array, image_hw: jax.Array,
                           score_thresh: float, nms_thresh: float, detections_per_img: int,
                           bbox_reg_weights: Sequence[float], min_size: float = 1e-2
                           ) -> dict[str, jax.Array]:
    """Detections of ONE image (vmap for a batch): torchvision RoIHeads.postprocess_detections.

    class_logits (N, K), box_regression (N, 4K), proposals (N, 4) with proposal_valid (N,),
    image_hw (2,). Boxes decoded per class and clipped to the image; background dropped;
    candidates (proposal-major, class-minor) kept when score > score_thresh (strict), both sides
    >= min_size; NMS within each class; the first ``detections_per_img`` by score. Returns
    {'boxes' (D, 4), 'scores' (D,), 'labels' (D,) int32 in 1..K-1, 'valid' (D,)}.
    Cost: one sort of N*(K-1) candidates and D steps of O(N*(K-1)) NMS work.
    """
    n, k = class_logits.shape
    boxes = decode_boxes(box_regression, proposals, bbox_reg_weights)  # (N, K, 4)
    scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    boxes = clip_boxes(boxes, image_hw)[:, 1:].reshape(-1, 4)
    scores = scores[:, 1:].reshape(-1)
    labels = jnp.tile(jnp.arange(1, k, dtype=jnp.int32), n)
    keep = (jnp.repeat(proposal_valid, k - 1) & (scores > score_thresh)
            & large_enough(boxes, min_size) & finite_boxes(boxes))
    idx, valid = batched_nms(boxes, scores, labels, nms_thresh, detections_per_img, valid=keep)
    return {"boxes": jnp.where(valid[:, None], boxes[idx], 0.0),
            "scores": jnp.where(valid, scores[idx], 0.0),
            "labels": jnp.where(valid, labels[idx], 0), "valid": valid}


def roi_targets(proposals: jax.Array, proposal_valid: jax.Array, gt_boxes: jax.Array,
                gt_labels: jax.Array, gt_valid: jax.Array, fg_iou_thresh: float,
                bg_iou_thresh: float) -> dict[str, jax.Array]:
    """Matching of ONE image's proposals (N, 4) + its ground truth (G, 4) appended (torchvision
    add_gt_proposals + assign_targets_to_proposals). Returns, over the N + G candidates:
    {'boxes', 'valid', 'matched_idxs' (-1 background, -2 between), 'labels' (0 background,
    -1 ignored)}."""
    boxes = jnp.concatenate([proposals, gt_boxes], axis=0)
    valid = jnp.concatenate([proposal_valid, gt_valid], axis=0) & finite_boxes(boxes)
    boxes = jnp.where(valid[:, None], boxes, 0.0)
    quality = jnp.where(valid[None, :], box_iou(gt_boxes, boxes), -1.0)
    matched = match_boxes(quality, gt_valid, fg_iou_thresh, bg_iou_thresh, False)
    labels = gt_labels[jnp.maximum(matched, 0)].astype(jnp.int32)
    labels = jnp.where(matched == -1, 0, jnp.where(matched == -2, -1, labels))
    labels = jnp.where(valid, labels, -1)
    return {"boxes": boxes, "valid": valid, "matched_idxs": matched, "labels": labels}


def select_samples(assigned: dict[str, jax.Array], pos: jax.Array, neg: jax.Array,
                   gt_boxes: jax.Array, batch_size_per_image: int,
                   bbox_reg_weights: Sequence[float]) -> dict[str, jax.Array]:
    """The sampled candidates of one image in ascending index order (torch.where(pos | neg)),
    padded to ``batch_size_per_image``: {'index', 'valid', 'boxes', 'labels', 'matched_idxs'
    (clamped >= 0), 'regression_targets'}."""
    idx, valid = sampled_indices(pos, neg, batch_size_per_image)
    boxes = assigned["boxes"][idx]
    matched = jnp.maximum(assigned["matched_idxs"][idx], 0)
    labels = jnp.where(valid, assigned["labels"][idx], 0)
    targets = encode_boxes(gt_boxes[matched], boxes, bbox_reg_weights)
    return {"index": idx, "valid": valid, "boxes": boxes, "labels": labels,
            "matched_idxs": matched, "regression_targets": targets}


def positive_subset(samples: dict[str, jax.Array], capacity: int) -> dict[str, jax.Array]:
    """The positive samples (labels > 0) in sample order, padded to ``capacity`` (the most the
    sampler can draw: int(batch_size_per_image * positive_fraction))."""
    positive = samples["valid"] & (samples["labels"] > 0)
    idx = jnp.nonzero(positive, size=capacity, fill_value=0)[0]
    valid = jnp.arange(capacity) < jnp.sum(positive)
    return {"sample_index": idx, "valid": valid, "boxes": samples["boxes"][idx],
            "labels": jnp.where(valid, samples["labels"][idx], 0),
            "matched_idxs": samples["matched_idxs"][idx]}


class RoIHeads(nn.Module):
    """Box and mask branches of Mask R-CNN on NHWC pyramid maps (defaults: torchvision's).

    Call ``(features, proposals, proposal_valid, image_sizes, image_shape, train=False,
    targets=None)``: features the pooled levels (finest first, e.g. FPN '0'..'3'), proposals
    (B, N, 4) with proposal_valid (B, N), image_sizes (B, 2) each image's (h, w), image_shape
    the static padded (H, W) (sets the pooler scales, :func:`infer_scales`).
    Eval returns {'boxes' (B, D, 4), 'scores', 'labels', 'valid', 'masks' (B, D, M, M)
    probabilities of each detection's class} (D = detections_per_img). Training (rng stream
    'sampling'; targets {'boxes', 'labels', 'valid', 'masks' (B, G, H, W)}) returns
    {'loss_classifier', 'loss_box_reg', 'loss_mask'}, and sows each image's sampled positive and
    negative counts ('intermediates' / 'sampled_per_image', with ``mutable=['intermediates']``).
    An image without valid gt samples only negatives (box and mask losses get nothing from it);
    a gt with an empty mask trains towards an all-zero mask (torchvision); a valid label outside
    1..num_classes-1 makes the three losses NaN.
    """

    num_classes: int
    representation_size: int = 1024
    box_output_size: int = 7
    box_sampling_ratio: int = 2
    mask_output_size: int = 14
    mask_sampling_ratio: int = 2
    mask_layers: Sequence[int] = (256, 256, 256, 256)
    mask_dilation: int = 1
    mask_dim_reduced: int = 256
    with_masks: bool = True
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    dtype: Any = None

    def setup(self):
        self.box_head = TwoMLPHead(self.representation_size, dtype=self.dtype)
        self.box_predictor = FastRCNNPredictor(self.num_classes, dtype=self.dtype)
        if self.with_masks:
            self.mask_head = MaskRCNNHeads(tuple(self.mask_layers), self.mask_dilation,
                                           dtype=self.dtype)
            self.mask_predictor = MaskRCNNPredictor(self.num_classes, self.mask_dim_reduced,
                                                    dtype=self.dtype)

    def _pool(self, features, boxes, image_shape, output_size, sampling_ratio):
        """(B, N, 4) boxes -> (B * N, S, S, C) pooled from their FPN levels.

        ``features``: the NHWC levels or their flatten_pyramid (built once per forward)."""
        if not isinstance(features, FlatPyramid):
            features = flatten_pyramid(features)
        scales = infer_scales(features.sizes, tuple(int(s) for s in image_shape))
        b, n = boxes.shape[:2]
        index = jnp.repeat(jnp.arange(b, dtype=jnp.int32), n)
        pooled, _ = multiscale_roi_align(features, boxes.reshape(-1, 4), index, output_size,
                                         sampling_ratio, scales)
        return pooled.astype(self.dtype or jnp.float32)

    def box_branch(self, features, proposals, image_shape):
        """Class logits (B, N, K) and box regression (B, N, 4K) of proposals (B, N, 4)."""
        b, n = proposals.shape[:2]
        pooled = self._pool(features, proposals, image_shape, self.box_output_size,
                            self.box_sampling_ratio)
        logits, deltas = self.box_predictor(self.box_head(pooled))
        return (logits.reshape(b, n, -1).astype(jnp.float32),
                deltas.reshape(b, n, -1).astype(jnp.float32))

    def mask_branch(self, features, boxes, image_shape):
        """Mask logits (B, D, M, M, K) NHWC of boxes (B, D, 4)."""
        b, d = boxes.shape[:2]
        pooled = self._pool(features, boxes, image_shape, self.mask_output_size,
                            self.mask_sampling_ratio)
        logits = self.mask_predictor(self.mask_head(pooled)).astype(jnp.float32)
        return logits.reshape(b, d, *logits.shape[1:])

    def __call__(self, features: Sequence[jax.Array], proposals: jax.Array,
                 proposal_valid: jax.Array, image_sizes: jax.Array, image_shape: Sequence[int],
                 train: bool = False, targets: dict[str, jax.Array] | None = None
                 ) -> dict[str, jax.Array]:
        features = list(features)
        check_pyramid(features, "RoI head features")
        if proposals.ndim != 3 or proposals.shape[-1] != 4:
            raise ValueError(f"proposals must be (B, N, 4) padded per image, got shape "
                             f"{tuple(proposals.shape)}")
        if proposals.shape[0] != features[0].shape[0]:
            raise ValueError(f"proposals hold {proposals.shape[0]} images, features "
                             f"{features[0].shape[0]}")
        features = flatten_pyramid(features)
        if train:
            return self.losses(features, proposals, proposal_valid, image_sizes, image_shape,
                               targets)
        logits, deltas = self.box_branch(features, proposals, image_shape)
        post = jax.vmap(lambda c, r, p, v, hw: postprocess_detections(
            c, r, p, v, hw, self.score_thresh, self.nms_thresh, self.detections_per_img,
            self.bbox_reg_weights))(logits, deltas, proposals, proposal_valid,
                                    jnp.asarray(image_sizes, jnp.float32))
        if self.with_masks:
            mask_logits = self.mask_branch(features, post["boxes"], image_shape)
            own = jnp.take_along_axis(mask_logits, post["labels"][:, :, None, None, None],
                                      axis=-1)[..., 0]
            post["masks"] = jnp.where(post["valid"][:, :, None, None], jax.nn.sigmoid(own), 0.0)
        return post

    def losses(self, features, proposals, proposal_valid, image_sizes, image_shape, targets):
        """Training: match, sample (rng 'sampling'), heads on the samples, the three losses."""
        if targets is None:
            raise ValueError("RoIHeads(train=True) needs targets={'boxes', 'labels', 'valid'"
                             "[, 'masks']} (see targets.pad_targets)")
        b = proposals.shape[0]
        assigned = jax.vmap(lambda p, v, g, l, gv: roi_targets(
            p, v, g, l, gv, self.fg_iou_thresh, self.bg_iou_thresh))(
            proposals, proposal_valid, targets["boxes"], targets["labels"], targets["valid"])
        keys = jax.random.split(self.make_rng("sampling"), b)
        pos, neg = jax.vmap(lambda k, lab, v: balanced_sample(
            k, lab, self.batch_size_per_image, self.positive_fraction, v))(
            keys, assigned["labels"], assigned["valid"])
        samples = jax.vmap(lambda a, p, n, g: select_samples(
            a, p, n, g, self.batch_size_per_image, self.bbox_reg_weights))(
            assigned, pos, neg, targets["boxes"])
        logits, deltas = self.box_branch(features, jax.lax.stop_gradient(samples["boxes"]),
                                         image_shape)
        self.sow("intermediates", "sampled_per_image",
                 {"positive": jnp.sum(samples["valid"] & (samples["labels"] > 0), axis=1),
                  "negative": jnp.sum(samples["valid"] & (samples["labels"] == 0), axis=1)})
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        loss_cls, loss_box = fastrcnn_loss(flat(logits), flat(deltas), flat(samples["labels"]),
                                           flat(samples["regression_targets"]),
                                           flat(samples["valid"]))
        out = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        if self.with_masks:
            if "masks" not in targets:
                raise ValueError("the mask branch trains on targets['masks'] (B, G, H, W)")
            capacity = int(self.batch_size_per_image * self.positive_fraction)
            positives = jax.vmap(lambda s: positive_subset(s, capacity))(samples)
            mask_logits = self.mask_branch(features, jax.lax.stop_gradient(positives["boxes"]),
                                           image_shape)
            size = mask_logits.shape[2]
            gt = jax.vmap(lambda m, bx, i, hw: mask_targets(m, bx, i, size, hw))(
                targets["masks"], positives["boxes"], positives["matched_idxs"],
                jnp.asarray(image_sizes, jnp.int32))
            out["loss_mask"] = maskrcnn_loss(flat(mask_logits), flat(positives["labels"]),
                                             flat(gt), flat(positives["valid"]))
        # No error can be raised under jit: a valid gt label outside 1..K-1 (a category the
        # detector does not know; targets.check_labels catches it on the host) makes the losses
        # NaN, explicitly rather than through out-of-range gathers.
        labels = targets["labels"]
        unknown = jnp.any(targets["valid"] & ((labels < 1) | (labels >= self.num_classes)))
        return {k: jnp.where(unknown, jnp.nan, v) for k, v in out.items()}

