"""Mask R-CNN heads under jit with static shapes: one compilation across batches, training,
empty ground truth, and the errors/behaviours for bad input."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexvision import detection as det
from flexvision.detection import targets as targets_lib
from flexvision.detection.roi_heads import RoIHeads
from flexvision.detection.rpn import RegionProposalNetwork

PADDED = (64, 96)
CAPACITY = 4
SIZES = ((16,), (32,), (64,))


def _features(key, batch=2, channels=8):
    keys = jax.random.split(key, 3)
    return [jax.random.normal(k, (batch, PADDED[0] >> (2 + i), PADDED[1] >> (2 + i), channels))
            for i, k in enumerate(keys)]


def _models():
    rpn = RegionProposalNetwork(anchor_sizes=SIZES, pre_nms_top_n_train=60, post_nms_top_n_train=40,
                                pre_nms_top_n_test=60, post_nms_top_n_test=40,
                                batch_size_per_image=32)
    heads = RoIHeads(num_classes=3, representation_size=16, mask_layers=(8,), mask_dim_reduced=8,
                     batch_size_per_image=16, detections_per_img=10, score_thresh=0.0)
    return rpn, heads


def _batch(image_sizes, objects):
    """Ground truth for images of ``image_sizes`` with ``objects[i]`` boxes each."""
    rng = np.random.default_rng(len(objects) + sum(objects))
    boxes, labels, masks = [], [], []
    for (h, w), n in zip(image_sizes, objects):
        x1 = rng.uniform(0, w / 2, n)
        y1 = rng.uniform(0, h / 2, n)
        bx = np.stack([x1, y1, x1 + rng.uniform(8, w / 2, n), y1 + rng.uniform(8, h / 2, n)], 1)
        boxes.append(bx.astype(np.float32))
        labels.append(rng.integers(1, 3, n))
        m = np.zeros((n, h, w), np.uint8)
        for j, (a, b, c, d) in enumerate(bx.astype(int)):
            m[j, b:d, a:c] = 1
        masks.append(m)
    padded = targets_lib.pad_targets(boxes, labels, CAPACITY, masks, PADDED)
    padded["image_sizes"] = np.array(image_sizes, np.int32)
    return padded


@jax.jit
def _init(features):
    rpn, heads = _models()
    # Initialise through the layers only (no proposal selection or postprocess to compile).
    v_rpn = rpn.init(jax.random.PRNGKey(0), features, method=lambda m, f: m.head(f))
    boxes = jnp.tile(jnp.array([[4.0, 4.0, 40.0, 30.0]]), (2, 5, 1))
    v_heads = heads.init(jax.random.PRNGKey(1), features, boxes, method=lambda m, f, b: (
        m.box_branch(f, b, PADDED), m.mask_branch(f, b, PADDED)))
    return {"rpn": v_rpn, "heads": v_heads}


def _loss_fn(rpn, heads):
    def loss(variables, features, batch, step):
        key = jax.random.fold_in(jax.random.PRNGKey(0), step)  # seeded per step
        k1, k2 = jax.random.split(key)
        gt = {k: batch[k] for k in ("boxes", "labels", "valid", "masks")}
        proposals = rpn.apply(variables["rpn"], features, batch["image_sizes"], PADDED, train=True,
                              targets=gt, rngs={"sampling": k1})
        roi = heads.apply(variables["heads"], features, proposals["boxes"], proposals["valid"],
                          batch["image_sizes"], PADDED, train=True, targets=gt,
                          rngs={"sampling": k2})
        parts = {k: v for k, v in {**proposals, **roi}.items() if k.startswith("loss")}
        return sum(parts.values()), parts
    return loss


@pytest.fixture(scope="module")
def setup():
    rpn, heads = _models()
    features = _features(jax.random.PRNGKey(0))
    variables = _init(features)
    step = jax.jit(jax.value_and_grad(_loss_fn(rpn, heads), has_aux=True))
    return rpn, heads, features, variables, step


def test_one_compilation_for_different_box_counts_and_image_sizes(setup):
    rpn, heads, features, variables, step = setup
    first = _batch([(64, 96), (50, 70)], [3, 1])
    second = _batch([(40, 90), (64, 60)], [0, 4])
    for i, batch in enumerate((first, second)):
        (total, parts), grads = step(variables, features, batch, i)
        assert np.isfinite(float(total)), parts
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    assert step._cache_size() == 1

    infer = jax.jit(lambda v, f, s: heads.apply(
        v["heads"], f, *(lambda p: (p["boxes"], p["valid"]))(rpn.apply(v["rpn"], f, s, PADDED)),
        s, PADDED))
    for batch in (first, second):
        out = infer(variables, features, batch["image_sizes"])
        assert out["boxes"].shape == (2, heads.detections_per_img, 4)
        assert out["masks"].shape == (2, heads.detections_per_img, 28, 28)
        sizes = batch["image_sizes"]
        for i in range(2):  # detections lie inside their own image
            b = np.asarray(out["boxes"][i])[np.asarray(out["valid"][i])]
            assert (b[:, 2] <= sizes[i, 1]).all() and (b[:, 3] <= sizes[i, 0]).all()
    assert infer._cache_size() == 1


def test_images_without_objects_train_as_background(setup):
    _, _, features, variables, step = setup
    empty = _batch([(64, 96), (48, 80)], [0, 0])
    (total, parts), grads = step(variables, features, empty, 0)
    parts = {k: float(v) for k, v in parts.items()}
    assert np.isfinite(float(total))
    assert parts["loss_mask"] == 0.0 and parts["loss_box_reg"] == 0.0
    assert parts["loss_rpn_box_reg"] == 0.0 and parts["loss_objectness"] > 0.0
    assert parts["loss_classifier"] > 0.0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    # Every anchor is negative.
    anchors = det.anchor_grid(PADDED, [f.shape[1:3] for f in features], SIZES, ((0.5, 1.0, 2.0),))
    from flexvision.detection.rpn import rpn_targets  # pylint: disable=import-outside-toplevel
    out = rpn_targets(jnp.asarray(anchors), empty["boxes"][0], empty["valid"][0], 0.7, 0.3)
    assert (np.asarray(out["labels"]) == 0).all()


def test_too_many_objects_names_capacity_and_config_key():
    boxes = [np.tile(np.array([[1, 1, 5, 5]], np.float32), (CAPACITY + 1, 1))]
    with pytest.raises(ValueError, match=rf"capacity is {CAPACITY}.*'max_instances'"):
        targets_lib.pad_targets(boxes, [np.ones(CAPACITY + 1, int)], CAPACITY)


@pytest.mark.parametrize("box, match", [([5, 1, 2, 6], "x2 < x1"), ([1, 1, np.nan, 4], "finite")])
def test_bad_ground_truth_boxes_are_rejected(box, match):
    with pytest.raises(ValueError, match=match):
        targets_lib.pad_targets([np.array([box], np.float32)], [np.array([1])], CAPACITY)


def test_nan_boxes_are_padding_in_nms_and_zero_in_roi_align():
    boxes = jnp.array([[0, 0, 10, 10], [np.nan, 0, 10, 10], [1, 1, 9, 9], [20, 20, 30, 30.]])
    scores = jnp.array([0.5, 0.9, 0.4, 0.3])
    idx, valid = det.nms(boxes, scores, 0.5, 4)
    assert np.asarray(idx)[np.asarray(valid)].tolist() == [0, 3]
    features = jnp.ones((1, 8, 8, 2))
    out = det.roi_align(features, boxes, jnp.zeros(4, jnp.int32), 2, 0.5, 2, False)
    assert np.isfinite(np.asarray(out)).all()
    assert not np.asarray(out[1]).any() and np.asarray(out[0]).all()


def test_inverted_boxes_follow_torchvision():
    # x2 < x1 inside the graph is not an error: roi sizes clamp to 1 (aligned=False) as in the
    # kernel, IoU is computed from the signed area as torchvision does.
    features = jnp.arange(64.0).reshape(1, 8, 8, 1)
    inverted = jnp.array([[6.0, 6.0, 2.0, 2.0]])
    out = det.roi_align(features, inverted, jnp.zeros(1, jnp.int32), 1, 1.0, 1, False)
    # both sizes clamp to 1: one sample at (y1 + 0.5, x1 + 0.5) = (6.5, 6.5): 6.5 * 8 + 6.5
    np.testing.assert_allclose(np.asarray(out).ravel(), [58.5])


def test_feature_and_box_layout_errors():
    with pytest.raises(ValueError, match="NHWC"):
        det.roi_align(jnp.zeros((8, 8, 2)), jnp.zeros((1, 4)), jnp.zeros(1, jnp.int32), 2, 1.0,
                      2, False)
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        det.roi_align(jnp.zeros((1, 8, 8, 2)), jnp.zeros((1, 5)), jnp.zeros(1, jnp.int32), 2,
                      1.0, 2, False)
    nchw = [jnp.zeros((1, 2, 16, 16)), jnp.zeros((1, 2, 8, 8))]
    with pytest.raises(ValueError, match="NHWC"):
        det.multiscale_roi_align(nchw, jnp.zeros((1, 4)), jnp.zeros(1, jnp.int32), 7, 2,
                                 (0.25, 0.125))
    with pytest.raises(ValueError, match="anchor size tuples"):
        det.anchor_grid((64, 64), [(16, 16), (8, 8)], ((32,), (64,), (128,)), ((1.0,),))
    with pytest.raises(ValueError, match="x1, y1, x2, y2"):
        det.box_iou(jnp.zeros((3, 5)), jnp.zeros((2, 4)))


def test_every_parameter_has_logical_axis_names(setup):
    _, _, _, variables, _ = setup
    leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and all(leaf.names)
