"""Mask R-CNN on every backbone family (tiny width): one compiled program per family runs init,
10 jitted train steps (value_and_grad + optax adam) on a tiny synthetic batch of a size not
divisible by 32, and eval on the trained weights; backbone weights from an importer."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexvision import convert, registry
from flexvision.detection import maskrcnn as mrcnn
from flexvision.detection import targets as targets_lib
from helpers import load_fixture, state_dict_of

SIZE = (56, 88)  # padded by the model to 64 x 96
STEPS = 10
NUM_CLASSES = 3  # background + 2
FAST_COMPILE = {"xla_backend_optimization_level": 0}
TINY = mrcnn.list_detectors(tiny=True)


def _batch():
    """Two images: bright rectangles (class 1) and disks (class 2) on noise; ground truth padded
    to 3 objects (the second image has one)."""
    h, w = SIZE
    rng = np.random.default_rng(0)
    images = rng.normal(0, 0.2, (2, h, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[:h, :w]
    boxes, labels, masks = [], [], []
    for i, objects in enumerate(([(1, 4, 6, 30, 40), (2, 44, 8, 80, 44)], [(2, 20, 10, 56, 46)])):
        bx, lb, ms = [], [], []
        for label, x1, y1, x2, y2 in objects:
            if label == 1:
                m = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
            else:
                m = (xx - (x1 + x2) / 2) ** 2 + (yy - (y1 + y2) / 2) ** 2 <= ((x2 - x1) / 2) ** 2
            images[i][m] += 1.5 * label
            ys, xs = np.nonzero(m)
            bx.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            lb.append(label)
            ms.append(m.astype(np.uint8))
        boxes.append(np.array(bx, np.float32))
        labels.append(np.array(lb))
        masks.append(np.stack(ms))
    targets = targets_lib.pad_targets(boxes, labels, 3, masks, SIZE)
    return jnp.asarray(images), {k: jnp.asarray(v) for k, v in targets.items()}


@functools.lru_cache(maxsize=None)
def _run(name: str) -> dict:
    model = mrcnn.create_detector(name, num_classes=NUM_CLASSES)
    images, targets = _batch()
    optimizer = optax.adam(1e-3)

    def program(images, targets, key):
        variables = model.init({"params": jax.random.PRNGKey(0)}, images)
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}  # HRNet's batch stats

        def train_step(carry, step):
            params, opt_state, state = carry
            # The same sampling draw every step, so that losses are comparable across steps.
            def loss_fn(params):
                out, updates = model.apply({"params": params, **state}, images, train=True,
                                           targets=targets, rngs={"sampling": key,
                                                                  "dropout": key},
                                           mutable=list(state))
                return out["loss"], (out, updates)

            (_, (losses, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            finite = jnp.all(jnp.array([jnp.isfinite(g).all() for g in
                                        jax.tree_util.tree_leaves(nn.meta.unbox(grads))]))
            size = sum(jnp.abs(g).sum() for g in jax.tree_util.tree_leaves(nn.meta.unbox(grads)))
            delta, opt_state = optimizer.update(grads, opt_state, params)
            return ((optax.apply_updates(params, delta), opt_state, {**state, **updates}),
                    dict(losses, grads_finite=finite, grads_size=size))

        carry, history = jax.lax.scan(train_step, (params, optimizer.init(params), state),
                                      jnp.arange(STEPS))
        detections = model.apply({"params": carry[0], **carry[2]}, images)
        return history, detections, jax.tree_util.tree_map(jnp.shape, nn.meta.unbox(params))

    args = (images, targets, jax.random.PRNGKey(1))
    compiled = jax.jit(program).lower(*args).compile(compiler_options=FAST_COMPILE)
    history, detections, _ = compiled(*args)
    return dict(model=model, history=jax.device_get(history), detections=detections)


def test_every_backbone_family_has_a_tiny_detector():
    families = {mrcnn.detector_entry(n).family for n in TINY}
    assert families == set(registry.families())
    full = mrcnn.list_detectors(tiny=False)
    for name in ("maskrcnn_flexivit_small", "maskrcnn_vit_small", "maskrcnn_swin_tiny",
                 "maskrcnn_mvitv2_tiny", "maskrcnn_hrnet_w18_small", "maskrcnn_cyclemlp_b1",
                 "maskrcnn_asmlp_tiny"):
        assert name in full
    assert not any(n.startswith("maskrcnn") for n in registry.list_models())  # not backbones


@pytest.mark.parametrize("name", TINY)
def test_jitted_train_steps_are_finite_and_lower_the_loss(name):
    history = _run(name)["history"]
    for key in (*mrcnn.LOSS_KEYS, "loss"):
        assert np.isfinite(history[key]).all(), (key, history[key])
    np.testing.assert_allclose(history["loss"], sum(history[k] for k in mrcnn.LOSS_KEYS),
                               rtol=1e-5)
    assert history["grads_finite"].all() and (history["grads_size"] > 0).all()
    # Each step's proposals (hence its positives and the box-loss normaliser) move with the
    # weights, so single steps are noisy; the last steps' mean is below the starting loss.
    assert history["loss"][-4:].mean() < history["loss"][0], history["loss"]


@pytest.mark.parametrize("name", TINY)
def test_eval_returns_padded_detections_inside_the_images(name):
    run = _run(name)
    out = jax.device_get(run["detections"])
    d = run["model"].roi_heads.detections_per_img
    assert out["boxes"].shape == (2, d, 4) and out["masks"].shape == (2, d, 28, 28)
    assert out["valid"].dtype == bool and out["labels"].shape == (2, d)
    boxes = out["boxes"][out["valid"]]
    assert (boxes[:, 2] <= SIZE[1] + 1e-4).all() and (boxes[:, 3] <= SIZE[0] + 1e-4).all()
    assert (out["labels"][out["valid"]] >= 1).all()
    assert ((out["masks"] >= 0) & (out["masks"] <= 1)).all()


def test_backbone_weights_load_from_an_importer():
    arrays, meta = load_fixture("official/asmlp_reduced.npz")
    imported, imported_vars = convert.from_official("asmlp", state_dict_of(arrays),
                                                    **meta["kwargs"])
    model = mrcnn.build_maskrcnn(imported, num_classes=2, **{
        k: v for k, v in mrcnn.detector_entry("maskrcnn_asmlp_micro").defaults.items()})
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 40, 72, 3)), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)
    loaded = mrcnn.load_backbone(variables, imported_vars)
    # every backbone leaf is the imported one; the neck and heads are untouched
    flat_loaded = dict(jax.tree_util.tree_flatten_with_path(
        nn.meta.unbox(loaded["params"]["backbone"]))[0])
    flat_imported = dict(jax.tree_util.tree_flatten_with_path(
        nn.meta.unbox(imported_vars["params"]))[0])
    assert flat_loaded and set(flat_loaded) <= set(flat_imported)
    for path, value in flat_loaded.items():
        np.testing.assert_array_equal(value, flat_imported[path])
    assert loaded["params"]["neck"] is variables["params"]["neck"]
    backbone = model.backbone
    ours = backbone.apply({"params": loaded["params"]["backbone"]}, images, method="features")
    ref = imported.apply(imported_vars, images, method="features")
    np.testing.assert_array_equal(ours["stage4"], ref["stage4"])

    wrong = registry.create_model("asmlp_micro", num_classes=0)
    wrong_vars = jax.eval_shape(lambda x: wrong.init(jax.random.PRNGKey(0), x), images)
    wrong_vars = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                        nn.meta.unbox(wrong_vars))
    with pytest.raises(ValueError, match=r"params/backbone.*(lacks|imported shape)"):
        mrcnn.load_backbone(variables, wrong_vars)


def test_train_without_targets_and_unknown_names_raise():
    model = mrcnn.create_detector("maskrcnn_swin_micro", num_classes=2)
    images = jax.ShapeDtypeStruct((1, *SIZE, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"train=True\) needs targets"):
        jax.eval_shape(lambda x: model.init({"params": jax.random.PRNGKey(0),
                                             "sampling": jax.random.PRNGKey(0)}, x, train=True),
                       images)
    with pytest.raises(ValueError, match=r"unknown detector 'maskrcnn_resnet50'"):
        mrcnn.create_detector("maskrcnn_resnet50")
