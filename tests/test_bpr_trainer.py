"""BPR's refiner through the trainer (issue 18): the boundary-patch dataset, its pp ops, the
segmentation objective run by ``train_and_evaluate``, and refining a detector's COCO results."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments import bpr_nuclei
from flexvision.data import coco, instances, ops, pipeline
from flexvision.detection import bpr, bpr_data
from flexvision.engine.configs import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "bpr_hrnet18s_nuclei.py")


def _run(pp, seed=(0, 1), **data):
    data = {k: tf.constant(v) for k, v in data.items()}
    data[ops.RNG_KEY] = tf.constant(seed, tf.int64)
    return {k: v.numpy() for k, v in ops.parse(pp)(data).items() if k != ops.RNG_KEY}


# ------------------------------------------------------------------------------------------------
# pp ops


def test_flip_lr_flips_image_mask_and_label_together():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    mask = rng.integers(0, 2, (6, 8, 1), dtype=np.uint8)
    label = rng.integers(0, 2, (6, 8, 1), dtype=np.uint8)
    flips = []
    for seed in range(16):
        out = _run("flip_lr(('image', 'mask', 'label'))", seed=(0, seed), image=image, mask=mask,
                   label=label)
        flipped = [not np.array_equal(out[k], v) for k, v in
                   (("image", image), ("mask", mask), ("label", label))]
        for key, value in (("image", image), ("mask", mask), ("label", label)):
            expected = value[:, ::-1] if flipped[0] else value
            np.testing.assert_array_equal(out[key], expected)
        flips.append(flipped[0])
    assert 0 < sum(flips) < 16


def test_photometric_distortion_truncates_and_varies():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    outs = [_run("photometric_distortion", seed=(0, s), image=image)["image"] for s in range(12)]
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)
    assert sum(not np.array_equal(o, image) for o in outs) >= 6
    again = _run("photometric_distortion", seed=(0, 3), image=image)["image"]
    np.testing.assert_array_equal(again, outs[3])
    # brightness alone on a gray image: floor(x + beta) for one beta, clipped (mmseg's convert)
    gray = np.repeat(np.arange(40, 104, dtype=np.uint8).reshape(8, 8, 1), 3, axis=-1)
    changed = 0
    for seed in range(8):
        out = _run("photometric_distortion(contrast_range=(1, 1), saturation_range=(1, 1), "
                   "hue_delta=0)", seed=(1, seed), image=gray)["image"].astype(int)
        shift = out - gray.astype(int)
        assert len(np.unique(shift)) == 1 and abs(shift.flat[0]) <= 32
        changed += shift.flat[0] != 0
    assert changed > 0


def test_photometric_distortion_rejects_gray_input():
    with pytest.raises(ValueError, match="RGB"):
        _run("photometric_distortion", image=np.zeros((4, 4, 1), np.uint8))


def test_config_pp_builds_the_4_channel_input():
    config = get_config(CONFIG)
    image = np.full((4, 4, 3), 128, np.uint8)
    mask = np.zeros((4, 4, 1), np.uint8)
    mask[:, 2:] = 1
    label = mask[:, ::-1].copy()
    out = _run(config.eval.pp, image=image, mask=mask, label=label)
    assert out["image"].shape == (4, 4, 4) and out["labels"].shape == (4, 4, 2)
    np.testing.assert_allclose(out["image"][..., :3],
                               (128 - np.asarray(bpr.IMAGE_MEAN)) / np.asarray(bpr.IMAGE_STD)
                               * np.ones((4, 4, 3)), rtol=1e-6)
    np.testing.assert_array_equal(out["image"][..., 3], 2.0 * mask[..., 0] - 1.0)
    np.testing.assert_array_equal(out["labels"].argmax(-1), label[..., 0])


# ------------------------------------------------------------------------------------------------
# the patch dataset


def test_patch_dataset_examples_are_consistent(bpr_patches_data_dir):
    builder = bpr_data.FlexvisionBprPatches(data_dir=bpr_patches_data_dir)
    size = bpr_data.NUCLEI.network_size
    test = list(tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False)))
    assert builder.info.splits["train"].num_examples > 500 and len(test) > 50
    for example in test:
        assert example["image"].shape == (size, size, 3)
        assert set(np.unique(example["mask"])) <= {0, 1}
        assert set(np.unique(example["label"])) <= {0, 1}
    # the stored test split is what patch_examples cuts from the held-out region's coarse masks
    image, gt = bpr_data.nuclei_regions(bpr_data.NUCLEI)["test"][0]
    rng = np.random.default_rng((bpr_data.NUCLEI.seed, 1, 0, 0))
    expected = bpr_data.patch_examples([(image, gt, bpr_data.degrade(gt, rng, bpr_data.NUCLEI))],
                                       patch_size=bpr_data.NUCLEI.patch_size,
                                       network_size=size,
                                       iou_threshold=bpr_data.NUCLEI.iou_threshold)
    by_box = {(int(e["instance"]), *e["box"].tolist()): e for e in test}
    assert len(by_box) == len(expected["box"]) == len(test)
    for k in range(len(expected["box"])):
        stored = by_box[(int(expected["instance"][k]), *expected["box"][k].tolist())]
        for key in ("image", "mask", "label"):
            np.testing.assert_array_equal(stored[key], expected[key][k])
    # a patch's coarse mask is the degraded mask at its box, not the ground truth
    assert any(not np.array_equal(e["mask"], e["label"]) for e in test)


def test_patch_dataset_through_the_eval_pipeline(bpr_patches_data_dir):
    config = get_config(CONFIG)
    config.input.data_dir = bpr_patches_data_dir
    batch = next(pipeline.eval_batches(config.input, config.eval.pp, "test", 32))
    raw = next(iter(tfds.as_numpy(bpr_data.FlexvisionBprPatches(
        data_dir=bpr_patches_data_dir).as_dataset(split="test", shuffle_files=False,
                                                  read_config=tfds.ReadConfig(
                                                      interleave_cycle_length=1)).batch(32))))
    np.testing.assert_array_equal(batch["image"][..., 3], 2.0 * raw["mask"][..., 0] - 1.0)
    np.testing.assert_array_equal(batch["labels"].argmax(-1), raw["label"][..., 0])
    assert set(np.unique(batch["labels"])) <= {0.0, 1.0}


def test_patch_examples_rejects_float_images():
    gt = np.zeros((1, 40, 40), bool)
    gt[0, 10:30, 10:30] = True
    with pytest.raises(ValueError, match="uint8"):
        bpr_data.patch_examples([(np.zeros((40, 40, 3), np.float32), gt, gt)], patch_size=16,
                                network_size=32, iou_threshold=0.25)


# ------------------------------------------------------------------------------------------------
# training through the trainer


def test_segmentation_run_lowers_the_loss_and_writes_final_eval(bpr_trained_run):
    workdir, final = bpr_trained_run
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    assert final["split"] == "test" and final["step"] == 12
    for metric in ("pixel_accuracy", "mean_iou", "foreground_iou", "boundary_iou"):
        for prefix in ("", "coarse_"):
            assert 0.0 <= final[prefix + metric]["default"] <= 1.0
    assert final["examples"] > 50
    flat = [r for r in rows if "test/foreground_iou/psdefault" in r]
    assert flat and flat[-1]["step"] == 12
    assert os.path.getsize(os.path.join(workdir, "final_eval.png")) > 1000


# ------------------------------------------------------------------------------------------------
# coarse masks from a detector's COCO results


def _write_predictions(directory: str, seed: int = 0):
    """The held-out nuclei's ground truth (test_ground_truth.json) and their degraded masks as
    a COCO results file (test_default.json), as the detection evaluator writes them."""
    _, labels = instances.stardist_nuclei()
    gt, boxes = coco.instances_from_label_map(labels[-128:])
    coco.write_coco(os.path.join(directory, "test_ground_truth.json"),
                    [{"id": 0, "boxes": boxes, "labels": np.zeros(len(gt), np.int64),
                      "masks": gt}], ["nucleus"])
    rng = np.random.default_rng(seed)
    coarse = bpr_data.degrade(gt, rng, bpr_data.NUCLEI)
    coarse = coarse[coarse.any(axis=(1, 2))]
    scores = rng.uniform(0.3, 1.0, len(coarse))
    results = [{"image_id": 0, "category_id": 1, "bbox": box.tolist(), "score": float(score),
                "segmentation": rle}
               for box, score, rle in zip(coco.xyxy_to_xywh(coco.boxes_from_masks(coarse)),
                                          scores, coco.masks_to_rle(coarse))]
    path = os.path.join(directory, "test_default.json")
    with open(path, "w") as f:
        json.dump(results, f)
    return path, coarse, scores


def test_read_results_returns_the_written_masks(tmp_path):
    path, coarse, scores = _write_predictions(str(tmp_path))
    read = coco.read_results(path)
    assert list(read) == [0]
    order = np.argsort(-scores, kind="stable")
    np.testing.assert_array_equal(read[0]["masks"], coarse[order])
    np.testing.assert_allclose(read[0]["scores"], scores[order], rtol=1e-6)
    np.testing.assert_array_equal(read[0]["labels"], 0)
    np.testing.assert_allclose(read[0]["boxes"], coco.boxes_from_masks(coarse[order]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="json list"):
        coco.read_results(str(bad))
    bad.write_text(json.dumps([{"image_id": 0, "category_id": 1, "score": 1.0}]))
    with pytest.raises(ValueError, match="segmentation"):
        coco.read_results(str(bad))


def test_refine_predictions_end_to_end(bpr_trained_run, tmp_path):
    workdir, _ = bpr_trained_run
    predictions, coarse, _ = _write_predictions(str(tmp_path))
    assert bpr_nuclei.ground_truth_path(predictions) == str(tmp_path / "test_ground_truth.json")
    summary = bpr_nuclei.refine_with_refiners([workdir, workdir], predictions,
                                              str(tmp_path / "out"), score_threshold=0.0)
    table = summary["per_refiner"][0]
    assert summary["refiners"] == 2 and summary["per_refiner"][1]["refined_mask_AP"] == \
        table["refined_mask_AP"]
    assert summary["mask_AP_gain_mean"] == table["refined_mask_AP"] - table["coarse_mask_AP"]
    assert summary["boundary_iou_gain_std"] == 0.0
    assert table["predictions_count"] == len(coarse) and table["images"] == 1
    assert table["matched"] > 0.5 * len(coarse)
    for key in ("mask_AP", "mask_AP75", "boundary_iou", "mask_iou"):
        for name in ("coarse", "refined"):
            assert 0.0 <= table[f"{name}_{key}"] <= 1.0
    saved = json.loads((tmp_path / "out" / "bpr_nuclei_maskrcnn.json").read_text())
    assert saved["per_refiner"][0]["refined_boundary_iou"] == table["refined_boundary_iou"]
    assert (tmp_path / "out" / "bpr_nuclei_maskrcnn_overlay.png").stat().st_size > 1000


def test_match_instances_is_greedy_by_score():
    gt = np.zeros((2, 4, 4), bool)
    gt[0, :2] = True
    gt[1, 2:] = True
    pred = np.stack([gt[0], gt[0], gt[1] | gt[0]])
    # the 0.9 prediction takes nucleus 0 first; the 0.5 copy of it finds nothing left; the
    # union (IoU 0.5 with either) takes nucleus 1 at threshold 0.5, nothing at 0.6
    assert bpr_nuclei.match_instances(gt, pred, np.array([0.5, 0.9, 0.1])) == [(0, 1), (1, 2)]
    assert bpr_nuclei.match_instances(gt, pred, np.array([0.5, 0.9, 0.1]), 0.6) == [(0, 1)]
    # ties go to the lower ground-truth index
    assert bpr_nuclei.match_instances(gt, pred[2:], np.array([1.0]), 0.4) == [(0, 0)]
    assert bpr_nuclei.match_instances(gt, pred[:0], np.zeros(0)) == []


def test_segmentation_config_is_validated():
    from flexvision.train.validate import ConfigError, validate_config

    config = get_config(CONFIG)
    validate_config(config, device_count=1)
    config.eval.coarse_channel = -1
    config.eval.boundary_width = 0
    config.mixup_alpha = 0.2
    with pytest.raises(ConfigError) as err:
        validate_config(config, device_count=1)
    for key in ("eval.coarse_channel", "eval.boundary_width", "mixup_alpha"):
        assert f"config.{key}=" in str(err.value)


def test_interior_boundary_iou_ignores_the_patch_frame_by_hand():
    from flexvision.train.segmentation import interior_boundary_iou

    gt = np.zeros((6, 6), bool)
    gt[:, :3] = True  # left half: its true boundary is column 2
    np.testing.assert_equal(interior_boundary_iou(gt, gt, 1), 1.0)
    shifted = np.zeros((6, 6), bool)
    shifted[:, :4] = True  # boundary at column 3
    # inside the frame (rows/cols 1..4): gt boundary col 2, pred col 3 -> disjoint
    assert interior_boundary_iou(gt, shifted, 1) == 0.0
    # the frame alone would have made them agree on rows 0 and 5 and column 0
    from flexvision.detection import boundary
    assert boundary.boundary_iou(gt, shifted, width=1) > 0.3
    empty = np.zeros((6, 6), bool)
    assert interior_boundary_iou(empty, np.ones((6, 6), bool), 1) == 1.0
