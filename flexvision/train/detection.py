"""Detection mode of the trainer: Mask R-CNN on any flexvision backbone (``config.task =
"detection"``, ``config.model.name`` a detector of ``flexvision.detection.list_detectors()``).

The ordinary loop (:func:`flexvision.train.trainer.train_and_evaluate`) runs it: the
:class:`~flexvision.train.objective.Objective` built here brings the batch loss (the model's
own five Mask R-CNN losses from the targets in the batch, ``engine.detection.batch_loss``), the
host-side batch adaptor (``engine.detection.model_batch``), the COCO evaluator
(``engine.detection.DetectionEvaluator``) and the final files. Checkpoints, resume, sharding,
the NaN guard, SIGTERM and the random patch size per step (``config.flexi`` for FlexiViT-style
backbones) are the loop's, unchanged.

Final files in the workdir, besides the loop's checkpoints/metrics:
  final_eval.json                   {"step", "split", the first split's table, "splits"}; a
                                    table is {"box_AP", ..., "mask_AP75", "images_per_second"},
                                    each {"<patch size or 'default'>": value}.
  final_eval.png                    mask AP / AP50 and images/s vs patch size (>= 2 sizes).
  final_overlay.png                 the first eval split's first image: ground truth, then the
                                    predicted masks (score >= ``config.eval.overlay_score``,
                                    default 0.5) at each eval patch size, top to bottom.
  predictions/<split>_<ps>.json     COCO results list per split and patch size ("default"
                                    without patch sizes): image_id, category_id (label + 1),
                                    bbox [x, y, w, h] and segmentation (compressed RLE) at the
                                    original image size, score.
  predictions/<split>_ground_truth.json   the split's COCO ground truth (coco.write_coco).
"""

from __future__ import annotations

import json
import os

import jax

from flexvision.data import coco, overlay
from flexvision.engine import detection, evaluation
from flexvision.train.objective import Objective


def detection_objective(config, model, mesh) -> Objective:
    """The detection objective of ``config`` for the detector ``model`` on ``mesh``."""
    evaluator = detection.DetectionEvaluator(model, config, mesh)
    overlay_score = float(config.eval.get("overlay_score", 0.5))

    def write_final(results: dict, workdir: str, step: int) -> dict:
        final = evaluation.write_final(results, workdir, step, plot=detection.plot_ap_and_speed)
        if jax.process_index() == 0:
            write_predictions(evaluator.last, workdir)
            first = next(iter(results))
            write_overlay(evaluator.last[first], os.path.join(workdir, "final_overlay.png"),
                          overlay_score)
        return final

    return Objective("detection", None, evaluator, batch_loss=detection.batch_loss,
                     batch_fn=detection.model_batch, flat_metrics=evaluation.flat_by_patch_size,
                     format_table=detection.format_table, write_final=write_final,
                     headline="COCO AP (%)")


def write_predictions(last: dict[str, dict], workdir: str) -> list[str]:
    """Writes predictions/<split>_<ps>.json and predictions/<split>_ground_truth.json of every
    evaluated split (``DetectionEvaluator.last``); returns the paths."""
    directory = os.path.join(workdir, "predictions")
    os.makedirs(directory, exist_ok=True)
    paths = []
    for split, run in last.items():
        path = os.path.join(directory, f"{split}_ground_truth.json")
        coco.write_coco(path, run["ground_truth"], run["class_names"])
        paths.append(path)
        for ps, per_image in run["predictions"].items():
            results = [entry for record, prediction in zip(run["ground_truth"], per_image)
                       for entry in detection.coco_results(prediction, record["id"])]
            path = os.path.join(directory, f"{split}_{ps}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(results, f)
            paths.append(path)
    return paths


def write_overlay(run: dict, path: str, min_score: float = 0.5) -> str:
    """The split's first image with its ground truth, then with the predicted masks of score
    >= ``min_score`` at each evaluated patch size (data/overlay.py), stacked top to bottom."""
    image, truth = run["image"], run["ground_truth"][0]
    panels = [overlay.overlay_instances(image, truth["masks"])]
    for per_image in run["predictions"].values():
        prediction = per_image[0]
        panels.append(overlay.overlay_instances(
            image, prediction["masks"][prediction["scores"] >= min_score]))
    zoom = max(1, 512 // max(image.shape[:2]))
    return overlay.save_png(path, panels, zoom=zoom)
