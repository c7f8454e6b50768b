"""Mask R-CNN heads under jit with static shapes: one compilation across batches, training,
empty ground truth, and the errors/behaviours for bad input."""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexvision import detection as det
from flexvision.detection import maskrcnn as mrcnn
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
    with pytest.raises(ValueError,
                       match=rf"padded capacity {CAPACITY}; raise config key 'max_instances'"):
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


# ------------------------------------------------------------------ bad input through the detector
# One tiny detector (HRNet, so that frozen BatchNorm is exercised too), one compiled program per
# BatchNorm mode: init once, then a jitted train step (losses, grads, Adam update, the sampled
# counts each head sows) fused with eval on the same batch.

DET_SIZE = (32, 48)  # padded by the detector to 32 x 64
DET_CLASSES = 3  # background + 2
DET_CAPACITY = 3
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _det_images():
    rng = np.random.default_rng(0)
    images = rng.normal(0, 0.2, (2, *DET_SIZE, 3)).astype(np.float32)
    images[0, 4:20, 6:30] += 1.5
    images[0, 18:30, 30:44] += 3.0
    return jnp.asarray(images)


def _det_targets(boxes0, labels0=None, masks0=None, boxes1=(), labels1=None):
    """Padded targets of a 2-image batch; masks default to the boxes' pixels."""
    boxes = [np.array(b, np.float32).reshape(-1, 4) for b in (boxes0, boxes1)]
    labels = [np.ones(len(b), int) if lb is None else np.array(lb)
              for b, lb in zip(boxes, (labels0, labels1))]
    masks = []
    for b in boxes:
        m = np.zeros((len(b), *DET_SIZE), np.uint8)
        for j, (x1, y1, x2, y2) in enumerate(np.clip(b, 0, None).astype(int)):
            m[j, y1:y2, x1:x2] = 1
        masks.append(m)
    if masks0 is not None:
        masks[0] = np.asarray(masks0, np.uint8)
    return targets_lib.pad_targets(boxes, labels, DET_CAPACITY, masks, DET_SIZE)


GOOD = [[6, 4, 30, 20], [30, 18, 44, 30]]


