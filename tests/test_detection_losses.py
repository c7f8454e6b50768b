"""Parity of flexvision.detection's targets and losses with torchvision's (losses.npz).

torchvision's random sampler draws were recorded; these tests use exactly those samples.
Thresholds, batch sizes and fractions come from the meta's reference strings.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexvision import detection as det
from flexvision.detection import losses, roi_heads, rpn, targets
from tests.helpers import assert_parity, load_fixture


def _kwarg(reference: str, name: str) -> float:
    match = re.search(rf"{name}=([0-9.]+)", reference)
    assert match, f"{name} not in {reference!r}"
    return float(match.group(1))


def _pad_gt(boxes, extra: int = 2):
    """(G, 4) -> (G + extra, 4) padded with garbage rows marked invalid."""
    g = boxes.shape[0]
    padded = np.concatenate([boxes, np.full((extra, 4), 7.0, np.float32)])
    return padded, np.arange(g + extra) < g


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("torchvision/losses.npz")


def _n_images(arrays, prefix):
    return len({k.split("/")[2] for k in arrays if k.startswith(prefix)})


def test_rpn_targets_and_losses(fixture):
    arrays, meta = fixture
    ref = meta["rpn"]["reference"]
    fg, bg = _kwarg(ref, "fg_iou_thresh"), _kwarg(ref, "bg_iou_thresh")
    anchors = arrays["rpn/anchors"]
    n_images = _n_images(arrays, "rpn/gt_boxes/")
    labels, regression = [], []
    for i in range(n_images):
        gt, valid = _pad_gt(arrays[f"rpn/gt_boxes/{i}"])
        out = jax.jit(lambda a, g, v: rpn.rpn_targets(a, g, v, fg, bg))(anchors, gt, valid)
        np.testing.assert_array_equal(out["matched_idxs"], arrays[f"rpn/matched_idxs/{i}"])
        np.testing.assert_array_equal(out["labels"], arrays[f"rpn/labels/{i}"])
        assert_parity(out["regression_targets"], arrays[f"rpn/regression_targets/{i}"],
                      f"rpn regression targets {i}")
        labels.append(np.asarray(out["labels"]))
        regression.append(np.asarray(out["regression_targets"]))
    total = n_images * anchors.shape[0]
    pos = targets.masks_from_indices(total, arrays["rpn/sampled_pos_inds"])
    neg = targets.masks_from_indices(total, arrays["rpn/sampled_neg_inds"])
    loss_obj, loss_box = losses.rpn_loss(
        arrays["rpn/objectness"], arrays["rpn/pred_bbox_deltas"],
        np.maximum(np.concatenate(labels), 0), np.concatenate(regression), pos, neg)
    assert_parity(loss_obj, arrays["rpn/loss_objectness"], "loss_objectness")
    assert_parity(loss_box, arrays["rpn/loss_rpn_box_reg"], "loss_rpn_box_reg")


def test_roi_targets_masks_and_losses(fixture):
    arrays, meta = fixture
    ref = meta["roi"]["reference"]
    fg, bg = _kwarg(ref, "fg_iou_thresh"), _kwarg(ref, "bg_iou_thresh")
    batch = int(_kwarg(ref, "batch_size_per_image"))
    fraction = _kwarg(ref, "positive_fraction")
    weights = tuple(float(w) for w in re.search(r"bbox_reg_weights=\(([^)]*)\)", ref)
                    .group(1).split(","))
    n_images = _n_images(arrays, "roi/proposals/")
    sampled_labels, sampled_targets, mask_labels, mask_gt = [], [], [], []
    for i in range(n_images):
        proposals = arrays[f"roi/proposals/{i}"]
        gt, gt_valid = _pad_gt(arrays[f"roi/gt_boxes/{i}"])
        gt_labels = np.concatenate([arrays[f"roi/gt_labels/{i}"], np.zeros(2, np.int64)])
        n, g = proposals.shape[0], arrays[f"roi/gt_boxes/{i}"].shape[0]
        assigned = roi_heads.roi_targets(proposals, np.ones(n, bool), gt, gt_labels, gt_valid,
                                         fg, bg)
        real = np.asarray(assigned["valid"])
        assert real.sum() == n + g  # the padding gt rows appended are not candidates
        assert_parity(np.asarray(assigned["boxes"])[real], arrays[f"roi/proposals_with_gt/{i}"],
                      "proposals with gt")
        np.testing.assert_array_equal(np.asarray(assigned["matched_idxs"])[real],
                                      arrays[f"roi/matched_idxs_all/{i}"])
        # Recorded draws, as indices into proposals ++ gt (real candidates come first here).
        size = n + gt.shape[0]
        pos = targets.masks_from_indices(size, arrays[f"roi/sampled_pos_inds/{i}"])
        neg = targets.masks_from_indices(size, arrays[f"roi/sampled_neg_inds/{i}"])
        samples = roi_heads.select_samples(assigned, pos, neg, gt, batch, weights)
        s = arrays[f"roi/sampled_inds/{i}"].shape[0]
        assert int(np.sum(samples["valid"])) == s
        np.testing.assert_array_equal(np.asarray(samples["index"])[:s], arrays[f"roi/sampled_inds/{i}"])
        np.testing.assert_array_equal(np.asarray(samples["labels"])[:s],
                                      arrays[f"roi/sampled_labels/{i}"])
        np.testing.assert_array_equal(np.asarray(samples["matched_idxs"])[:s],
                                      arrays[f"roi/sampled_matched_idxs/{i}"])
        assert_parity(np.asarray(samples["regression_targets"])[:s],
                      arrays[f"roi/sampled_regression_targets/{i}"], f"roi targets {i}")
        sampled_labels.append(np.asarray(samples["labels"])[:s])
        sampled_targets.append(np.asarray(samples["regression_targets"])[:s])

        positives = roi_heads.positive_subset(samples, int(batch * fraction))
        p = arrays[f"roi/mask_proposals/{i}"].shape[0]
        assert int(np.sum(positives["valid"])) == p
        assert_parity(np.asarray(positives["boxes"])[:p], arrays[f"roi/mask_proposals/{i}"],
                      "mask proposals")
        np.testing.assert_array_equal(np.asarray(positives["matched_idxs"])[:p],
                                      arrays[f"roi/mask_matched_idxs/{i}"])
        masks = arrays[f"roi/gt_masks/{i}"]
        size_m = arrays[f"roi/mask_targets/{i}"].shape[-1]
        ours = det.mask_targets(masks, arrays[f"roi/mask_proposals/{i}"],
                                arrays[f"roi/mask_matched_idxs/{i}"], size_m)
        assert_parity(ours, arrays[f"roi/mask_targets/{i}"], f"mask targets {i}")
        # The same from masks padded into a larger batch, under jit with the image size traced.
        h, w = masks.shape[1:]
        padded = np.zeros((masks.shape[0], h + 9, w + 5), masks.dtype)
        padded[:, :h, :w] = masks
        ours_padded = jax.jit(lambda m, b, i_, hw: det.mask_targets(m, b, i_, size_m, hw))(
            padded, arrays[f"roi/mask_proposals/{i}"], arrays[f"roi/mask_matched_idxs/{i}"],
            np.array([h, w]))
        assert_parity(ours_padded, arrays[f"roi/mask_targets/{i}"], f"padded mask targets {i}")
        mask_labels.append(np.asarray(positives["labels"])[:p])
        mask_gt.append(np.asarray(ours))

    labels = np.concatenate(sampled_labels)
    loss_cls, loss_box = losses.fastrcnn_loss(
        arrays["roi/class_logits"], arrays["roi/box_regression"], labels,
        np.concatenate(sampled_targets), np.ones(labels.shape[0], bool))
    assert_parity(loss_cls, arrays["roi/loss_classifier"], "loss_classifier")
    assert_parity(loss_box, arrays["roi/loss_box_reg"], "loss_box_reg")
    mask_labels = np.concatenate(mask_labels)
    loss_mask = losses.maskrcnn_loss(arrays["roi/mask_logits"].transpose(0, 2, 3, 1), mask_labels,
                                     np.concatenate(mask_gt), np.ones(mask_labels.shape[0], bool))
    assert_parity(loss_mask, arrays["roi/loss_mask"], "loss_mask")


def test_sampler_counts_and_seeding():
    labels = jnp.concatenate([jnp.ones(40), jnp.zeros(300), -jnp.ones(20)]).astype(jnp.int32)
    key = jax.random.PRNGKey(3)
    pos, neg = jax.jit(lambda k, l: targets.balanced_sample(k, l, 64, 0.25))(key, labels)
    assert int(pos.sum()) == 16 and int(neg.sum()) == 48
    assert not np.asarray(pos)[40:].any() and not np.asarray(neg)[:40].any()
    assert not np.asarray(neg)[340:].any()
    pos2, _ = targets.balanced_sample(key, labels, 64, 0.25)
    np.testing.assert_array_equal(pos, pos2)  # same key, same draw
    pos3, _ = targets.balanced_sample(jax.random.PRNGKey(4), labels, 64, 0.25)
    assert not np.array_equal(pos, pos3)
    # Few positives: all taken, negatives fill the rest.
    few = labels.at[3:40].set(0)
    pos, neg = targets.balanced_sample(key, few, 64, 0.25)
    assert int(pos.sum()) == 3 and int(neg.sum()) == 61
