r"""The trivial baseline for the nuclei demo: Otsu threshold + connected components.

What a detector trained on the nuclei data must beat. On the held-out region of the
``flexvision_instances/nuclei`` dataset (the bottom 128 rows of stardist's 2018 Data Science
Bowl image, see flexvision/data/instances.py), it thresholds the image at Otsu's level (Otsu
1979, IEEE Trans. SMC 9(1): the threshold maximising the between-class variance of the grey
level histogram), labels the 8-connected foreground components as instances, scores each by
its mean intensity (for COCO's ranking) and evaluates them with flexvision.data.coco's COCO
box and mask AP (pycocotools). Touching nuclei merge into one component: that is what the
learned models are expected to fix. Writes nuclei_baseline.json and nuclei_baseline.png (image,
ground truth, baseline) to ``--outdir``.

    python -m experiments.nuclei_baseline --outdir docs/figures [--data_dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from flexvision.data import coco, overlay


def otsu_threshold(image: np.ndarray) -> float:
    """Otsu's threshold of an integer image: pixels ``> t`` are foreground.

    Maximises the between-class variance ``w0 w1 (mu0 - mu1)^2`` over the cut between grey
    levels (Otsu 1979, Eq. 18), on the histogram of the image's distinct values.
    """
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.integer):
        raise ValueError(f"otsu_threshold expects an integer image, got {image.dtype}")
    values, counts = np.unique(image, return_counts=True)
    if len(values) < 2:
        raise ValueError("otsu_threshold needs at least two grey levels")
    p = counts / counts.sum()
    w0 = np.cumsum(p)[:-1]  # class 0 = values[: k + 1]
    m0 = np.cumsum(p * values)[:-1]
    total = (p * values).sum()
    w1 = 1 - w0
    between = (total * w0 - m0) ** 2 / (w0 * w1)
    return float(values[int(np.argmax(between))])


def threshold_instances(image: np.ndarray, min_area: int = 1) -> dict[str, np.ndarray]:
    """Otsu + 8-connected components of a 2-D image as predictions for coco_metrics.

    Components smaller than ``min_area`` pixels are dropped. Scores: mean intensity of each
    component divided by the image maximum.
    """
    from scipy import ndimage

    image = np.asarray(image)
    foreground = image > otsu_threshold(image)
    components, n = ndimage.label(foreground, structure=np.ones((3, 3), bool))
    masks, boxes = coco.instances_from_label_map(components)
    keep = masks.sum(axis=(1, 2)) >= min_area
    masks, boxes = masks[keep], boxes[keep]
    scores = np.asarray([image[m].mean() for m in masks], np.float64) / max(image.max(), 1)
    return {"boxes": boxes, "scores": scores, "labels": np.zeros(len(masks), np.int64),
            "masks": masks}


def held_out_region(data_dir: str | None = None) -> list[dict]:
    """The nuclei dataset's test split (image [H, W], masks, boxes, labels) via its builder."""
    import tensorflow_datasets as tfds

    from flexvision.data import pipeline

    builder = pipeline.get_builder("nuclei", data_dir)
    examples = []
    for example in tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False)):
        objects = example["objects"]
        examples.append({"image": example["image"][..., 0],
                         "boxes": objects["box"], "labels": objects["label"],
                         "masks": objects["mask"][..., 0].astype(bool),
                         "id": int(example["image/id"])})
    return examples


def run(outdir: str, data_dir: str | None = None, min_area: int = 1) -> dict:
    """Scores the baseline on the held-out region; writes nuclei_baseline.json/png."""
    if data_dir is None:
        data_dir = os.path.join(tempfile.gettempdir(), "flexvision_tfds")
    examples = held_out_region(data_dir)
    predictions = [threshold_instances(e["image"], min_area) for e in examples]
    ground_truth = [{k: e[k] for k in ("boxes", "labels", "masks", "id")} for e in examples]
    metrics = coco.coco_metrics(ground_truth, predictions, ["nucleus"])
    table = {
        "method": "otsu_threshold+connected_components",
        "split": "test (held-out rows 384..511 of stardist img2d.tif)",
        "min_area": min_area,
        "ground_truth_instances": int(sum(len(e["boxes"]) for e in examples)),
        "predicted_instances": int(sum(len(p["boxes"]) for p in predictions)),
        "otsu_threshold": [otsu_threshold(e["image"]) for e in examples],
        "metrics": metrics,
    }
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "nuclei_baseline.json"), "w") as f:
        json.dump(table, f, indent=2)
    panels = []
    for example, prediction in zip(examples, predictions):
        panels += [overlay.display_image(example["image"]),
                   overlay.overlay_instances(example["image"], example["masks"]),
                   overlay.overlay_instances(example["image"], prediction["masks"])]
    overlay.save_png(os.path.join(outdir, "nuclei_baseline.png"), panels, zoom=2)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data dir (default: a flexvision_tfds folder in the temp dir)")
    parser.add_argument("--min_area", type=int, default=1)
    args = parser.parse_args(argv)
    table = run(args.outdir, args.data_dir, args.min_area)
    m = table["metrics"]
    print(f"Otsu + connected components on the held-out nuclei region "
          f"({table['ground_truth_instances']} nuclei, {table['predicted_instances']} "
          f"components):")
    for kind in ("mask", "box"):
        print(f"  {kind:4s} AP {m[f'{kind}/AP']:.3f}  AP50 {m[f'{kind}/AP50']:.3f}  "
              f"AP75 {m[f'{kind}/AP75']:.3f}")
    return table


if __name__ == "__main__":
    main()