def _detector_program(freeze_bn):
    import optax  # pylint: disable=import-outside-toplevel
    model = mrcnn.create_detector("maskrcnn_hrnet_micro", num_classes=DET_CLASSES,
                                freeze_bn=freeze_bn)
    optimizer = optax.adam(1e-2)
    mutable = ["intermediates"] if freeze_bn else ["intermediates", "batch_stats"]

    def program(params, opt_state, batch_stats, images, targets, key):
        def loss_fn(p):
            out, updates = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                       train=True, targets=targets, rngs={"sampling": key},
                                       mutable=mutable)
            return out["loss"], (out, updates)

        (_, (losses, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        delta, opt_state = optimizer.update(grads, opt_state, params)
        leaves = jax.tree_util.tree_leaves(nn.meta.unbox(grads))
        finite = jnp.all(jnp.array([jnp.isfinite(g).all() for g in leaves]))
        detections = model.apply({"params": params, "batch_stats": batch_stats}, images)
        return dict(params=optax.apply_updates(params, delta), opt_state=opt_state,
                    batch_stats=updates.get("batch_stats", batch_stats), losses=losses,
                    sampled=updates["intermediates"], grads_finite=finite,
                    detections=detections)

    return model, optimizer, program


@pytest.fixture(scope="module")
def detector():
    """init once (shared by both BatchNorm modes: same variables) and the frozen program."""
    model, optimizer, program = _detector_program(None)  # the default: frozen on HRNet
    images = _det_images()
    init = jax.jit(lambda x: model.init({"params": jax.random.PRNGKey(0)}, x)).lower(
        images).compile(FAST_COMPILE)
    variables = init(images)
    opt_state = optimizer.init(variables["params"])
    batch = _det_targets(GOOD, [1, 2])
    args = (variables["params"], opt_state, variables["batch_stats"], images, batch,
            jax.random.PRNGKey(1))
    step = jax.jit(program).lower(*args).compile(FAST_COMPILE)

    def run(targets, params=None, state=None, stats=None):
        out = step(variables["params"] if params is None else params,
                   opt_state if state is None else state,
                   variables["batch_stats"] if stats is None else stats, images,
                   targets, jax.random.PRNGKey(1))
        return jax.device_get(out)

    return dict(model=model, variables=variables, opt_state=opt_state, run=run, images=images)


def _losses(out):
    return {k: float(v) for k, v in out["losses"].items()}


def test_detector_image_without_objects_next_to_one_with_objects(detector):
    out = detector["run"](_det_targets(GOOD, [1, 2], boxes1=()))
    losses = _losses(out)
    assert all(np.isfinite(v) for v in losses.values()) and out["grads_finite"], losses
    assert losses["loss_box_reg"] > 0 and losses["loss_mask"] > 0  # from image 0
    model = detector["model"]
    (rpn,) = out["sampled"]["rpn"]["sampled_per_image"]
    (roi,) = out["sampled"]["roi_heads"]["sampled_per_image"]
    # image 1: all-background sampling, a full RPN batch of negatives, no positive anywhere, so
    # it adds nothing to the box and mask losses (both sum over positives only)
    assert rpn["positive"].tolist()[1] == 0 and roi["positive"].tolist()[1] == 0
    assert rpn["negative"].tolist()[1] == model.rpn.batch_size_per_image
    assert roi["negative"].tolist()[1] > 0
    assert rpn["positive"].tolist()[0] > 0 and roi["positive"].tolist()[0] > 0
    # eval: per-image detections inside each image, the empty image's output independent of
    # the other image (frozen BatchNorm: no batch statistics)
    dets = out["detections"]
    d = model.roi_heads.detections_per_img
    assert dets["boxes"].shape == (2, d, 4) and dets["masks"].shape == (2, d, 28, 28)
    assert np.isfinite(dets["scores"]).all() and np.isfinite(dets["masks"]).all()
    boxes = dets["boxes"][dets["valid"]]
    assert (boxes[:, 2] <= DET_SIZE[1]).all() and (boxes[:, 3] <= DET_SIZE[0]).all()


def test_detector_empty_mask_trains_box_and_class_with_zero_mask_target(detector):
    masks = np.zeros((2, *DET_SIZE), np.uint8)
    masks[1, 18:30, 30:44] = 1  # only the second object has pixels
    out = detector["run"](_det_targets(GOOD, [1, 2], masks0=masks))
    losses = _losses(out)
    assert all(np.isfinite(v) for v in losses.values()) and out["grads_finite"], losses
    full = _losses(detector["run"](_det_targets(GOOD, [1, 2])))
    # same boxes, same sampling: identical RPN and box losses, a different mask loss
    for k in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"):
        assert losses[k] == full[k], k
    assert losses["loss_mask"] != full["loss_mask"]
    # the mask target of a box over an empty mask is zeros (torchvision project_masks_on_boxes)
    target = det.mask_targets(jnp.asarray(masks), jnp.asarray(GOOD, jnp.float32),
                              jnp.arange(2), 28)
    assert not np.asarray(target[0]).any() and np.asarray(target[1]).any()


def test_detector_degenerate_or_outside_boxes_are_ignored_and_partial_ones_clipped(detector):
    run = detector["run"]
    reference = _losses(run(_det_targets(GOOD, [1, 2])))
    for extra in ([12, 8, 12, 20],     # zero width, its mask not empty (the reverse case)
                  [50, 4, 60, 20],     # right of the 48-wide image (inside the padded batch)
                  [-30, -20, -4, -2]):  # above-left of the image
        targets = _det_targets(GOOD, [1, 2])
        targets["boxes"][0, 2], targets["labels"][0, 2] = extra, 1
        targets["valid"][0, 2] = True
        targets["masks"][0, 2, 8:20, 12] = 1
        assert _losses(run(targets)) == reference, extra
    partial = _det_targets([[-10, 4, 30, 40], [30, 18, 44, 30]], [1, 2])
    clipped = _det_targets([[0, 4, 30, 32], [30, 18, 44, 30]], [1, 2])
    assert _losses(run(partial)) == _losses(run(clipped))
    # host side: torchvision rejects non-positive boxes; nothing inside the image is an error
    with pytest.raises(ValueError, match=r"rows \[2\] have zero width or height"):
        _det_targets(GOOD + [[12, 8, 12, 20]], [1, 2, 1])
    with pytest.raises(ValueError, match=r"rows \[0\] have nothing inside the 32x48 image"):
        _det_targets([[50, 4, 60, 20]])


def test_zero_area_ground_truth_would_make_every_anchor_positive():
    # why prepare_targets drops such boxes: the low-quality rule restores every anchor whose IoU
    # equals the gt's best IoU, 0 here
    anchors = jnp.asarray(det.anchor_grid(PADDED, [(16, 24)], ((32,),), ((1.0,),)))
    boxes = jnp.array([[10.0, 10.0, 40.0, 40.0], [60.0, 8.0, 60.0, 30.0]])
    valid = jnp.array([True, True])
    from flexvision.detection.rpn import rpn_targets  # pylint: disable=import-outside-toplevel
    labels_of = jax.jit(lambda b, v: rpn_targets(anchors, b, v, 0.7, 0.3)["labels"])
    raw = labels_of(boxes, valid)
    prepared = targets_lib.prepare_targets({"boxes": boxes[None], "valid": valid[None]},
                                           jnp.array([PADDED]))
    assert prepared["valid"].tolist() == [[True, False]]
    kept = labels_of(prepared["boxes"][0], prepared["valid"][0])
    assert int((raw == 1).sum()) > anchors.shape[0] // 2 and 0 < int((kept == 1).sum()) < 10


def test_unknown_category_is_a_host_side_error_and_nan_under_jit(detector):
    with pytest.raises(ValueError, match=r"image 0: label\(s\) \[3\] unknown to a detector with "
                                         r"num_classes=3.*num_classes >= 4, or map or drop"):
        targets_lib.pad_targets([np.array(GOOD, np.float32)], [np.array([1, 3])], DET_CAPACITY,
                                num_classes=DET_CLASSES)
    batch = _det_targets(GOOD, [1, 2])
    batch["labels"][0, 1] = 3
    with pytest.raises(ValueError, match=r"label\(s\) \[3\].*num_classes=3"):
        targets_lib.check_targets(batch, DET_CLASSES)
    batch["labels"][0, 2] = 7  # a padding slot: not checked
    batch["labels"][0, 1] = 2
    targets_lib.check_targets(batch, DET_CLASSES)
    batch["labels"][0, 1] = 3
    losses = _losses(detector["run"](batch))
    assert np.isfinite(losses["loss_objectness"]) and np.isfinite(losses["loss_rpn_box_reg"])
    for k in ("loss_classifier", "loss_box_reg", "loss_mask", "loss"):
        assert np.isnan(losses[k]), k


def test_frozen_batchnorm_keeps_statistics_and_affine_bit_for_bit(detector):
    flat = lambda tree: flax.traverse_util.flatten_dict(nn.meta.unbox(tree))  # noqa: E731
    variables = detector["variables"]
    bn_modules = {p[:-1] for p in flat(variables["batch_stats"])}
    assert bn_modules and all(p[0] == "backbone" for p in bn_modules)
    batch = _det_targets(GOOD, [1, 2])
    params, state, stats = variables["params"], detector["opt_state"], variables["batch_stats"]
    for _ in range(2):
        out = detector["run"](batch, params, state, stats)
        params, state, stats = out["params"], out["opt_state"], out["batch_stats"]
    before, after = flat(variables["params"]), flat(params)
    bn_leaves = [p for p in before if p[:-1] in bn_modules]
    assert len(bn_leaves) == 2 * len(bn_modules)
    for p in bn_leaves:
        np.testing.assert_array_equal(after[p], before[p], err_msg=str(p))
    for p, v in flat(variables["batch_stats"]).items():
        np.testing.assert_array_equal(flat(stats)[p], v, err_msg=str(p))
    for p in (("backbone", "backbone", "conv1", "kernel"), ("roi_heads", "box_head", "fc6",
                                                           "kernel")):
        assert not np.array_equal(after[p], before[p]), p

    # freeze_bn=False: BatchNorm trains as in classification (batch statistics, mutable)
    _, _, program = _detector_program(False)
    args = (variables["params"], detector["opt_state"], variables["batch_stats"],
            detector["images"], batch, jax.random.PRNGKey(1))
    out = jax.device_get(jax.jit(program).lower(*args).compile(FAST_COMPILE)(*args))
    changed = flat(out["params"])
    used = [p for p in bn_leaves if p[:2] == ("backbone", "backbone")]  # not the unused
    assert sum(not np.array_equal(changed[p], before[p]) for p in used) > len(used) // 2
    moved = flat(out["batch_stats"])
    assert all(not np.array_equal(moved[p], v) for p, v in flat(variables["batch_stats"]).items()
               if p[:2] == ("backbone", "backbone"))
    with pytest.raises(ValueError, match="has no BatchNorm to freeze"):
        mrcnn.create_detector("maskrcnn_swin_micro", freeze_bn=True)
