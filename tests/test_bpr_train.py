"""BPR training data and recipe pieces: coarse-mask degradation, training patches, uint8
rounding after the resize, the poly schedule and the per-pixel loss (the augmentation ops and
the run through the trainer: tests/test_bpr_trainer.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexvision.detection import boundary, bpr, bpr_data


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

    coarse = bpr_data.degrade_mask(mask, FixedDraws(), factors=(2, 2), max_radius=0)
    np.testing.assert_array_equal(coarse, [[1, 1, 0, 0], [1, 1, 0, 0],
                                           [0, 0, 1, 1], [0, 0, 1, 1]])


def test_degrade_mask_is_coarse_but_close_and_seeded():
    gt = _disc()
    coarse = bpr_data.degrade_mask(gt, np.random.default_rng(0))
    again = bpr_data.degrade_mask(gt, np.random.default_rng(0))
    np.testing.assert_array_equal(coarse, again)
    iou = np.count_nonzero(gt & coarse) / np.count_nonzero(gt | coarse)
    assert 0.6 < iou < 1.0
    assert boundary.boundary_iou(gt, coarse, width=1) < 0.9
    with pytest.raises(ValueError, match="factors"):
        bpr_data.degrade_mask(gt, np.random.default_rng(0), factors=(4, 2))


def test_patch_examples_pair_coarse_boxes_with_ground_truth():
    gt = _disc()[None].astype(np.uint8)
    coarse = bpr_data.degrade_mask(gt[0], np.random.default_rng(1))[None]
    image = np.random.default_rng(2).integers(0, 255, gt.shape[1:] + (3,), dtype=np.uint8)
    # network size = patch size: the resize is the identity, the crops are compared as cut
    examples = bpr_data.patch_examples([(image, gt, coarse)], patch_size=16, network_size=16,
                                       iou_threshold=0.25)
    boxes = bpr.boundary_patch_boxes(coarse[0], 16, 0.25).boxes
    assert len(examples["image"]) == len(boxes) > 0
    np.testing.assert_array_equal(examples["box"], boxes[:, :4])
    np.testing.assert_array_equal(examples["instance"], 0)
    for k, (x1, y1, x2, y2) in enumerate(boxes[:, :4].astype(int)):
        np.testing.assert_array_equal(examples["image"][k], image[y1:y2, x1:x2])
        np.testing.assert_array_equal(examples["mask"][k, ..., 0], coarse[0, y1:y2, x1:x2])
        np.testing.assert_array_equal(examples["label"][k, ..., 0], gt[0, y1:y2, x1:x2])
    # at twice the size: masks by nearest neighbours, the image bilinear and rounded (mmcv)
    doubled = bpr_data.patch_examples([(image, gt, coarse)], patch_size=16, network_size=32,
                                      iou_threshold=0.25)
    np.testing.assert_array_equal(doubled["mask"][:, ::2, ::2], examples["mask"])
    np.testing.assert_array_equal(doubled["label"][:, 1::2, 1::2], examples["label"])
    expected = bpr.resize_bilinear(examples["image"].astype(np.float32), (32, 32))
    np.testing.assert_array_equal(doubled["image"], np.round(np.asarray(expected)))


def test_resize_patches_rounds_uint8_images_only():
    patches = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    masks = np.zeros((2, 8, 8), np.uint8)
    rounded, _ = bpr.resize_patches(patches, masks, 12)
    unrounded, _ = bpr.resize_patches(patches.astype(np.float32), masks, 12)
    np.testing.assert_array_equal(rounded, np.round(unrounded))
    assert np.any(np.asarray(unrounded) != np.round(np.asarray(unrounded)))


def test_poly_schedule_is_mmcvs():
    import ml_collections  # pylint: disable=import-outside-toplevel

    from flexvision.engine import optim  # pylint: disable=import-outside-toplevel

    config = ml_collections.ConfigDict({"lr": 0.01, "total_steps": 100, "schedule": {
        "decay_type": "poly", "power": 0.9, "min_lr_ratio": 0.01}})
    schedule = optim.make_schedule(config)
    for step in (0, 10, 50, 99, 100):
        expected = (0.01 - 1e-4) * (1 - step / 100) ** 0.9 + 1e-4
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
    config.schedule.power = 0.0
    with pytest.raises(ValueError, match="power"):
        optim.make_schedule(config)


def test_mean_over_pixels_averages_the_per_pixel_loss():
    from flexvision.engine import losses  # pylint: disable=import-outside-toplevel

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 2)), jnp.float32)
    labels = jax.nn.one_hot(jnp.asarray(np.random.default_rng(1).integers(0, 2, (2, 3, 4))), 2)
    per_example = losses.mean_over_pixels(losses.softmax_xent)(logits, labels)
    manual = -(jax.nn.log_softmax(logits) * labels).sum(-1).mean(axis=(1, 2))
    np.testing.assert_allclose(per_example, manual, rtol=1e-6)


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
