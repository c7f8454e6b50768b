r"""BPR on the real nuclei image (issue 18, item 4): coarse masks from degraded ground truth, or
from a detector's COCO results refined by a refiner trained through the trainer.

Data: stardist's 512x512 nuclei image and label map (``flexvision.data.instances``), split as the
nuclei dataset splits it: rows above ``512 - eval_rows`` train, rows below are held out.

Default mode (degraded ground truth, one refiner per seed): the coarse masks are the ground
truth degraded as ``detection/bpr_data.degrade_mask`` does, at the strength of the
``flexvision_bpr_patches/nuclei`` dataset (1/2..1/4 resolution, dilation or erosion by up to
1 px: nuclei are ~10 px in radius); the training region gets ``copies`` independent
degradations. The refiner of configs/bpr_hrnet18s_nuclei.py (its model, pp ops, loss and
optimizer: experiments/bpr_synthetic.py ``train_refiner``) is trained on their boundary patches
and refines the held-out coarse masks. Reported per seed (the seed draws the degradations, the
init, the batches and their augmentation): mean Boundary IoU (width 2 px; the paper's 2 % of the
diagonal is 11 px, more than a nucleus' radius) and mask IoU per instance, and COCO mask AP
(pycocotools) of the coarse and the refined masks as predictions (score 1 each; instances whose
coarse mask vanished are dropped from both).

    python -m experiments.bpr_nuclei --outdir workdirs/bpr_nuclei --seeds 0 1 2

Measured with the defaults (8 degraded copies of the 384x512 training region, 4.8k boundary
patches; 300 steps of batch 32; patch 16 -> network 32; 36 held-out nuclei; 2 CPU cores shared
with other jobs (load ~12), 492 s for 3 seeds; docs/figures/bpr_nuclei.json and
bpr_nuclei_overlay.png, seed 0: ground truth / coarse / refined): Boundary IoU 0.398 / 0.451 /
0.417 (coarse) -> 0.500 / 0.538 / 0.522 (refined), gain +0.098 +- 0.008 (std over seeds 0, 1,
2); mask IoU +0.042 +- 0.010; COCO mask AP 0.549 / 0.579 / 0.483 -> 0.675 / 0.633 / 0.635, gain
+0.111 +- 0.042 (AP75 +0.26 +- 0.13). The coarse masks are degraded ground truth, not a
detector's output: the gain measured here is the refiner's on that kind of error.

Detector mode: a refiner workdir of configs/bpr_hrnet18s_nuclei.py and the COCO results of a
detection run (``workdir/predictions/<split>_<ps>.json``, written by the detection evaluator
with ``<split>_ground_truth.json`` next to it) -> :func:`refine_predictions`: mask AP of every
prediction and Boundary IoU / mask IoU of the confident ones matched to a nucleus, before and
after refinement, and an overlay (bpr_nuclei_maskrcnn.json / _overlay.png in ``--outdir``)::

    python -m flexvision.train --config configs/bpr_hrnet18s_nuclei.py --workdir /tmp/bpr
    python -m flexvision.train --config configs/maskrcnn_hrnet_nuclei.py --workdir /tmp/mrcnn
    python -m experiments.bpr_nuclei --outdir docs/figures --refiner_workdir /tmp/bpr \
        --coarse_predictions /tmp/mrcnn/predictions/test_default.json

Measured (docs/figures/bpr_nuclei_maskrcnn.json and _overlay.png): the Mask R-CNN of
configs/maskrcnn_flexivit_nuclei.py (600 steps; mask AP 0.420 at patch size 8, 34 predicted
masks on the held-out region) refined by three refiners of configs/bpr_hrnet18s_nuclei.py
(seeds 0, 1, 2; ~1 min of training each): mask AP 0.420 -> 0.456 / 0.453 / 0.437, +0.029 +-
0.008 (AP75 +0.128 +- 0.026); Boundary IoU of the 26 nuclei matched by a prediction of score
>= 0.5, 0.369 -> 0.441 / 0.441 / 0.423, +0.066 +- 0.008; mask IoU +0.025 +- 0.003. At patch
sizes 4 and 16: mask AP +0.021 +- 0.007 and +0.044 +- 0.005, Boundary IoU +0.063 +- 0.005 and
+0.071 +- 0.002. One detector run: the spread is the refiners', not the detector's.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from experiments import bpr_synthetic as synthetic
from flexvision.data import coco, instances, overlay
from flexvision.detection import boundary, bpr, bpr_data
from flexvision.engine import state

PATCH_SIZE = bpr_data.NUCLEI.patch_size
NETWORK_SIZE = bpr_data.NUCLEI.network_size
DEGRADE = {"factors": bpr_data.NUCLEI.degrade_factors, "max_radius": bpr_data.NUCLEI.max_radius}


def regions(eval_rows: int = 128):
    """(train, test): (RGB image, gt masks [N, H, W] bool) of the two regions."""
    image, labels = instances.stardist_nuclei()
    split = image.shape[0] - eval_rows
    out = []
    for rows in (slice(0, split), slice(split, None)):
        masks, _ = coco.instances_from_label_map(labels[rows])
        out.append((np.repeat(image[rows, :, None], 3, axis=-1), masks))
    return out


def _degrade(gt, rng):
    return np.stack([bpr_data.degrade_mask(m, rng, **DEGRADE) for m in gt])


def _as_predictions(masks, keep):
    masks = masks[keep].astype(bool)
    return {"boxes": coco.boxes_from_masks(masks), "scores": np.ones(len(masks)),
            "labels": np.zeros(len(masks), np.int64), "masks": masks}


def run(outdir: str, seeds=(0, 1, 2), *, copies: int = 8, steps: int = 300,
        batch_size: int = 32, lr: float = 0.05, eval_rows: int = 128) -> dict:
    """Trains and evaluates one refiner per seed; writes bpr_nuclei.json and an overlay PNG per
    seed in ``outdir``."""
    (train_image, train_gt), (test_image, test_gt) = regions(eval_rows)
    ground_truth = [{"boxes": coco.boxes_from_masks(test_gt), "labels":
                     np.zeros(len(test_gt), np.int64), "masks": test_gt}]
    per_seed = {}
    started = time.time()
    os.makedirs(outdir, exist_ok=True)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        train_split = [(train_image, train_gt, _degrade(train_gt, rng)) for _ in range(copies)]
        test_coarse = _degrade(test_gt, rng)
        model, variables, losses, patches = synthetic.train_refiner(
            train_split, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            patch_size=PATCH_SIZE, network_size=NETWORK_SIZE)
        result = synthetic.evaluate(
            model, variables, [(test_image, test_gt, test_coarse)],
            os.path.join(outdir, f"bpr_nuclei_overlay_seed{seed}.png"),
            patch_size=PATCH_SIZE, network_size=NETWORK_SIZE)
        refined = result.pop("refined")[0]
        keep = test_coarse.any(axis=(1, 2))
        for name, masks in (("coarse", test_coarse), ("refined", refined)):
            metrics = coco.coco_metrics(ground_truth, [_as_predictions(masks, keep)], ["nucleus"])
            result[f"{name}_mask_AP"] = metrics["mask/AP"]
            result[f"{name}_mask_AP75"] = metrics["mask/AP75"]
        result.update(train_patches=patches, first_loss=losses[0],
                      last_loss=float(np.mean(losses[-10:])),
                      vanished_coarse_masks=int((~keep).sum()))
        per_seed[int(seed)] = result

    def spread(key):
        gains = [r[f"refined_{key}"] - r[f"coarse_{key}"] for r in per_seed.values()]
        return float(np.mean(gains)), float(np.std(gains))

    table = {"experiment": "bpr_nuclei", "eval_rows": eval_rows,
             "held_out_instances": int(len(test_gt)), "patch_size": PATCH_SIZE,
             "network_size": NETWORK_SIZE, "degrade": DEGRADE, "copies": copies, "steps": steps,
             "batch_size": batch_size, "lr": lr, "boundary_width": synthetic.BOUNDARY_WIDTH,
             "per_seed": per_seed, "seconds": round(time.time() - started, 1)}
    for key in ("boundary_iou", "mask_iou", "mask_AP", "mask_AP75"):
        table[f"{key}_gain_mean"], table[f"{key}_gain_std"] = spread(key)
    with open(os.path.join(outdir, "bpr_nuclei.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, indent=2)
    return table


# ------------------------------------------------------------------------------------------------
# A refiner trained by the trainer (configs/bpr_hrnet18s_nuclei.py) on a detector's masks


def nuclei_image(split: str, image_id: int, eval_rows: int = 128) -> np.ndarray:
    """The RGB uint8 pixels of the nuclei dataset's example ``image_id`` of ``split``
    (``flexvision.data.instances``: tile index in train, 0 for the one held-out image)."""
    image, _ = instances.stardist_nuclei()
    layout = instances.InstancesConfig(name="layout", eval_rows=eval_rows)
    crops = instances.nuclei_crops(layout, *image.shape)[split]
    if not 0 <= image_id < len(crops):
        raise ValueError(f"image_id {image_id} is not an example of the nuclei {split!r} split "
                         f"({len(crops)} images)")
    y, x, h, w = crops[image_id]
    return np.repeat(image[y:y + h, x:x + w, None], 3, axis=-1)


def ground_truth_path(predictions: str) -> str:
    """``<dir>/<split>_ground_truth.json`` next to ``<dir>/<split>_<ps>.json`` (INTERFACE of the
    detection evaluator's predictions)."""
    directory, name = os.path.split(predictions)
    return os.path.join(directory, f"{name.rsplit('_', 1)[0]}_ground_truth.json")


def match_instances(gt: np.ndarray, pred: np.ndarray, scores: np.ndarray,
                    iou_threshold: float = 0.5) -> list[tuple[int, int]]:
    """(gt index, pred index) pairs: predictions by descending score, each matched to the
    unmatched ground-truth instance of highest mask IoU if it is >= ``iou_threshold`` (COCO's
    greedy matching at one threshold)."""
    if not len(gt) or not len(pred):
        return []
    gt = gt.reshape(len(gt), -1).astype(np.float32)
    pred = pred.reshape(len(pred), -1).astype(np.float32)
    inter = pred @ gt.T
    union = pred.sum(1)[:, None] + gt.sum(1)[None, :] - inter
    iou = inter / np.maximum(union, 1.0)
    pairs, taken = [], set()
    for p in np.argsort(-scores, kind="stable"):
        candidates = [(iou[p, g], -g) for g in range(len(gt)) if g not in taken]
        if candidates:
            best, g = max(candidates)  # ties: the lower ground-truth index
            g = -g
            if best >= iou_threshold:
                pairs.append((int(g), int(p)))
                taken.add(g)
    return pairs


def refine_predictions(refiner_workdir: str, predictions: str, outdir: str, *,
                       ground_truth: str | None = None, score_threshold: float = 0.5,
                       eval_rows: int = 128) -> dict:
    """Refines every predicted mask of a COCO results file (INTERFACE: the detection
    evaluator's ``workdir/predictions/<split>_<ps>.json``) with the refiner trained in
    ``refiner_workdir`` (``engine.state.load_workdir``; BPR's patch geometry of
    ``bpr_data.NUCLEI``, the data it was trained on) and scores coarse and refined masks against
    the split's ground truth (``<split>_ground_truth.json`` next to it by default): COCO mask AP
    (every prediction, its score) and, over the predictions with score >= ``score_threshold``
    matched to a ground-truth nucleus at mask IoU >= 0.5 (the same pairs for both), mean
    Boundary IoU and mask IoU. Writes bpr_nuclei_maskrcnn.json and bpr_nuclei_maskrcnn_overlay.png
    (the first image: ground truth / coarse / refined, predictions above the threshold) to
    ``outdir``; returns the json's table."""
    geometry = bpr_data.NUCLEI
    split = os.path.basename(predictions).rsplit("_", 1)[0]
    config, model, variables, step = state.load_workdir(refiner_workdir)
    class_names, records = coco.read_coco(ground_truth or ground_truth_path(predictions))
    detections = coco.read_results(predictions)
    started = time.time()
    gt_list, coarse_list, refined_list = [], [], []
    boundary_scores = {"coarse_boundary_iou": [], "refined_boundary_iou": [],
                       "coarse_mask_iou": [], "refined_mask_iou": []}
    os.makedirs(outdir, exist_ok=True)
    for index, record in enumerate(records):
        image = nuclei_image(split, record["id"], eval_rows)
        if image.shape[:2] != (record["height"], record["width"]):
            raise ValueError(f"image {record['id']} of the nuclei {split!r} split is "
                             f"{image.shape[:2]}, the ground truth says "
                             f"{(record['height'], record['width'])}: another eval_rows?")
        det = detections.get(record["id"])
        if det is None:
            det = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                   "labels": np.zeros(0, np.int64),
                   "masks": np.zeros((0,) + image.shape[:2], bool)}
        refined = (bpr.refine(image, det["masks"], variables, model=model,
                              patch_size=geometry.patch_size,
                              iou_threshold=geometry.iou_threshold,
                              network_size=geometry.network_size).astype(bool)
                   if len(det["masks"]) else det["masks"])
        gt_list.append(record)
        coarse_list.append(det)
        refined_list.append(dict(det, masks=refined))
        confident = det["scores"] >= score_threshold
        for g, p in match_instances(record["masks"], det["masks"][confident],
                                    det["scores"][confident]):
            truth = record["masks"][g]
            for name, masks in (("coarse", det["masks"][confident]),
                                ("refined", refined[confident])):
                boundary_scores[f"{name}_boundary_iou"].append(boundary.boundary_iou(
                    truth, masks[p], width=synthetic.BOUNDARY_WIDTH))
                boundary_scores[f"{name}_mask_iou"].append(
                    np.count_nonzero(truth & masks[p]) / max(np.count_nonzero(truth | masks[p]), 1))
        if index == 0:
            overlay.save_png(os.path.join(outdir, "bpr_nuclei_maskrcnn_overlay.png"),
                             synthetic.overlay_panels(image.astype(np.float32), record["masks"],
                                                      det["masks"][confident],
                                                      refined[confident]), zoom=2)
    table = {"experiment": "bpr_nuclei_maskrcnn", "predictions": os.path.abspath(predictions),
             "refiner_workdir": os.path.abspath(refiner_workdir), "refiner_step": int(step),
             "refiner_model": config.model.name, "split": split, "images": len(gt_list),
             "ground_truth_instances": int(sum(len(r["masks"]) for r in gt_list)),
             "predictions_count": int(sum(len(d["masks"]) for d in coarse_list)),
             "patch_size": geometry.patch_size, "network_size": geometry.network_size,
             "iou_threshold": geometry.iou_threshold, "score_threshold": score_threshold,
             "boundary_width": synthetic.BOUNDARY_WIDTH,
             "matched": len(boundary_scores["coarse_boundary_iou"])}
    for name, preds in (("coarse", coarse_list), ("refined", refined_list)):
        metrics = coco.coco_metrics(gt_list, preds, class_names)
        for key in ("AP", "AP50", "AP75"):
            table[f"{name}_mask_{key}"] = metrics[f"mask/{key}"]
    table.update({k: float(np.mean(v)) if v else None for k, v in boundary_scores.items()})
    table["seconds"] = round(time.time() - started, 1)
    with open(os.path.join(outdir, "bpr_nuclei_maskrcnn.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, indent=2)
    return table


GAINS = ("mask_AP", "mask_AP50", "mask_AP75", "boundary_iou", "mask_iou")


def refine_with_refiners(refiner_workdirs, predictions: str, outdir: str, **kwargs) -> dict:
    """:func:`refine_predictions` with each refiner workdir (e.g. one per training seed) on the
    same detector output; bpr_nuclei_maskrcnn.json then holds every refiner's table under
    ``per_refiner`` and, per metric of :data:`GAINS`, the mean and standard deviation over the
    refiners of refined - coarse (the overlay is the first refiner's)."""
    per_refiner = []
    for index, workdir in enumerate(refiner_workdirs):
        scratch = outdir if index == 0 else os.path.join(outdir, f"refiner{index}")
        per_refiner.append(refine_predictions(workdir, predictions, scratch, **kwargs))
    table = {"experiment": "bpr_nuclei_maskrcnn", "predictions": per_refiner[0]["predictions"],
             "refiners": len(per_refiner), "per_refiner": per_refiner}
    for key in GAINS:
        gains = [t[f"refined_{key}"] - t[f"coarse_{key}"] for t in per_refiner
                 if t[f"coarse_{key}"] is not None]
        table[f"{key}_gain_mean"] = float(np.mean(gains)) if gains else None
        table[f"{key}_gain_std"] = float(np.std(gains)) if gains else None
    with open(os.path.join(outdir, "bpr_nuclei_maskrcnn.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, indent=2)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--coarse_predictions", default=None,
                        help="a COCO results json (workdir/predictions/<split>_<ps>.json of a "
                             "detection run): refine its masks instead of degraded ground truth "
                             "(needs --refiner_workdir)")
    parser.add_argument("--refiner_workdir", nargs="+", default=None,
                        help="workdir(s) of configs/bpr_hrnet18s_nuclei.py (several, e.g. one "
                             "per seed: the gains' mean and spread over them)")
    parser.add_argument("--ground_truth", default=None,
                        help="default: <split>_ground_truth.json next to --coarse_predictions")
    parser.add_argument("--score_threshold", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.coarse_predictions or args.refiner_workdir:
        if not (args.coarse_predictions and args.refiner_workdir):
            parser.error("--coarse_predictions and --refiner_workdir go together")
        table = refine_with_refiners(args.refiner_workdir, args.coarse_predictions,
                                     args.outdir, ground_truth=args.ground_truth,
                                     score_threshold=args.score_threshold)
        for t in table["per_refiner"]:
            print(f"{t['refiner_workdir']}: {t['predictions_count']} predicted masks: mask AP "
                  f"{t['coarse_mask_AP']:.3f} -> {t['refined_mask_AP']:.3f}, AP75 "
                  f"{t['coarse_mask_AP75']:.3f} -> {t['refined_mask_AP75']:.3f}; over "
                  f"{t['matched']} matched nuclei boundary IoU {t['coarse_boundary_iou']} -> "
                  f"{t['refined_boundary_iou']} ({t['seconds']} s)")
        print(f"gains over {table['refiners']} refiner(s): mask AP "
              f"{table['mask_AP_gain_mean']:+.3f} +- {table['mask_AP_gain_std']:.3f}, boundary "
              f"IoU {table['boundary_iou_gain_mean']} +- {table['boundary_iou_gain_std']}")
        return
    table = run(args.outdir, tuple(args.seeds), copies=args.copies, steps=args.steps)
    for seed, r in table["per_seed"].items():
        print(f"seed {seed}: boundary IoU {r['coarse_boundary_iou']:.3f} -> "
              f"{r['refined_boundary_iou']:.3f}, mask IoU {r['coarse_mask_iou']:.3f} -> "
              f"{r['refined_mask_iou']:.3f}, mask AP {r['coarse_mask_AP']:.3f} -> "
              f"{r['refined_mask_AP']:.3f} ({r['train_patches']} training patches)")
    print(f"gains over {len(table['per_seed'])} seeds: boundary IoU "
          f"{table['boundary_iou_gain_mean']:+.3f} +- {table['boundary_iou_gain_std']:.3f}, "
          f"mask AP {table['mask_AP_gain_mean']:+.3f} +- {table['mask_AP_gain_std']:.3f} "
          f"({table['seconds']} s)")


if __name__ == "__main__":
    main()
