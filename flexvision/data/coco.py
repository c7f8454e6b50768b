"""The COCO instance format, both ways: reading annotation files, and COCO box/mask AP.

One home for the format (Lin et al. 2014, https://cocodataset.org/#format-data): the instance
builder (:mod:`flexvision.data.instances`) reads users' COCO files through :func:`read_coco`,
and :func:`coco_metrics` writes ground truth and predictions as COCO json with RLE masks and
scores them with pycocotools' ``COCOeval`` (we never compute AP ourselves). Everything here is
NumPy + pycocotools, importable by the trainer, experiments and tests alike.

Conventions (DESIGN.md): boxes are (x1, y1, x2, y2) in pixels, a box covering pixel columns
``c0..c1`` has ``x1 = c0, x2 = c1 + 1`` (COCO's ``[x, y, w, h]`` is then ``[x1, y1, x2 - x1,
y2 - y1]``, as pycocotools' ``toBbox`` gives for a mask); masks are ``[N, H, W]`` full-image
binary arrays; labels are 0-based indices into the dataset's class names (COCO category ids
are only used inside json).

Edge cases, defined once here and tested in tests/test_data_coco.py:

* an image without any instance is a valid image: reading keeps it; in evaluation every
  prediction on it is a false positive (the image is registered in the ground truth).
* an annotation whose mask is empty (a degenerate polygon, an all-zero RLE): reading drops it
  (and logs how many); :func:`coco_metrics` rejects a ground-truth instance with an empty mask
  (ValueError), since no prediction could ever match it. A predicted empty mask is simply a
  prediction that matches nothing.
* a box outside the image: reading clips boxes to the image and raises ValueError for a box
  with nothing inside the image; :func:`coco_metrics` raises for such a ground-truth box and
  clips predicted boxes to the image, as detectors' post-processing does.
* a category the config does not know: reading with ``class_names`` raises ValueError naming
  it; :func:`coco_metrics` raises for a label outside ``range(len(class_names))``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from absl import logging

# COCOeval.stats indices of the summary figures we report (pycocotools/cocoeval.py summarize).
_STATS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5}


# ----------------------------------------------------------------------------- masks <-> boxes

def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight (x1, y1, x2, y2) pixel boxes of ``[N, H, W]`` binary masks, float32 ``[N, 4]``.

    A mask covering columns ``c0..c1`` and rows ``r0..r1`` gets ``(c0, r0, c1 + 1, r1 + 1)``;
    an empty mask gets all zeros.
    """
    masks = np.asarray(masks).astype(bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    boxes = np.zeros((len(masks), 4), np.float32)
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    for i in range(len(masks)):
        r, c = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if len(r):
            boxes[i] = (c[0], r[0], c[-1] + 1, r[-1] + 1)
    return boxes


def instances_from_label_map(label_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary masks ``[N, H, W]`` (bool) and boxes ``[N, 4]`` of an instance label image.

    ``label_map`` is ``[H, W]`` integers, 0 background and one id per instance (ids need not be
    contiguous); instances are ordered by id. Instances absent from the map do not appear.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"a label map must be a 2-D integer array, got shape {label_map.shape} "
                         f"and dtype {label_map.dtype}")
    ids = np.unique(label_map)
    ids = ids[ids != 0]
    masks = label_map[None] == ids[:, None, None]
    return masks, boxes_from_masks(masks)


def masks_to_rle(masks: np.ndarray) -> list[dict]:
    """COCO compressed RLEs (json-ready: ``counts`` as str) of ``[N, H, W]`` binary masks."""
    from pycocotools import mask as mask_utils

    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """(x1, y1, x2, y2) boxes to COCO's (x, y, width, height), same units."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


# ----------------------------------------------------------------------------- reading COCO files

def read_coco(annotation_file: str, class_names: Sequence[str] | None = None,
              ) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """Reads a COCO instances json into per-image records with decoded masks.

    Args:
      annotation_file: path of a COCO ``instances_*.json`` (images, annotations, categories;
        segmentations as polygons, uncompressed or compressed RLE).
      class_names: the classes to read, by category name, in label order. None: every category
        of the file, ordered by category id.

    Returns:
      ``(class_names, records)``: ``records`` iterates over the images in file order, decoding
      one image's masks at a time, each as ``{"id": int, "file_name": str, "height": int,
      "width": int, "boxes": [N, 4] float32 (x1, y1, x2, y2, clipped to the image), "labels":
      [N] int64, "masks": [N, H, W] bool, "is_crowd": [N] bool}``. Images without annotations
      are kept (N = 0). Categories and image references are checked before returning, boxes
      while iterating.

    Raises:
      ValueError: a category unknown to ``class_names``, a box with nothing inside its image,
        an annotation of an image the file does not list, or duplicate category names.
    """
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(annotation_file)
    categories = sorted(coco.dataset.get("categories", []), key=lambda c: c["id"])
    names_in_file = [c["name"] for c in categories]
    if len(set(names_in_file)) != len(names_in_file):
        raise ValueError(f"{annotation_file}: category names must be unique, got {names_in_file}")
    if class_names is None:
        class_names = names_in_file
    class_names = list(class_names)
    label_of = {}
    for category in categories:
        if category["name"] in class_names:
            label_of[category["id"]] = class_names.index(category["name"])
    image_ids = {image["id"] for image in coco.dataset.get("images", [])}
    for ann in coco.dataset.get("annotations", []):
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{annotation_file}: annotation {ann.get('id')} refers to image "
                             f"{ann['image_id']}, which is not in 'images'")
        if ann["category_id"] not in label_of:
            known = coco.cats.get(ann["category_id"], {}).get("name", "<not in 'categories'>")
            raise ValueError(
                f"{annotation_file}: annotation {ann.get('id')} has category_id "
                f"{ann['category_id']} ({known!r}), which the config does not know; its classes "
                f"are {class_names}. Add the category to class_names or remove its annotations.")
    return class_names, _image_records(coco, label_of, annotation_file)


def _image_records(coco, label_of: dict[int, int], annotation_file: str) -> Iterator[dict]:
    """Yields read_coco's per-image records, decoding masks one image at a time."""
    dropped = 0
    for image in coco.dataset.get("images", []):
        h, w = int(image["height"]), int(image["width"])
        boxes, labels, masks, crowd = [], [], [], []
        for ann in coco.imgToAnns.get(image["id"], []):
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            box = np.clip([x, y, x + bw, y + bh], 0, [w, h, w, h])
            if box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(
                    f"{annotation_file}: annotation {ann.get('id')} of image {image['id']} has "
                    f"bbox {ann['bbox']} (x, y, w, h), with nothing inside the {w}x{h} image. "
                    f"Fix or remove the annotation.")
            mask = coco.annToMask(ann).astype(bool)
            if not mask.any():
                dropped += 1
                continue
            boxes.append(box)
            labels.append(label_of[ann["category_id"]])
            masks.append(mask)
            crowd.append(bool(ann.get("iscrowd", 0)))
        yield {
            "id": int(image["id"]), "file_name": image.get("file_name", ""), "height": h,
            "width": w,
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int64),
            "masks": np.asarray(masks, bool).reshape(-1, h, w),
            "is_crowd": np.asarray(crowd, bool),
        }
    if dropped:
        logging.warning("%s: dropped %d annotation(s) whose segmentation covers no pixel",
                        annotation_file, dropped)


