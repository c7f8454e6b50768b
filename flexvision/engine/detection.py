"""Mask R-CNN in the engine: the training loss of a batch, the jitted inference step and the
COCO evaluator (box and mask AP by pycocotools, images/s) per patch size.

Batches come from the tf.data pipeline with the ``det_*`` ops (flexvision/data/ops.py): after
``det_pad(size, K)`` an example holds ``image`` [H, W, C], ``image_size`` [2] (unpadded h, w),
``boxes`` [K, 4] (x1, y1, x2, y2 pixels), ``labels`` [K] (0-based class indices), ``valid`` [K],
``masks`` [K, H, W] uint8, ``is_crowd`` [K] and ``image/id``. :func:`model_batch` turns such a
(host) batch into what ``MaskRCNN`` reads: labels 1-based (0 is the background), crowd regions
left out of the targets (not matched, as COCO's evaluation ignores them), only the keys the
step needs (so no int64 ids travel to the devices).

``config.eval`` keys of a detection run:
  pp            deterministic preprocessing ending in ``det_pad`` (eval batches must have one
                shape); with ``det_resize``, predictions are mapped back to each image's
                original size (boxes scaled per axis, masks pasted at the original size,
                torchvision's ``GeneralizedRCNNTransform.postprocess``).
  splits        splits to evaluate; the first one is the headline table.
  patch_sizes   patch sizes (FlexiViT-style backbones); None/[]: the model as built.
  batch_size    global eval batch size (padded; padding rows are ignored).
  timing_repeats  each batch's inference is run this many times and the median time counts
                for images/s (default 1; predictions come from the first run).
  mask_threshold  probability at which pasted masks are binarised (default 0.5).
  every         periodic evals every this many steps (0: only at the end).

Results: ``{split: {"box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75",
"images_per_second"}}``, each ``{"<patch size or 'default'>": value}`` (pycocotools' numbers
from :func:`flexvision.data.coco.coco_metrics`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flexvision.data import coco, pipeline
from flexvision.detection.masks import paste_masks
from flexvision.detection.maskrcnn import LOSS_KEYS
from flexvision.engine import evaluation, sharding
from flexvision.engine.step import apply_train, model_kwargs

METRICS = ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")
SPEED = "images_per_second"
TRAIN_KEYS = ("image", "image_size", "boxes", "labels", "valid", "masks")
DEFAULT = "default"


def _key(patch_size) -> str:
    return DEFAULT if patch_size is None else str(patch_size)


def model_batch(batch: dict[str, np.ndarray], keys=TRAIN_KEYS) -> dict[str, np.ndarray]:
    """A host batch of ``det_pad`` examples as the detector's inputs and targets.

    Keeps ``keys``; ``labels`` become 1-based where valid (0 elsewhere), crowd instances are
    marked invalid. KeyError names a missing key (the pp must end with ``det_pad``).
    """
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"detection batches need {list(keys)}; missing {missing} (has "
                       f"{sorted(batch)}). The preprocessing must run 'det_instances' and end "
                       f"with 'det_pad(size, max_instances)'")
    out = {k: batch[k] for k in keys}
    if "valid" in out:
        valid = np.asarray(batch["valid"], bool)
        if "is_crowd" in batch:
            valid = valid & ~np.asarray(batch["is_crowd"], bool)
        out["valid"] = valid
        if "labels" in out:
            out["labels"] = np.where(valid, np.asarray(batch["labels"], np.int32) + 1,
                                     0).astype(np.int32)
    if "image_size" in out:
        out["image_size"] = np.asarray(out["image_size"], np.int32)
    return out


def batch_loss(model, variables: dict, batch: dict, rngs: dict, patch_size: int | None
               ) -> tuple[jax.Array, dict[str, jax.Array], dict]:
    """Mask R-CNN's training loss of a :func:`model_batch` batch (an ``engine.step.BatchLoss``):
    (L_rpn_cls + L_rpn_box + L_cls + L_box + L_mask, the five terms, batch-stat updates)."""
    targets = {k: batch[k] for k in ("boxes", "labels", "valid", "masks")}
    out, updates = apply_train(model, variables, batch["image"], batch["image_size"],
                               targets=targets, rngs=rngs, **model_kwargs(model, patch_size))
    return out["loss"], {k: out[k] for k in LOSS_KEYS if k in out}, updates


def make_inference_step(model, patch_size: int | None = None) -> Callable[[dict, dict], dict]:
    """(variables, {"image", "image_size"}) -> the detector's padded eval outputs {'boxes'
    (B, D, 4) input pixels, 'scores', 'labels' (1-based), 'valid', 'masks' (B, D, M, M)}."""
    kwargs = model_kwargs(model, patch_size)

    def inference(variables: dict, batch: dict) -> dict:
        return model.apply(variables, batch["image"], batch["image_size"], train=False, **kwargs)

    return inference


_paste = jax.jit(paste_masks, static_argnums=2)  # one executable per (D, M, H0, W0)


def original_size_predictions(out: dict[str, np.ndarray], input_size, original_size,
                              mask_threshold: float = 0.5) -> dict[str, np.ndarray]:
    """One image's valid detections at its original size, for ``coco.coco_metrics``.

    ``out``: the inference step's outputs of this image (boxes (D, 4) in the pixels of the
    model's input, an image of ``input_size`` (h, w)); boxes are scaled per axis by
    original / input size and the (D, M, M) masks pasted at ``original_size``
    (``detection.masks.paste_masks``) and binarised at ``mask_threshold``. Returns {'boxes'
    (n, 4), 'scores' (n,), 'labels' (n,) 0-based, 'masks' (n, H0, W0) bool}, highest score
    first (as the detector orders them).
    """
    h0, w0 = (int(v) for v in original_size)
    hi, wi = (int(v) for v in input_size)
    scale = np.asarray([w0 / wi, h0 / hi, w0 / wi, h0 / hi], np.float32)
    boxes = np.asarray(out["boxes"], np.float32) * scale
    pasted = _paste(jnp.asarray(out["masks"], jnp.float32), jnp.asarray(boxes), (h0, w0))
    valid = np.asarray(out["valid"], bool)
    masks = np.asarray(pasted)[valid] >= mask_threshold
    return {"boxes": boxes[valid], "scores": np.asarray(out["scores"], np.float32)[valid],
            "labels": np.asarray(out["labels"], np.int64)[valid] - 1, "masks": masks}


def coco_results(prediction: dict[str, np.ndarray], image_id: int) -> list[dict]:
    """One image's predictions as COCO *results* entries: image_id, category_id (label + 1),
    bbox [x, y, w, h], score and segmentation (compressed RLE, counts a str)."""
    rles = coco.masks_to_rle(prediction["masks"]) if len(prediction["masks"]) else []
    return [{"image_id": int(image_id), "category_id": int(label) + 1,
             "bbox": [float(v) for v in box], "score": float(score), "segmentation": rle}
            for box, score, label, rle in zip(coco.xyxy_to_xywh(prediction["boxes"]),
                                               prediction["scores"], prediction["labels"], rles)]


def ground_truth_records(input_config, split: str) -> tuple[list[dict], list[str], np.ndarray]:
    """(records, class names, first image) of ``split`` at the images' original size, read
    from the dataset itself (not through the eval pp): per image {'id', 'height', 'width',
    'boxes', 'labels' (0-based), 'masks' [N, H, W] bool, 'is_crowd'} as coco.write_coco and
    coco.coco_metrics read them; the first image [H, W, C] uint8 is kept for pictures."""
    import tensorflow_datasets as tfds

    builder = pipeline.get_builder(input_config.name, input_config.get("data_dir"),
                                   input_config.get("coco"))
    class_names = list(builder.info.features["objects"]["label"].names)
    records, first_image = [], None
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        image = example["image"]
        if first_image is None:
            first_image = image
        objects = example["objects"]
        h, w = image.shape[:2]
        records.append({"id": int(example["image/id"]), "height": int(h), "width": int(w),
                        "boxes": np.asarray(objects["box"], np.float32).reshape(-1, 4),
                        "labels": np.asarray(objects["label"], np.int64).reshape(-1),
                        "masks": np.asarray(objects["mask"], bool).reshape(-1, h, w),
                        "is_crowd": np.asarray(objects["is_crowd"], bool).reshape(-1)})
    return records, class_names, first_image


class DetectionEvaluator:
    """COCO box/mask AP and images/s of a detector on ``config.eval.splits`` at every eval
    patch size, one cached jitted inference step per patch size (see the module docstring).

    After :meth:`run`, ``self.last[split]`` holds {'ground_truth': records, 'class_names',
    'image': the split's first image, 'predictions': {"<ps>": per-image predictions at the
    original size}} for writing files and pictures.
    """

    def __init__(self, model, config, mesh, patch_sizes=None, splits=None):
        self.model, self.mesh = model, mesh
        self.input_config, self.eval_config = config.input, config.eval
        chosen = patch_sizes if patch_sizes is not None else self.eval_config.get("patch_sizes")
        self.patch_sizes = [int(p) for p in chosen] if chosen else [None]
        self.splits = list(splits or self.eval_config.get("splits") or ["test"])
        self.repeats = max(1, int(self.eval_config.get("timing_repeats", 1) or 1))
        self.mask_threshold = float(self.eval_config.get("mask_threshold", 0.5))
        self._steps: dict[Any, Any] = {}
        self._truth: dict[str, tuple] = {}
        self.last: dict[str, dict] = {}

    def _compiled(self, patch_size, variables, batch):
        shapes = tuple(sorted((k, v.shape) for k, v in batch.items()))
        key = (patch_size, shapes)
        if key not in self._steps:
            step = jax.jit(make_inference_step(self.model, patch_size),
                           out_shardings=sharding.replicated(self.mesh))
            self._steps[key] = step.lower(variables, batch).compile()
        return self._steps[key]

    def ground_truth(self, split: str) -> tuple:
        """:func:`ground_truth_records` of ``split``, read once."""
        if split not in self._truth:
            self._truth[split] = ground_truth_records(self.input_config, split)
        return self._truth[split]

    def evaluate_split(self, variables, split: str) -> dict:
        records, class_names, first_image = self.ground_truth(split)
        by_id = {r["id"]: r for r in records}
        predictions = {_key(p): {} for p in self.patch_sizes}
        seconds = {_key(p): 0.0 for p in self.patch_sizes}
        images = 0
        for host_batch in pipeline.eval_batches(self.input_config, self.eval_config.pp, split,
                                                self.eval_config.batch_size):
            rows = np.flatnonzero(host_batch["_mask"] > 0)
            images += len(rows)
            ids = host_batch["image/id"]
            sizes = host_batch["image_size"]
            batch = sharding.global_batch(model_batch(host_batch, ("image", "image_size")),
                                          self.mesh)
            for patch_size in self.patch_sizes:
                step = self._compiled(patch_size, variables, batch)
                times, out = [], None
                for _ in range(self.repeats):
                    start = time.perf_counter()
                    result = jax.block_until_ready(step(variables, batch))
                    times.append(time.perf_counter() - start)
                    out = result if out is None else out
                seconds[_key(patch_size)] += statistics.median(times)
                out = jax.device_get(out)
                for row in rows:
                    record = by_id.get(int(ids[row]))
                    if record is None:
                        raise ValueError(f"eval example with image/id {int(ids[row])} is not in "
                                         f"split {split!r} of the dataset")
                    predictions[_key(patch_size)][record["id"]] = original_size_predictions(
                        {k: v[row] for k, v in out.items()}, sizes[row],
                        (record["height"], record["width"]), self.mask_threshold)
        table: dict[str, dict] = {name: {} for name in (*METRICS, SPEED)}
        ordered = {}
        max_detections = max(100, int(getattr(self.model.roi_heads, "detections_per_img", 100)))
        for ps, by_image in predictions.items():
            missing = [r["id"] for r in records if r["id"] not in by_image]
            if missing:
                raise ValueError(f"split {split!r}: the eval pipeline gave no example for image "
                                 f"id(s) {missing[:5]}")
            ordered[ps] = [by_image[r["id"]] for r in records]
            metrics = coco.coco_metrics(records, ordered[ps], class_names,
                                        max_detections=max_detections)
            for name in METRICS:
                kind, ap = name.split("_")
                table[name][ps] = metrics[f"{kind}/{ap}"]
            table[SPEED][ps] = images / max(seconds[ps], 1e-9)
        self.last[split] = {"ground_truth": records, "class_names": class_names,
                            "image": first_image, "predictions": ordered}
        return table

    def run(self, variables) -> dict[str, dict]:
        """Tables for every configured split."""
        return {split: self.evaluate_split(variables, split) for split in self.splits}


def format_table(table: dict, title: str = "") -> str:
    """A detection table as aligned text: one row per patch size, AP columns in %, images/s."""
    header = ["patch size", *(m.replace("_", " ") for m in METRICS), "images/s"]
    rows = [header]
    for ps in table[METRICS[0]]:
        rows.append([ps, *(f"{100 * table[m][ps]:.1f}" for m in METRICS),
                     f"{table[SPEED][ps]:.2f}"])
    return evaluation.aligned_text(rows, title)


def plot_ap_and_speed(table: dict, path: str, title: str = "") -> bool:
    """Mask AP, mask AP50 (left axis) and images/s (right axis) vs patch size, saved to
    ``path``; draws nothing (returns False) with fewer than two numeric patch sizes."""
    sizes = [ps for ps in table["mask_AP"] if ps.isdigit()]
    if len(sizes) < 2:
        return False
    from matplotlib.figure import Figure

    xs = [int(ps) for ps in sizes]
    fig = Figure(figsize=(5.5, 3.5), dpi=120)
    ax = fig.subplots()
    for name, marker in (("mask_AP", "o"), ("mask_AP50", "s")):
        ax.plot(xs, [100 * table[name][ps] for ps in sizes], marker=marker,
                label=name.replace("_", " "))
    ax.set_xlabel("patch size")
    ax.set_ylabel("mask AP (%)")
    ax.set_xticks(xs)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    speed = ax.twinx()
    speed.plot(xs, [table[SPEED][ps] for ps in sizes], color="tab:gray", marker="^",
               linestyle="--", label="images/s")
    speed.set_ylabel("images/s (jitted inference)")
    speed.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = speed.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    return True
