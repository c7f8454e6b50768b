"""Mask R-CNN through the trainer (config.task='detection') on the nuclei data, tiny shapes.

The trained workdir is the session's ``detection_run`` (tests/conftest.py: a 1-block width-16
FlexiViT detector, 6 steps with patch sizes {8, 16} drawn per step, evaluated on the held-out
region at patch sizes 8 and 16). The COCO known-answer tests of the metrics themselves are in
tests/test_data_coco.py.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from flexvision.engine import detection


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_short_run_lowers_the_loss_and_writes_coco_results(detection_run):
    workdir, final, _ = detection_run
    rows = _metrics(workdir)
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert np.mean([losses[5], losses[6]]) < np.mean([losses[1], losses[2]]), losses
    parts = [k for k in rows[0] if k.startswith("train/loss_")]
    assert sorted(parts) == ["train/loss_box_reg", "train/loss_classifier", "train/loss_mask",
                             "train/loss_objectness", "train/loss_rpn_box_reg"]
    np.testing.assert_allclose(rows[-2]["train/loss"], sum(rows[-2][k] for k in parts),
                               rtol=1e-5)

    assert final["step"] == 6 and final["split"] == "test" and set(final["splits"]) == {"test"}
    for key in (*detection.METRICS, detection.SPEED):
        assert set(final[key]) == {"8", "16"}, key
    for key in detection.METRICS:
        assert all(0 <= v <= 1 for v in final[key].values()), (key, final[key])
    assert all(v > 0 for v in final[detection.SPEED].values())
    assert rows[-1]["test/mask_AP50/ps16"] == final["mask_AP50"]["16"]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert os.path.getsize(os.path.join(workdir, "final_eval.png")) > 1000

    # The held-out region is 128 x 512 (evaluated at 32 x 128): the overlay shows it at its
    # original size, ground truth then each patch size.
    from PIL import Image
    with Image.open(os.path.join(workdir, "final_overlay.png")) as png:
        assert png.size == (512, 3 * 128 + 2 * 4)


def test_prediction_files_reproduce_the_final_ap_with_pycocotools(detection_run):
    """The predictions files alone (what BPR reads) give final_eval.json's AP in plain
    pycocotools: COCO results at the ORIGINAL image size, category ids 1-based."""
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    workdir, final, _ = detection_run
    directory = os.path.join(workdir, "predictions")
    assert sorted(os.listdir(directory)) == ["test_16.json", "test_8.json",
                                             "test_ground_truth.json"]
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(os.path.join(directory, "test_ground_truth.json"))
    image = truth.dataset["images"][0]
    assert (image["height"], image["width"]) == (128, 512) and len(truth.dataset["images"]) == 1
    assert len(truth.dataset["annotations"]) == 36
    for ps in ("8", "16"):
        with open(os.path.join(directory, f"test_{ps}.json"), encoding="utf-8") as f:
            results = json.load(f)
        assert results, "the tiny detector should detect something"
        for entry in results:
            assert set(entry) == {"image_id", "category_id", "bbox", "score", "segmentation"}
            assert entry["image_id"] == image["id"] and entry["category_id"] == 1
            assert isinstance(entry["segmentation"]["counts"], str)
            assert entry["segmentation"]["size"] == [128, 512]
            x, y, w, h = entry["bbox"]
            assert -1e-3 <= x and x + w <= 512 + 1e-3 and -1e-3 <= y and y + h <= 128 + 1e-3
        for iou_type, key in (("bbox", "box_AP"), ("segm", "mask_AP")):
            with contextlib.redirect_stdout(io.StringIO()):
                evaluator = COCOeval(truth, truth.loadRes(results), iouType=iou_type)
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            assert evaluator.stats[0] == pytest.approx(final[key][ps], abs=1e-12)
            assert evaluator.stats[1] == pytest.approx(final[key + "50"][ps], abs=1e-12)
        assert mask_utils.decode(results[0]["segmentation"]).shape == (128, 512)


def test_resume_from_a_checkpoint_gives_identical_params(tiny_detection_config, detection_run,
                                                         tmp_path):
    from flexvision.engine.state import load_workdir
    from flexvision.train.trainer import train_and_evaluate

    full, final, _ = detection_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    os.remove(os.path.join(resumed, "final_eval.json"))
    again = train_and_evaluate(tiny_detection_config(), resumed)

    _, model, variables_full, step = load_workdir(full)
    _, _, variables_resumed, _ = load_workdir(resumed)
    assert step == 6 and type(model).__name__ == "MaskRCNN"
    leaves = [jax.tree_util.tree_leaves(v) for v in (variables_full, variables_resumed)]
    assert len(leaves[0]) == len(leaves[1]) > 0
    for a, b in zip(*leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again["mask_AP"] == final["mask_AP"] and again["box_AP50"] == final["box_AP50"]


def test_evaluate_entry_picks_any_patch_size_of_a_detection_checkpoint(tiny_detection_config,
                                                                      detection_run):
    from flexvision.evaluate import evaluate_checkpoint

    workdir, final, _ = detection_run
    evaluated = evaluate_checkpoint(tiny_detection_config(), workdir, patch_sizes=[16])
    table = evaluated["splits"]["test"]
    assert evaluated["step"] == 6 and set(table["mask_AP"]) == {"16"}
    for key in detection.METRICS:
        assert table[key]["16"] == final[key]["16"], key
    with pytest.raises(ValueError, match="detection evals run at the eval pp's size"):
        evaluate_checkpoint(tiny_detection_config(), workdir, resolutions=[64])


def test_random_patch_sizes_per_step_reach_the_detector(tiny_detection_config, detection_run):
    """The loop traced one detection train step per patch size the schedule drew, and each
    one called the detector with that patch_size (recorded by the fixture)."""
    from flexvision.engine import patch_schedule

    config = tiny_detection_config()
    _, _, traced = detection_run
    drawn = [patch_schedule.patch_size_for_step(config.flexi, config.seed, s)
             for s in range(config.total_steps)]
    assert set(drawn) == {8, 16}
    assert traced == list(dict.fromkeys(drawn))  # each drawn size once, in order of first use


@pytest.mark.parametrize("overrides, match", [
    ({"model.kwargs.num_classes": 1},
     r"config\.model\.kwargs\.num_classes.*counts the background.*use 2"),
    ({"input.pp": "decode(1)|det_instances|det_resize(64)|det_pad(64, 4)|value_range(-1, 1)"},
     r"config\.input\.pp=.*max_instances=4.*split 'train' has \(15\).*at least 15"),
    ({"eval.pp": "decode(1)|det_instances|value_range(-1, 1)"},
     r"config\.eval\.pp=.*det_pad\(size, max_instances\)"),
    ({"task": "detect"}, r"config\.task='detect': must be one of"),
    ({"task": "classification"}, r"config\.task='classification'.*is a detector"),
    ({"mixup_alpha": 0.2}, r"config\.mixup_alpha=0\.2: mixup is not defined"),
    ({"model.name": "maskrcnn_hrnet_micro", "model.kwargs.backbone_overrides": {}},
     r"config\.eval\.patch_sizes=\(8, 16\): maskrcnn_hrnet_micro has no patch_size"),
    ({"eval.mask_threshold": 1.5}, r"config\.eval\.mask_threshold=1\.5: must be a number in"),
])
def test_bad_detection_config_values_are_config_errors(tiny_detection_config, overrides, match):
    from flexvision.train.validate import ConfigError, validate_config

    validate_config(tiny_detection_config())  # the fixture's config itself is valid
    with pytest.raises(ConfigError, match=match):
        validate_config(tiny_detection_config(**overrides))


def test_detection_with_a_distill_block_is_refused(tiny_detection_config):
    from configs.common import distill_block
    from flexvision.train.trainer import objective_for
    from flexvision.train.validate import ConfigError, validate_config

    config = tiny_detection_config()
    with config.unlocked():
        config.distill = distill_block("workdir", resolution=64, workdir="/nonexistent")
    with pytest.raises(ConfigError, match=r"config\.distill=.*distillation trains classifiers"):
        validate_config(config)
    with pytest.raises(ValueError, match=r"config\.distill is set with config\.task='detection'"):
        objective_for(config, None, None)


def test_model_batch_makes_labels_one_based_and_drops_crowds():
    batch = {"image": np.zeros((1, 8, 8, 1), np.float32), "image_size": np.array([[8, 6]]),
             "boxes": np.zeros((1, 3, 4), np.float32), "labels": np.array([[0, 2, 0]]),
             "valid": np.array([[True, True, False]]), "is_crowd": np.array([[False, True,
                                                                               False]]),
             "masks": np.zeros((1, 3, 8, 8), np.uint8), "image/id": np.array([7])}
    out = detection.model_batch(batch)
    assert sorted(out) == sorted(detection.TRAIN_KEYS)
    np.testing.assert_array_equal(out["labels"], [[1, 0, 0]])
    np.testing.assert_array_equal(out["valid"], [[True, False, False]])
    assert out["image_size"].dtype == np.int32
    with pytest.raises(KeyError, match=r"missing \['valid'\].*det_pad"):
        detection.model_batch({k: v for k, v in batch.items() if k != "valid"})


def test_predictions_are_mapped_back_to_the_original_image_size():
    """A detection on a 32 x 128 input of a 128 x 512 image: box scaled by 4 per axis, the
    28 x 28 mask pasted at the original size inside the scaled box (paste_masks)."""
    out = {"boxes": np.array([[8, 4, 24, 12], [0, 0, 0, 0]], np.float32),
           "scores": np.array([0.9, 0.0], np.float32), "labels": np.array([1, 0], np.int32),
           "valid": np.array([True, False]), "masks": np.ones((2, 28, 28), np.float32)}
    prediction = detection.original_size_predictions(out, (32, 128), (128, 512))
    np.testing.assert_allclose(prediction["boxes"], [[32, 16, 96, 48]])
    np.testing.assert_array_equal(prediction["labels"], [0])
    assert prediction["masks"].shape == (1, 128, 512) and prediction["masks"].dtype == bool
    rows, cols = np.nonzero(prediction["masks"][0])
    # torchvision's paste: the 30 x 30 zero-bordered mask into the box grown by 30/28 and
    # truncated (rows 14..49, columns 29..98), bilinear, >= 0.5 from row 15 / column 31 to
    # row 48 / column 96.
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (15, 48, 31, 96)
    [entry] = detection.coco_results(prediction, image_id=3)
    assert entry["bbox"] == [32.0, 16.0, 64.0, 32.0] and entry["category_id"] == 1