def write_coco(path: str, records: Sequence[Mapping[str, Any]], class_names: Sequence[str],
               ) -> dict:
    """Writes per-image records (as :func:`read_coco` returns) as a COCO instances json.

    Segmentations are written as compressed RLE, category ids are ``label + 1``. Returns the
    json dict.
    """
    dataset = _coco_ground_truth(records, class_names)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dataset, f)
    return dataset


def read_results(results_file: str) -> dict[int, dict[str, np.ndarray]]:
    """Reads a COCO *results* json (a list of detections, as ``COCO.loadRes`` takes and
    flexvision's detection evaluator writes to workdir/predictions/<split>_<ps>.json) into
    per-image predictions with decoded masks, each image's detections by descending score.

    Every detection needs ``image_id``, ``category_id`` (1-based: label = category_id - 1),
    ``score`` and ``segmentation`` (compressed or uncompressed RLE with its ``size`` [H, W]);
    ``bbox`` [x, y, w, h] is optional (default: the mask's tight box).

    Returns ``{image_id: {"boxes": [M, 4] float32 (x1, y1, x2, y2), "scores": [M] float32,
    "labels": [M] int64, "masks": [M, H, W] bool}}``. Raises ValueError for a file that is not
    a list, a detection missing one of those keys or with polygon segmentation, category ids
    below 1, and masks of different sizes within one image.
    """
    from pycocotools import mask as mask_utils

    with open(results_file, encoding="utf-8") as f:
        results = json.load(f)
    if not isinstance(results, list):
        raise ValueError(f"{results_file}: a COCO results file is a json list of detections, "
                         f"got a {type(results).__name__} (an annotation file? read it with "
                         f"read_coco)")
    per_image: dict[int, list] = {}
    for index, det in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "score", "segmentation")
                   if k not in det]
        if missing:
            raise ValueError(f"{results_file}: detection {index} lacks {missing}; BPR needs "
                             f"instance masks (segmentation as RLE) with their scores")
        rle = det["segmentation"]
        if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
            raise ValueError(f"{results_file}: detection {index} has a segmentation that is not "
                             f"an RLE dict with 'size' and 'counts' (polygons are not read)")
        if int(det["category_id"]) < 1:
            raise ValueError(f"{results_file}: detection {index} has category_id "
                             f"{det['category_id']}; COCO category ids are 1-based")
        if isinstance(rle["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(rle, *rle["size"])
        elif isinstance(rle["counts"], str):
            rle = dict(rle, counts=rle["counts"].encode("ascii"))
        per_image.setdefault(int(det["image_id"]), []).append(
            (float(det["score"]), int(det["category_id"]) - 1, det.get("bbox"),
             mask_utils.decode(rle).astype(bool)))
    out = {}
    for image_id, dets in per_image.items():
        dets.sort(key=lambda d: -d[0])
        sizes = {d[3].shape for d in dets}
        if len(sizes) > 1:
            raise ValueError(f"{results_file}: image {image_id} has masks of sizes "
                             f"{sorted(sizes)}; all masks of one image must have its size")
        masks = np.stack([d[3] for d in dets])
        boxes = boxes_from_masks(masks)
        for i, det in enumerate(dets):
            if det[2] is not None:
                x, y, w, h = (float(v) for v in det[2])
                boxes[i] = (x, y, x + w, y + h)
        out[image_id] = {"boxes": boxes, "scores": np.asarray([d[0] for d in dets], np.float32),
                         "labels": np.asarray([d[1] for d in dets], np.int64), "masks": masks}
    return out


# ----------------------------------------------------------------------------- evaluation

def _image_size(gt: Mapping[str, Any]) -> tuple[int, int]:
    if "image_size" in gt:
        h, w = (int(v) for v in np.asarray(gt["image_size"]).reshape(2))
        return h, w
    if "height" in gt and "width" in gt:
        return int(gt["height"]), int(gt["width"])
    masks = np.asarray(gt["masks"])
    return int(masks.shape[-2]), int(masks.shape[-1])


def _valid(entry: Mapping[str, Any], n: int) -> np.ndarray:
    valid = np.asarray(entry.get("valid", np.ones(n, bool))).astype(bool).reshape(-1)
    if len(valid) != n:
        raise ValueError(f"'valid' has {len(valid)} entries for {n} instances")
    return valid


def _crop_masks(masks: np.ndarray, h: int, w: int, what: str) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1] < h or masks.shape[2] < w:
        raise ValueError(f"{what} masks must be [N, H, W] covering the {h}x{w} image (padding "
                         f"beyond it is cropped), got shape {masks.shape}")
    return masks[:, :h, :w]


def _check_labels(labels: np.ndarray, num_classes: int, what: str):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ValueError(f"{what} has label(s) {sorted(set(bad.tolist()))} outside the "
                         f"{num_classes} known classes (labels are 0-based indices into "
                         f"class_names)")


def _coco_ground_truth(ground_truth: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                       ) -> dict:
    """COCO json dict of ground truth; image ids are ``gt['id']`` if given, else the index."""
    images, annotations = [], []
    for index, gt in enumerate(ground_truth):
        image_id = int(gt.get("id", index))
        h, w = _image_size(gt)
        boxes = np.asarray(gt["boxes"], np.float64).reshape(-1, 4)
        valid = _valid(gt, len(boxes))
        boxes = boxes[valid]
        labels = np.asarray(gt["labels"]).reshape(-1)[valid].astype(np.int64)
        masks = _crop_masks(gt["masks"], h, w, f"ground-truth image {image_id}")[valid]
        crowd = np.asarray(gt.get("is_crowd", np.zeros(len(valid), bool)), bool).reshape(-1)
        crowd = crowd[valid]
        _check_labels(labels, len(class_names), f"ground-truth image {image_id}")
        outside = (np.minimum(boxes[:, 2], w) <= np.maximum(boxes[:, 0], 0)) | (
            np.minimum(boxes[:, 3], h) <= np.maximum(boxes[:, 1], 0))
        if outside.any():
            raise ValueError(f"ground-truth image {image_id} ({w}x{h}) has box(es) with nothing "
                             f"inside the image: {boxes[outside].tolist()} (x1, y1, x2, y2)")
        areas = masks.astype(bool).sum(axis=(1, 2))
        if (areas == 0).any():
            raise ValueError(f"ground-truth image {image_id} has instance(s) "
                             f"{np.flatnonzero(areas == 0).tolist()} with an empty mask; no "
                             f"prediction can match them. Drop them (or mark them invalid).")
        image = {"id": image_id, "height": h, "width": w}
        if "file_name" in gt:
            image["file_name"] = str(gt["file_name"])
        images.append(image)
        for box, label, rle, area, is_crowd in zip(xyxy_to_xywh(boxes), labels,
                                                   masks_to_rle(masks), areas, crowd):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(label) + 1, "bbox": box.tolist(),
                                "area": float(area), "segmentation": rle,
                                "iscrowd": int(is_crowd)})
    if len({im["id"] for im in images}) != len(images):
        raise ValueError("ground-truth image ids must be unique")
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _coco_predictions(predictions: Sequence[Mapping[str, Any]], images: Sequence[dict],
                      num_classes: int, mask_threshold: float) -> tuple[list, list]:
    """COCO result lists (boxes, masks) of per-image predictions aligned with ``images``."""
    box_results, mask_results = [], []
    for pred, image in zip(predictions, images):
        h, w, image_id = image["height"], image["width"], image["id"]
        boxes = np.asarray(pred["boxes"], np.float64).reshape(-1, 4)
        valid = _valid(pred, len(boxes))
        boxes = boxes[valid]
        scores = np.asarray(pred["scores"], np.float64).reshape(-1)[valid]
        labels = np.asarray(pred["labels"]).reshape(-1)[valid].astype(np.int64)
        _check_labels(labels, num_classes, f"predictions for image {image_id}")
        boxes = np.clip(boxes, 0, [w, h, w, h])
        for box, score, label in zip(xyxy_to_xywh(boxes), scores, labels):
            box_results.append({"image_id": image_id, "category_id": int(label) + 1,
                                "bbox": box.tolist(), "score": float(score)})
        if "masks" in pred:
            masks = _crop_masks(pred["masks"], h, w, f"predicted image {image_id}")[valid]
            if np.issubdtype(masks.dtype, np.floating):
                masks = masks >= mask_threshold
            for rle, score, label in zip(masks_to_rle(masks), scores, labels):
                mask_results.append({"image_id": image_id, "category_id": int(label) + 1,
                                     "segmentation": rle, "score": float(score)})
    return box_results, mask_results


