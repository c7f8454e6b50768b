"""BPR's training data as a TFDS dataset built locally: boundary patches of coarse nuclei masks.

:class:`FlexvisionBprPatches` (TFDS name ``flexvision_bpr_patches``, input.name of the same
name) cuts, as BPR's ``tools/split_patches.py`` does, square patches along the boundaries of
COARSE instance masks (:func:`flexvision.detection.bpr.boundary_patches`: the float-boundary
band, one box per band pixel, NMS at ``iou_threshold``, boxes moved back inside the image) and
stores, per patch, the image, the coarse mask and the ground-truth mask cropped at that box and
resized to the network's input size (:func:`flexvision.detection.bpr.resize_patches`: image
bilinear, rounded to uint8 as mmcv does for uint8 images; masks nearest). The training pipeline
then only augments and normalises (configs/bpr_hrnet18s_nuclei.py: ``flip_lr`` of image, mask
and label together, ``photometric_distortion``, ``standardize``, the mask as 4th channel).

Config ``nuclei`` (the default): the nuclei image of :mod:`flexvision.data.instances`, split
as that dataset splits it (``eval_rows`` held-out rows at the bottom). ``train``: patches of the
training region's ``tile`` x ``tile`` tiles (every ``stride`` px, as the instances dataset's
train split), ``copies`` times, each time with coarse masks drawn afresh from the ground truth
by :func:`degrade_mask` (BPR trains on Mask R-CNN outputs; with no detector the degraded ground
truth stands in for them: a low-resolution copy, like Mask R-CNN's 28 x 28 masks, then a random
dilation or erosion); ``test``: the held-out region's
patches, one degradation. Degradations are drawn from ``numpy.random.default_rng((seed, split,
copy, crop))``: the dataset is a pure function of its config.

Every example: ``image`` [S, S, 3] uint8 RGB (the grayscale nuclei repeated), ``mask`` [S, S,
1] uint8 in {0, 1} (coarse), ``label`` [S, S, 1] uint8 in {0, 1} (ground truth), ``image/id``
int64 (the crop: tile index, 0 for the held-out region), ``instance`` int64 (instance index in
the crop), ``box`` [4] float32 (x1, y1, x2, y2 of the patch in the crop's pixels).

Importing this module registers the builder with the input pipeline
(:func:`flexvision.data.pipeline.register_builder`); the segmentation objective imports it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from flexvision.data import coco, instances, pipeline
from flexvision.detection import bpr
from flexvision.detection.boundary import window_count
from flexvision.layers.flex import resize_nearest

NAME = "flexvision_bpr_patches"


@dataclasses.dataclass(eq=False)
class BprPatchesConfig(tfds.core.BuilderConfig):
    """What to cut: patch geometry (BPR's ``--patch-size``, ``--iou-thresh``, the network input
    size), the coarse-mask degradation and the nuclei split/tiling."""

    patch_size: int = 16
    network_size: int = 32
    iou_threshold: float = 0.25
    copies: int = 1
    degrade_factors: tuple[int, int] = (2, 4)
    max_radius: int = 1
    seed: int = 0
    eval_rows: int = 128
    tile: int = 128
    stride: int = 64


# Nuclei are ~10 px in radius: 16 px patches (BPR's 64 px on Cityscapes' 2048 px images would
# hold whole nuclei) at 2x (BPR: 64 -> 128), degradation at 1/2..1/4 resolution +- 1 px.
NUCLEI = BprPatchesConfig(
    name="nuclei", version=tfds.core.Version("1.0.0"),
    description="Boundary patches of degraded ground-truth masks of stardist's nuclei image.")


def nuclei_regions(config: BprPatchesConfig) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per split, the (RGB uint8 image [h, w, 3], gt masks [N, h, w] bool) of each crop: the
    training tiles and the held-out region of :func:`flexvision.data.instances.nuclei_crops`."""
    image, labels = instances.stardist_nuclei()
    layout = instances.InstancesConfig(name="layout", eval_rows=config.eval_rows,
                                       tile=config.tile, stride=config.stride)
    out = {}
    for split, crops in instances.nuclei_crops(layout, *image.shape).items():
        out[split] = []
        for y, x, h, w in crops:
            masks, _ = coco.instances_from_label_map(labels[y:y + h, x:x + w])
            out[split].append((np.repeat(image[y:y + h, x:x + w, None], 3, axis=-1),
                               masks.astype(bool)))
    return out


