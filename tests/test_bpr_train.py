"""BPR training recipe: coarse-mask degradation, training patches, augmentation, loss, optimizer,
and a short training run of the refiner through the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flexvision
from flexvision.detection import boundary, bpr, bpr_train
from flexvision.models.hrnet import StageSpec


def _disc(height=64, width=80):
    yy, xx = np.mgrid[:height, :width]
    return ((yy - 30) / 18.0) ** 2 + ((xx - 40) / 25.0) ** 2 <= 1


def test_window_count_dilates_and_erodes_by_hand():
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True
    np.testing.assert_array_equal(boundary.window_count(mask, 1) > 0,
                                  np.pad(np.ones((3, 3), bool), 1))
    square = np.pad(np.ones((3, 3), bool), 1)
    eroded = boundary.window_count(square, 1) == 9
    np.testing.assert_array_equal(eroded, mask)


def test_degrade_mask_block_threshold_by_hand():
    """factor 2, no offset, no morphology: each 2x2 block becomes foreground iff > 2 pixels are."""
    mask = np.array([[1, 1, 0, 0],
                     [1, 0, 1, 0],
                     [0, 0, 1, 1],
                     [0, 0, 1, 1]], bool)

    class FixedDraws:  # integers() draws: factor, then the grid offsets, then the radius
        def __init__(self):
            self.draws = iter([2, np.array([0, 0]), 0])

        def integers(self, *args, **kwargs):
            return next(self.draws)

    coarse = bpr_train.degrade_mask(mask, FixedDraws(), factors=(2, 2), max_radius=0)
    np.testing.assert_array_equal(coarse, [[1, 1, 0, 0], [1, 1, 0, 0],
                                           [0, 0, 1, 1], [0, 0, 1, 1]])


def test_degrade_mask_is_coarse_but_close_and_seeded():
    gt = _disc()
    coarse = bpr_train.degrade_mask(gt, np.random.default_rng(0))
    again = bpr_train.degrade_mask(gt, np.random.default_rng(0))
    np.testing.assert_array_equal(coarse, again)
    iou = np.count_nonzero(gt & coarse) / np.count_nonzero(gt | coarse)
    assert 0.6 < iou < 1.0
    assert boundary.boundary_iou(gt, coarse, width=1) < 0.9
    with pytest.raises(ValueError, match="factors"):
        bpr_train.degrade_mask(gt, np.random.default_rng(0), factors=(4, 2))


def test_training_patches_pair_coarse_boxes_with_ground_truth():
    gt = _disc()[None].astype(np.uint8)
    coarse = bpr_train.degrade_mask(gt[0], np.random.default_rng(1))[None]
    image = np.random.default_rng(2).integers(0, 255, gt.shape[1:] + (3,), dtype=np.uint8)
    images, coarse_patches, gt_patches = bpr_train.training_patches(image, gt, coarse, 16, 0.25)
    boxes = bpr.boundary_patch_boxes(coarse[0], 16, 0.25).boxes
    assert len(images) == len(boxes) > 0
    for k, (x1, y1, x2, y2) in enumerate(boxes[:, :4].astype(int)):
        np.testing.assert_array_equal(images[k], image[y1:y2, x1:x2])
        np.testing.assert_array_equal(coarse_patches[k], coarse[0, y1:y2, x1:x2])
        np.testing.assert_array_equal(gt_patches[k], gt[0, y1:y2, x1:x2])


def test_hsv_by_hand():
    rgb = jnp.asarray([[255.0, 0, 0], [0, 255, 0], [10, 20, 30], [50, 50, 50]])
    hsv = bpr_train.rgb_to_hsv(rgb)
    np.testing.assert_allclose(hsv[:2], [[0, 1, 255], [120, 1, 255]], atol=1e-5)
    np.testing.assert_allclose(hsv[2], [210, 20 / 30, 30], rtol=1e-6)
    np.testing.assert_allclose(hsv[3], [0, 0, 50], atol=1e-6)
    np.testing.assert_allclose(bpr_train.hsv_to_rgb(hsv), rgb, atol=1e-4)
    red = jnp.asarray([[[[255.0, 0, 0]]]])
    np.testing.assert_allclose(bpr_train.shift_hue(red, jnp.full((1, 1, 1), 120.0)),
                               [[[[0, 255, 0]]]], atol=1e-4)
    np.testing.assert_allclose(bpr_train.adjust_saturation(red, jnp.zeros((1, 1, 1))),
                               [[[[255, 255, 255]]]], atol=1e-4)
    np.testing.assert_allclose(bpr_train.adjust_saturation(red, jnp.full((1, 1, 1), 0.5)),
                               [[[[255, 127.5, 127.5]]]], atol=1e-4)


def test_photometric_distortion_ranges_and_variety():
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (64, 4, 4, 3)), jnp.float32)
    out = bpr_train.photometric_distortion(jax.random.PRNGKey(0), images)
    assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 255
    changed = np.any(np.abs(np.asarray(out - images)) > 1e-3, axis=(1, 2, 3))
    assert 0.8 < changed.mean() < 1.0  # all four steps skipped with probability 1/16
    same = bpr_train.photometric_distortion(jax.random.PRNGKey(0), images)
    np.testing.assert_array_equal(out, same)


def test_refiner_batch_flips_image_and_masks_together():
    rng = np.random.default_rng(0)
    gt = (rng.random((32, 8, 8)) < 0.5).astype(np.uint8)
    images = np.repeat(gt[..., None] * 255.0, 3, axis=-1)
    batch = bpr_train.refiner_batch(jax.random.PRNGKey(3), images, gt, gt, 16, augment=False)
    assert batch["image"].shape == (32, 16, 16, 4) and batch["labels"].shape == (32, 16, 16, 2)
    key = jax.random.PRNGKey(4)
    flip_key, _ = jax.random.split(key)
    flipped = bpr_train.refiner_batch(key, images, gt, gt, 16)
    labels = np.asarray(flipped["labels"][..., 1])
    np.testing.assert_array_equal(np.asarray(flipped["image"][..., 3]) > 0, labels > 0)
    expected = np.asarray(bpr_train.random_flip(flip_key, batch["labels"])[0])
    np.testing.assert_array_equal(flipped["labels"], expected)
    assert np.any(expected != np.asarray(batch["labels"]))  # some were flipped


def test_poly_schedule_and_sgd_match_torch_semantics():
    schedule = bpr_train.poly_schedule(0.01, 100)
    for step in (0, 10, 50, 99, 100):
        expected = (0.01 - 1e-4) * (1 - step / 100) ** 0.9 + 1e-4
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
    # two steps of torch SGD(lr_i, momentum 0.9, weight_decay 5e-4) by hand
    tx = bpr_train.bpr_sgd(100)
    params = {"w": jnp.asarray([1.0, -2.0])}
    grads = {"w": jnp.asarray([0.5, 0.25])}
    state = tx.init(params)
    p, buf = np.array([1.0, -2.0]), np.zeros(2)
    for step in range(2):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        buf = 0.9 * buf + (np.array([0.5, 0.25]) + 5e-4 * p)
        p = p - float(schedule(step)) * buf
        np.testing.assert_allclose(params["w"], p, rtol=1e-6)


@pytest.mark.slow
def test_refiner_learns_boundary_patches():
    """A tiny bpr_hrnet18s trained for a few dozen SGD steps on patches of degraded discs through
    the engine's train step: the training loss falls."""
    from flexvision.engine.step import make_train_step  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    images, coarse, gt = [], [], []
    for _ in range(6):
        cy, cx, a, b = rng.uniform(24, 40), rng.uniform(24, 40), *rng.uniform(10, 18, 2)
        mask = (((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 <= 1)
        image = np.where(mask[..., None], [200.0, 60, 60], [40.0, 90, 160])
        image = image + rng.normal(0, 10, image.shape)
        patches = bpr_train.training_patches(image, mask[None], bpr_train.degrade_mask(
            mask, rng)[None], 16, 0.25)
        for part, store in zip(patches, (images, coarse, gt)):
            store.append(part)
    images, coarse, gt = (np.concatenate(x)[:32] for x in (images, coarse, gt))
    model = flexvision.create_model(
        "bpr_hrnet18s", stages=(StageSpec(1, "bottleneck", (1,), (4,)),
                                StageSpec(1, "basic", (1, 1), (4, 8))))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4)))
    steps = 40
    tx = bpr_train.bpr_sgd(steps, lr=0.05)
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "batch_stats": variables["batch_stats"]}
    state["opt_state"] = tx.init(state["params"])
    train_step = jax.jit(make_train_step(model, tx, bpr_train.pixel_xent, seed=0))
    make_batch = jax.jit(lambda key: bpr_train.refiner_batch(key, images, coarse, gt, 32))
    losses = []
    for step in range(steps):
        state, metrics = train_step(state, make_batch(jax.random.PRNGKey(step)))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_synthetic_scenes_of_the_experiment():
    from experiments import bpr_synthetic  # pylint: disable=import-outside-toplevel

    image, gt = bpr_synthetic.make_scene(np.random.default_rng(0), instances=4)
    assert image.shape == bpr_synthetic.SCENE_HW + (3,) and gt.shape[0] == 4
    assert 0 <= image.min() and image.max() <= 255
    assert gt.sum(axis=0).max() == 1  # instances do not overlap
    assert all(m.any() for m in gt)


