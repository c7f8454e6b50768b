"""COCO format and metrics: answers checked against pycocotools' COCOeval run on hand-built json."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from flexvision.data import coco

H, W = 40, 60
NAMES = ["cell", "blob"]


def _rect_mask(box, h=H, w=W):
    x1, y1, x2, y2 = box
    mask = np.zeros((h, w), bool)
    mask[y1:y2, x1:x2] = True
    return mask


def _gt(boxes, labels, h=H, w=W, **extra):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    masks = np.stack([_rect_mask(b.astype(int), h, w) for b in boxes]) if len(boxes) else \
        np.zeros((0, h, w), bool)
    return dict(boxes=boxes, labels=np.asarray(labels, np.int64), masks=masks, **extra)


def _pred(boxes, scores, labels, h=H, w=W):
    out = _gt(boxes, labels, h, w)
    out["scores"] = np.asarray(scores, np.float32)
    return out


def _cocoeval_by_hand(images, gt_anns, dt_anns, iou_type):
    """COCOeval on json built here from scratch (boxes as xywh, masks as RLE of rectangles)."""
    dataset = {"images": images, "categories": [{"id": 1, "name": "cell"}, {"id": 2,
                                                                          "name": "blob"}],
               "annotations": gt_anns}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(dataset))
        gt.createIndex()
        dt = gt.loadRes(json.loads(json.dumps(dt_anns)))
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:3]


def _rle(box):
    x, y, w, h = box
    mask = np.zeros((H, W), np.uint8, order="F")
    mask[y:y + h, x:x + w] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode()
    return rle


# two images; hand-written xywh boxes and the shifts of the predictions
GT_XYWH = {1: [(5, 5, 10, 10), (30, 8, 12, 20)], 2: [(10, 10, 20, 15)]}
DT_XYWH = {1: [(7, 5, 10, 10, 0.9), (30, 14, 12, 20, 0.8)], 2: [(10, 13, 20, 15, 0.7),
                                                                   (40, 30, 8, 8, 0.95)]}


def _by_hand(iou_type, images=(1, 2)):
    imgs = [{"id": i, "height": H, "width": W} for i in images]
    gts, dts = [], []
    for i in images:
        for box in GT_XYWH.get(i, []):
            gts.append({"id": len(gts) + 1, "image_id": i, "category_id": 1, "bbox": list(box),
                        "area": box[2] * box[3], "iscrowd": 0, "segmentation": _rle(box)})
        for *box, score in DT_XYWH.get(i, []):
            d = {"image_id": i, "category_id": 1, "score": score}
            d.update({"bbox": box} if iou_type == "bbox" else {"segmentation": _rle(box)})
            dts.append(d)
    return _cocoeval_by_hand(imgs, gts, dts, iou_type)


def _ours(images=(1, 2)):
    xyxy = lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3])  # noqa: E731
    gts = [_gt([xyxy(b) for b in GT_XYWH.get(i, [])], [0] * len(GT_XYWH.get(i, [])), id=i)
           for i in images]
    preds = [_pred([xyxy(d[:4]) for d in DT_XYWH.get(i, [])], [d[4] for d in DT_XYWH.get(i, [])],
                   [0] * len(DT_XYWH.get(i, []))) for i in images]
    return gts, preds


def test_perfect_predictions_give_ap_one_on_real_nuclei():
    from flexvision.data import instances

    _, labels = instances.stardist_nuclei()
    masks, boxes = coco.instances_from_label_map(labels[384:])
    gt = [dict(boxes=boxes, labels=np.zeros(len(boxes), int), masks=masks)]
    pred = [dict(boxes=boxes, labels=np.zeros(len(boxes), int), masks=masks,
                 scores=np.linspace(1, 0.5, len(boxes)))]
    metrics = coco.coco_metrics(gt, pred, ["nucleus"])
    for kind in ("box", "mask"):
        for name in ("AP", "AP50", "AP75"):
            assert metrics[f"{kind}/{name}"] == pytest.approx(1.0)
    assert metrics["box/APl"] == -1  # no nucleus above 96^2 pixels: COCOeval's -1


def test_shifted_boxes_give_the_ap_pycocotools_gives():
    gts, preds = _ours()
    metrics = coco.coco_metrics(gts, preds, NAMES)
    expected_box, expected_mask = _by_hand("bbox"), _by_hand("segm")
    for i, name in enumerate(("AP", "AP50", "AP75")):
        assert metrics[f"box/{name}"] == pytest.approx(expected_box[i], abs=1e-12)
        assert metrics[f"mask/{name}"] == pytest.approx(expected_mask[i], abs=1e-12)
    assert 0 < metrics["box/AP"] < metrics["box/AP50"] < 1  # the shifts matter
    assert metrics["box/AP50"] != metrics["box/AP75"]


def test_image_without_instances_makes_its_detections_false_positives():
    # image 2 has no ground truth: its two detections (one scored above everything) are FPs
    saved = GT_XYWH.pop(2)
    try:
        gts, preds = _ours()
        assert len(gts[1]["boxes"]) == 0 and gts[1]["masks"].shape == (0, H, W)
        metrics = coco.coco_metrics(gts, preds, NAMES)
        expected = _by_hand("bbox")
    finally:
        GT_XYWH[2] = saved
    for i, name in enumerate(("AP", "AP50", "AP75")):
        assert metrics[f"box/{name}"] == pytest.approx(expected[i], abs=1e-12)
    alone = coco.coco_metrics(gts[:1], preds[:1], NAMES)
    assert metrics["box/AP50"] < alone["box/AP50"]


def test_empty_masks_ground_truth_rejected_prediction_counts_as_miss():
    gt = _gt([(5, 5, 15, 15)], [0])
    gt["masks"][0] = False
    with pytest.raises(ValueError, match="empty mask"):
        coco.coco_metrics([gt], [_pred([(5, 5, 15, 15)], [1.0], [0])], NAMES)
    gt = _gt([(5, 5, 15, 15)], [0])
    pred = _pred([(5, 5, 15, 15)], [1.0], [0])
    pred["masks"][0] = False
    metrics = coco.coco_metrics([gt], [pred], NAMES)
    assert metrics["box/AP"] == pytest.approx(1.0) and metrics["mask/AP"] == 0.0


def test_boxes_outside_the_image():
    gt = dict(boxes=[(W + 1, 5, W + 9, 15)], labels=[0], masks=np.ones((1, H, W), bool))
    with pytest.raises(ValueError, match="nothing inside the image"):
        coco.coco_metrics([gt], [_pred([], [], [])], NAMES)
    # a prediction reaching outside the image is scored as its clipped box
    gt = _gt([(40, 10, 60, 30)], [0])
    outside = _pred([(40, 10, 80, 30)], [1.0], [0])
    clipped = _pred([(40, 10, 60, 30)], [1.0], [0])
    assert coco.coco_metrics([gt], [outside], NAMES) == coco.coco_metrics([gt], [clipped], NAMES)
    assert coco.coco_metrics([gt], [outside], NAMES)["box/AP"] == pytest.approx(1.0)


def test_labels_outside_the_classes_are_rejected():
    gt = _gt([(5, 5, 15, 15)], [0])
    with pytest.raises(ValueError, match=r"label\(s\) \[2\] outside the 2 known classes"):
        coco.coco_metrics([gt], [_pred([(5, 5, 15, 15)], [1.0], [2])], NAMES)
    with pytest.raises(ValueError, match=r"label\(s\) \[5\]"):
        coco.coco_metrics([_gt([(5, 5, 15, 15)], [5])], [_pred([], [], [])], NAMES)


def test_padding_masks_and_no_predictions():
    gts, preds = _ours()
    reference = coco.coco_metrics(gts, preds, NAMES)
    padded_gts, padded_preds = [], []
    for gt, pred in zip(gts, preds):  # pad to capacity 4 and to a 48x64 canvas
        n, m = len(gt["boxes"]), len(pred["boxes"])
        g = {k: np.concatenate([v, np.zeros((4 - n,) + v.shape[1:], v.dtype)])
             for k, v in gt.items() if k != "id"}
        g["masks"] = np.pad(g["masks"], [(0, 0), (0, 8), (0, 4)])
        g.update(id=gt["id"], valid=np.arange(4) < n, image_size=(H, W))
        p = {k: np.concatenate([v, np.full((4 - m,) + v.shape[1:], 7, v.dtype)])
             for k, v in pred.items()}
        p["masks"] = np.pad(p["masks"].astype(np.float32) * 0.9, [(0, 0), (0, 8), (0, 4)])
        p["valid"] = np.arange(4) < m
        padded_gts.append(g)
        padded_preds.append(p)
    assert coco.coco_metrics(padded_gts, padded_preds, NAMES) == reference
    nothing = [_pred([], [], []) for _ in gts]
    assert set(coco.coco_metrics(gts, nothing, NAMES).values()) == {0.0}
    with pytest.raises(ValueError, match="no instance at all"):
        coco.coco_metrics([_gt([], [])], [_pred([], [], [])], NAMES)
    with pytest.raises(ValueError, match="1 ground-truth images but 2"):
        coco.coco_metrics(gts[:1], preds, NAMES)


def test_boxes_from_masks_and_label_maps():
    label_map = np.zeros((6, 7), np.int32)
    label_map[1:3, 2:5] = 7
    label_map[4, 6] = 2
    masks, boxes = coco.instances_from_label_map(label_map)
    np.testing.assert_array_equal(boxes, [[6, 4, 7, 5], [2, 1, 5, 3]])  # ordered by id
    assert masks.shape == (2, 6, 7) and masks[1].sum() == 6
    np.testing.assert_array_equal(coco.boxes_from_masks(np.zeros((1, 3, 3))), [[0, 0, 0, 0]])
    rle = coco.masks_to_rle(masks)
    np.testing.assert_array_equal(mask_utils.toBbox(rle), coco.xyxy_to_xywh(boxes))
    with pytest.raises(ValueError, match="2-D integer"):
        coco.instances_from_label_map(label_map.astype(float))


def test_crowd_regions_are_ignored_not_matched():
    gt = _gt([(5, 5, 15, 15), (30, 10, 50, 30)], [0, 0], is_crowd=np.array([False, True]))
    on_crowd = _pred([(5, 5, 15, 15), (32, 12, 48, 28)], [0.5, 0.9], [0, 0])
    alone = _pred([(5, 5, 15, 15)], [0.5], [0])
    # a detection inside a crowd region is neither a true nor a false positive
    assert coco.coco_metrics([gt], [on_crowd], NAMES) == coco.coco_metrics([gt], [alone], NAMES)
    assert coco.coco_metrics([gt], [alone], NAMES)["mask/AP"] == pytest.approx(1.0)
    no_masks = {k: v for k, v in alone.items() if k != "masks"}
    assert "mask/AP" not in coco.coco_metrics([gt], [no_masks], NAMES)
    with pytest.raises(ValueError, match=r"predictions \[1\] have no 'masks'"):
        coco.coco_metrics([gt, gt], [alone, no_masks], NAMES)