def patch_examples(scenes, *, patch_size: int, network_size: int, iou_threshold: float
                   ) -> dict[str, np.ndarray]:
    """The boundary patches of the coarse masks of several images, at the network size.

    Args: scenes, a sequence of (image (H, W, 3) uint8, gt_masks (N, H, W), coarse_masks
    (N, H, W)) with instance k of the gt matching instance k of the coarse masks. Returns
    {"image": (M, S, S, 3) uint8, "mask": (M, S, S, 1) uint8 coarse, "label": (M, S, S, 1)
    uint8 gt, "scene": (M,) int64 index into ``scenes``, "instance": (M,) int64, "box": (M, 4)
    float32 in the scene's pixels}: all scenes' patches resized in one call (one compilation).
    """
    parts = {"image": [], "mask": [], "label": [], "scene": [], "instance": [], "box": []}
    for index, (image, gt_masks, coarse_masks) in enumerate(scenes):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be (H, W, 3) uint8 (BPR resizes uint8 patches and "
                             f"rounds), got {image.shape} {image.dtype}")
        gt_masks, coarse_masks = np.asarray(gt_masks), np.asarray(coarse_masks)
        if gt_masks.shape != coarse_masks.shape:
            raise ValueError(f"gt_masks {gt_masks.shape} and coarse_masks {coarse_masks.shape} "
                             f"must pair instance k with instance k (same shape)")
        boxes, instance = bpr.boundary_patches(coarse_masks, patch_size, iou_threshold)
        image_patches, coarse = bpr.crop_patches(image, coarse_masks, boxes, instance,
                                                 patch_size)
        _, gt = bpr.crop_patches(image, gt_masks, boxes, instance, patch_size)
        for key, value in (("image", image_patches), ("mask", coarse), ("label", gt),
                           ("scene", np.full(len(boxes), index, np.int64)),
                           ("instance", instance), ("box", boxes[:, :4].astype(np.float32))):
            parts[key].append(value)
    out = {k: np.concatenate(v) if v else np.zeros((0,), np.int64) for k, v in parts.items()}
    size = int(network_size)
    if not len(out["scene"]):
        empty = np.zeros((0, size, size, 1), np.uint8)
        return dict(out, image=np.zeros((0, size, size, 3), np.uint8), mask=empty, label=empty,
                    box=np.zeros((0, 4), np.float32))
    images, coarse = bpr.resize_patches(out["image"], out["mask"], size)
    gt = resize_nearest(np.asarray(out["label"], np.float32)[..., None], (size, size))
    return dict(out, image=np.asarray(images).astype(np.uint8),
                mask=np.asarray(coarse).astype(np.uint8)[..., None],
                label=np.asarray(gt).astype(np.uint8))