@pytest.mark.slow
def test_synthetic_experiment_runs(tmp_path):
    import json  # pylint: disable=import-outside-toplevel

    from experiments import bpr_synthetic  # pylint: disable=import-outside-toplevel

    table = bpr_synthetic.run(str(tmp_path), seeds=(0,), train_scenes=2, test_scenes=1, steps=3,
                              batch_size=8)
    assert json.loads((tmp_path / "bpr_synthetic.json").read_text()) == json.loads(
        json.dumps(table))
    result = table["per_seed"][0]
    for key in ("coarse_boundary_iou", "refined_boundary_iou", "coarse_mask_iou",
                "refined_mask_iou"):
        assert 0.0 <= result[key] <= 1.0
    assert result["coarse_mask_iou"] < 1.0 and result["train_patches"] > 0
    assert (tmp_path / "bpr_synthetic_overlay_seed0.png").stat().st_size > 1000


@pytest.mark.slow
def test_nuclei_experiment_runs(tmp_path):
    from experiments import bpr_nuclei  # pylint: disable=import-outside-toplevel

    table = bpr_nuclei.run(str(tmp_path), seeds=(0,), copies=1, steps=2, batch_size=8)
    result = table["per_seed"][0]
    assert table["held_out_instances"] > 10
    for key in ("coarse_boundary_iou", "refined_boundary_iou", "coarse_mask_AP",
                "refined_mask_AP"):
        assert 0.0 <= result[key] <= 1.0
    assert (tmp_path / "bpr_nuclei.json").exists()
    assert (tmp_path / "bpr_nuclei_overlay_seed0.png").stat().st_size > 1000
