"""Per-pixel segmentation (``config.task = "segmentation"``): BPR's refinement network and any
model whose logits are [B, H, W, K] at the labels' size.

Batches: ``image`` [B, H, W, C] and ``labels`` [B, H, W, K] one-hot (the ``onehot`` op on an
[H, W] label map). The loss is ``config.loss`` (softmax_xent) per pixel, averaged over the
pixels of each example (``engine.losses.mean_over_pixels``): the loop's
``loss_fn(logits, labels) -> [B]`` path, nothing else changes in the loop.

The evaluator (:class:`SegmentationEvaluator`) reports per split, over every pixel of the
split (sums over patches, then ratios; padding rows excluded):

  pixel_accuracy   fraction of pixels whose argmax class is the label's.
  mean_iou         mean over classes of |pred = k and label = k| / |pred = k or label = k|
                   (classes absent from both are left out).
  foreground_iou   the IoU of class 1 (for BPR: the instance).
  boundary_iou     mean over examples of the Boundary IoU (``detection/boundary.py``) of the
                   class-1 masks at ``config.eval.boundary_width`` = w px (default 1), inside
                   the patch less its w-px frame: ``mask_boundary`` counts the outside of the
                   patch as background, so a mask reaching the patch's edge would be "boundary"
                   there in both masks (an example with no boundary pixel left in either
                   scores 1). A patch-level figure, not an image-level Boundary IoU.
  loss             the mean per-example loss.

With ``config.eval.coarse_channel`` = c (BPR: 3, the coarse mask mapped to {-1, +1}), the same
metrics of the input mask ``image[..., c] > 0`` taken as the prediction, as ``coarse_*``: the
refiner's figures next to what it was given. Every value is ``{"default": v}`` (one entry, the
model as built: the per-patch-size layout of the classification tables).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexvision.detection import boundary
from flexvision.detection import bpr_data  # noqa: F401  registers the BPR patch dataset
from flexvision.engine import evaluation, losses
from flexvision.engine.evaluation import DEFAULT, Evaluator
from flexvision.train.objective import Objective

METRICS = ("pixel_accuracy", "mean_iou", "foreground_iou", "boundary_iou", "loss")


def make_segmentation_eval_step(model, loss_fn, coarse_channel: int | None):
    """(variables, batch) -> per-batch sums (pixel counts per class, correct pixels, loss) and
    the argmax predictions [B, H, W] int32 (and the coarse ones when ``coarse_channel``)."""

    def sums_of(pred, gt, weight, num_classes):
        onehot_pred = jax.nn.one_hot(pred, num_classes) * weight[..., None]
        onehot_gt = jax.nn.one_hot(gt, num_classes) * weight[..., None]
        return {"intersection": jnp.sum(onehot_pred * onehot_gt, axis=(0, 1, 2)),
                "union": jnp.sum(jnp.maximum(onehot_pred, onehot_gt), axis=(0, 1, 2)),
                "correct": jnp.sum((pred == gt) * weight)}

    def eval_step(variables: dict, batch: dict) -> dict:
        images, labels, mask = batch["image"], batch["labels"], batch["_mask"]
        logits = model.apply(variables, images, train=False)
        if logits.shape[:3] != labels.shape[:3]:
            raise ValueError(f"segmentation logits {logits.shape} and labels {labels.shape} must "
                             f"have the same [B, H, W]; return logits at the input size (BPR's "
                             f"nets: upsample_logits=True)")
        num_classes = logits.shape[-1]
        gt = jnp.argmax(labels, -1)
        pred = jnp.argmax(logits, -1)
        weight = jnp.broadcast_to(mask[:, None, None], gt.shape).astype(jnp.float32)
        out = {"refined": sums_of(pred, gt, weight, num_classes), "pred": pred, "gt": gt,
               "loss": jnp.sum(loss_fn(logits, labels) * mask), "count": jnp.sum(mask),
               "pixels": jnp.sum(weight)}
        if coarse_channel is not None:
            coarse = (images[..., coarse_channel] > 0).astype(jnp.int32)
            out["coarse"] = sums_of(coarse, gt, weight, num_classes)
            out["coarse_pred"] = coarse
        return out

    return eval_step


def _ratios(sums: dict, pixels: float) -> dict[str, float]:
    intersection, union = np.asarray(sums["intersection"]), np.asarray(sums["union"])
    present = union > 0
    return {"pixel_accuracy": float(sums["correct"]) / max(pixels, 1.0),
            "mean_iou": float(np.mean(intersection[present] / union[present]))
            if present.any() else 1.0,
            "foreground_iou": float(intersection[1] / union[1]) if union[1] > 0 else 1.0}


def interior_boundary_iou(gt: np.ndarray, pred: np.ndarray, width: int) -> float:
    """Boundary IoU of two (H, W) binary masks of a patch, their boundaries
    (``boundary.mask_boundary`` at ``width``) cut to the patch less its ``width``-px frame;
    1.0 when neither has a boundary pixel there."""
    inner = (slice(width, -width), slice(width, -width))
    gt_boundary = boundary.mask_boundary(gt, width)[inner]
    pred_boundary = boundary.mask_boundary(pred, width)[inner]
    union = np.count_nonzero(gt_boundary | pred_boundary)
    return 1.0 if union == 0 else np.count_nonzero(gt_boundary & pred_boundary) / union


class SegmentationEvaluator(Evaluator):
    """The metrics of this module's docstring on every split of ``config.eval.splits``."""

    def __init__(self, model, loss_fn, config, mesh):
        super().__init__(model, loss_fn, config, mesh, patch_sizes=[], resolutions=[])
        channel = self.eval_config.get("coarse_channel")
        self.coarse_channel = None if channel is None else int(channel)
        self.boundary_width = int(self.eval_config.get("boundary_width", 1) or 1)
        self._eval_step = None

    def empty_sums(self) -> dict:
        return {"batches": []}

    def accumulate(self, sums: dict, variables, batch: dict) -> None:
        if self._eval_step is None:
            self._eval_step = jax.jit(make_segmentation_eval_step(
                self.model, self.loss_fn, self.coarse_channel))
        out = jax.device_get(self._eval_step(variables, batch))
        real = np.asarray(batch["_mask"]) > 0
        for name in ("pred", "coarse_pred"):
            if name in out:
                out[name] = np.asarray(out[name])[real]
        out["gt"] = np.asarray(out["gt"])[real]
        sums["batches"].append(out)

    def table(self, sums: dict) -> dict:
        batches = sums["batches"]
        pixels = sum(float(b["pixels"]) for b in batches)
        count = max(sum(float(b["count"]) for b in batches), 1.0)
        gt = np.concatenate([b["gt"] for b in batches]) if batches else np.zeros((0, 1, 1))
        table: dict[str, Any] = {}
        sources = ["refined"] + (["coarse"] if self.coarse_channel is not None else [])
        for source in sources:
            total = {key: sum(np.asarray(b[source][key], np.float64) for b in batches)
                     for key in ("intersection", "union", "correct")}
            values = _ratios(total, pixels)
            preds = np.concatenate([b["pred" if source == "refined" else "coarse_pred"]
                                    for b in batches])
            values["boundary_iou"] = float(np.mean([
                interior_boundary_iou(g == 1, p == 1, self.boundary_width)
                for g, p in zip(gt, preds)])) if len(gt) else 1.0
            prefix = "" if source == "refined" else "coarse_"
            table.update({prefix + k: {DEFAULT: v} for k, v in values.items()})
        table["loss"] = {DEFAULT: sum(float(b["loss"]) for b in batches) / count}
        table["examples"] = int(count)
        return table