def degrade_mask(mask: np.ndarray, rng: np.random.Generator, *, factors: Sequence[int] = (4, 8),
                 max_radius: int = 2) -> np.ndarray:
    """A coarse copy of a ground-truth mask: block-averaged at 1/f resolution (f drawn from
    ``factors[0]..factors[1]``, the block grid shifted by a random offset), thresholded at 0.5,
    repeated back to full size, then dilated (r > 0) or eroded (r < 0) by a square of radius
    |r| <= ``max_radius`` (r drawn uniformly; outside the image counts as background).

    Args: mask (H, W) nonzero = foreground. Returns (H, W) bool.
    """
    mask = np.asarray(mask) != 0
    low, high = int(factors[0]), int(factors[1])
    if not 1 <= low <= high:
        raise ValueError(f"factors must be (low, high) with 1 <= low <= high, got {factors!r}")
    if max_radius < 0:
        raise ValueError(f"max_radius must be >= 0, got {max_radius}")
    factor = int(rng.integers(low, high + 1))
    oy, ox = (int(v) for v in rng.integers(0, factor, size=2))
    height, width = mask.shape
    rows, cols = -(-(height + oy) // factor), -(-(width + ox) // factor)
    grid = np.zeros((rows * factor, cols * factor), np.float32)
    grid[oy:oy + height, ox:ox + width] = mask
    blocks = grid.reshape(rows, factor, cols, factor).mean(axis=(1, 3)) > 0.5
    coarse = blocks.repeat(factor, axis=0).repeat(factor, axis=1)[oy:oy + height, ox:ox + width]
    radius = int(rng.integers(-max_radius, max_radius + 1))
    if radius > 0:
        coarse = window_count(coarse, radius) > 0
    elif radius < 0:
        coarse = window_count(coarse, -radius) == (1 - 2 * radius) ** 2
    return coarse


def degrade(gt_masks: np.ndarray, rng: np.random.Generator, config: BprPatchesConfig
            ) -> np.ndarray:
    """Coarse masks (N, H, W) bool: each gt mask through :func:`degrade_mask` with the
    config's ``degrade_factors`` and ``max_radius``."""
    if not len(gt_masks):
        return np.zeros(np.shape(gt_masks), bool)
    return np.stack([degrade_mask(m, rng, factors=config.degrade_factors,
                                  max_radius=config.max_radius) for m in gt_masks])


class FlexvisionBprPatches(tfds.core.GeneratorBasedBuilder):
    """Boundary patches (image, coarse mask, ground truth) for BPR's refinement network."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "nuclei boundary patches of degraded ground-truth masks."}
    BUILDER_CONFIGS = [NUCLEI]

    def _info(self) -> tfds.core.DatasetInfo:
        size = int(self.builder_config.network_size)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3)),
                "mask": tfds.features.Image(shape=(size, size, 1)),
                "label": tfds.features.Image(shape=(size, size, 1)),
                "image/id": np.int64,
                "instance": np.int64,
                "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            }),
            homepage="https://github.com/tinyalpha/BPR",
            citation="Tang et al., Look Closer to Segment Better: Boundary Patch Refinement for "
                     "Instance Segmentation. CVPR 2021.",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        regions = nuclei_regions(self.builder_config)
        return {"train": self._generate_examples("train", regions["train"]),
                "test": self._generate_examples("test", regions["test"])}

    def _generate_examples(self, split: str, crops) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        copies = int(config.copies) if split == "train" else 1
        split_index = 0 if split == "train" else 1
        scenes, origin = [], []
        for copy in range(copies):
            for index, (image, gt) in enumerate(crops):
                rng = np.random.default_rng((int(config.seed), split_index, copy, index))
                scenes.append((image, gt, degrade(gt, rng, config)))
                origin.append((copy, index))
        examples = patch_examples(scenes, patch_size=config.patch_size,
                                  network_size=config.network_size,
                                  iou_threshold=config.iou_threshold)
        for k, scene in enumerate(examples["scene"]):
            copy, index = origin[scene]
            yield f"{copy}_{index}_{k}", {
                "image": examples["image"][k], "mask": examples["mask"][k],
                "label": examples["label"][k], "image/id": index,
                "instance": examples["instance"][k], "box": examples["box"][k]}


def prepare(data_dir: str | None = None, config: BprPatchesConfig | str = "nuclei",
            ) -> FlexvisionBprPatches:
    """The patch dataset for ``config`` in ``data_dir``, built there on first use."""
    builder = FlexvisionBprPatches(data_dir=data_dir, config=config)
    builder.download_and_prepare()
    return builder


pipeline.register_builder(NAME, FlexvisionBprPatches)