def _evaluate(coco_gt, results: list, iou_type: str, max_detections: int) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    if not results:  # loadRes cannot take an empty list: nothing detected scores 0
        return {name: 0.0 for name in _STATS}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.params.maxDets = [1, 10, max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where an area range has no ground truth; we keep it (documented).
    return {name: float(evaluator.stats[i]) for name, i in _STATS.items()}


def coco_metrics(ground_truth: Sequence[Mapping[str, Any]],
                 predictions: Sequence[Mapping[str, Any]], class_names: Sequence[str], *,
                 max_detections: int = 100, mask_threshold: float = 0.5) -> dict[str, float]:
    """COCO box and mask AP of instance predictions, by pycocotools' COCOeval.

    Args:
      ground_truth: one dict per image: ``boxes`` [N, 4] (x1, y1, x2, y2 pixels), ``labels``
        [N] (0-based), ``masks`` [N, H', W'] binary, optional ``valid`` [N] (padding mask),
        ``is_crowd`` [N] (COCO crowd regions: ignored, not matched), ``id`` (default: the
        index) and ``image_size`` (H, W) (default: the masks' H', W'; masks may be padded
        beyond it, padding is cropped off).
      predictions: one dict per image, in the same order: ``boxes`` [M, 4], ``scores`` [M],
        ``labels`` [M], optional ``masks`` [M, H', W'] (binary, or float probabilities
        binarised at ``mask_threshold``) and ``valid`` [M]. Boxes are clipped to the image.
      class_names: the dataset's classes; COCO category id = label + 1.
      max_detections: detections per image considered (COCO's maxDets; 100 by default).
      mask_threshold: threshold for float masks.

    Returns:
      ``{"box/AP", "box/AP50", "box/AP75", "box/APs", "box/APm", "box/APl"}`` and the same for
      ``mask/`` (when the predictions have masks), floats in [0, 1]; the area-range APs are
      -1 where no ground truth falls in that range (COCOeval's convention). With no prediction
      at all every AP is 0.

    Raises:
      ValueError: on mismatched lengths, masks for some images only, no ground-truth
        instance at all, labels outside
        ``class_names``, ground-truth boxes with nothing inside the image, or ground-truth
        masks that are empty (see the module docstring).
    """
    from pycocotools.coco import COCO

    if len(ground_truth) != len(predictions):
        raise ValueError(f"got {len(ground_truth)} ground-truth images but {len(predictions)} "
                         f"prediction entries; give one prediction dict per image (empty "
                         f"arrays for no detection)")
    if not class_names:
        raise ValueError("class_names must name at least one class")
    with_masks = ["masks" in pred for pred in predictions]
    if any(with_masks) and not all(with_masks):
        raise ValueError(f"predictions {[i for i, m in enumerate(with_masks) if not m]} have no "
                         f"'masks' while others do; give masks for every image (an empty "
                         f"[0, H, W] array where nothing is detected) or for none")
    dataset = _coco_ground_truth(ground_truth, class_names)
    if not dataset["annotations"]:
        raise ValueError("the ground truth has no instance at all: COCO AP is undefined; "
                         "evaluate on images that contain instances")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
    box_results, mask_results = _coco_predictions(predictions, dataset["images"],
                                                  len(class_names), mask_threshold)
    metrics = {f"box/{k}": v for k, v in _evaluate(coco_gt, box_results, "bbox",
                                                   max_detections).items()}
    if all(with_masks):
        metrics.update({f"mask/{k}": v for k, v in _evaluate(coco_gt, mask_results, "segm",
                                                             max_detections).items()})
    return metrics