def format_table(table: dict, title: str = "") -> str:
    """One row per metric: the model's value and, where evaluated, the coarse input's."""
    rows = [("metric", "model", "coarse input")]
    for metric in METRICS:
        if metric not in table:
            continue
        coarse = table.get(f"coarse_{metric}", {}).get(DEFAULT)
        rows.append((metric, f"{table[metric][DEFAULT]:.4f}",
                     "-" if coarse is None else f"{coarse:.4f}"))
    return evaluation.aligned_text(rows, title)


def plot_metrics(table: dict, path: str, title: str = "") -> None:
    """Bars of each metric in [0, 1] (model, and coarse input where evaluated), saved to
    ``path`` (a bare matplotlib Figure, as ``engine.evaluation.plot_accuracy``)."""
    from matplotlib.figure import Figure

    names = [m for m in METRICS if m != "loss" and m in table]
    xs = np.arange(len(names))
    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.subplots()
    coarse = [table.get(f"coarse_{m}", {}).get(DEFAULT) for m in names]
    width = 0.38 if any(c is not None for c in coarse) else 0.6
    ax.bar(xs, [table[m][DEFAULT] for m in names], width, label="model")
    if any(c is not None for c in coarse):
        ax.bar(xs + width, [c or 0.0 for c in coarse], width, label="coarse input")
        ax.legend()
    ax.set_xticks(xs + (width / 2 if width < 0.6 else 0), names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)


def segmentation_objective(config, model, mesh) -> Objective:
    """Per-pixel ``config.loss`` averaged over pixels, the :class:`SegmentationEvaluator`, and
    this module's table, TensorBoard and final-file functions."""
    loss_fn = losses.mean_over_pixels(losses.make_loss(config))
    return Objective("segmentation", loss_fn, SegmentationEvaluator(model, loss_fn, config, mesh),
                     flat_metrics=evaluation.flat_by_patch_size, format_table=format_table,
                     write_final=write_final, headline="segmentation")


def write_final(results: dict[str, dict], workdir: str, step: int) -> dict:
    """final_eval.json in the classification layout (``engine.evaluation.write_final``) and
    final_eval.png by :func:`plot_metrics`."""
    return evaluation.write_final(results, workdir, step, plot=plot_metrics)
