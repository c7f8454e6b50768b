"""Instance-segmentation data as a TFDS dataset, built locally: real nuclei, or your COCO files.

:class:`FlexvisionInstances` (TFDS name ``flexvision_instances``) has two kinds of configs:

* ``nuclei`` (the default): the annotated fluorescence image of cell nuclei that the stardist
  wheel ships (``stardist/data/images/img2d.tif``, 512x512, with its instance label map
  ``mask2d.tif``: 125 nuclei), from the 2018 Data Science Bowl (BBBC038v1, Caicedo et al.,
  Nature Methods 16:1247, 2019). The files are read from the installed distribution with
  ``importlib.metadata``; stardist itself is never imported (``pip install --no-deps stardist``
  is enough). Licences: the stardist wheel is BSD-3-Clause; the Data Science Bowl 2018 images
  and annotations were released by the Broad Institute under CC0 (public domain).

  Split, spatially, at row ``512 - eval_rows`` (default 384): the rows above the line are the
  training region, the rows below it the held-out region; no pixel is in both. ``train`` holds
  ``tile`` x ``tile`` tiles of the training region every ``stride`` pixels (the last tile of a
  row/column flush with the region's edge; 35 tiles of 128 by default), ``test`` the whole
  held-out region as one ``eval_rows`` x 512 image. A nucleus cut by the split line (or by a
  tile's edge) is an instance in each crop it reaches, with the pixels it has there (as nuclei
  cut by the border of a microscope image are); its box is the tight box of those pixels.

* a COCO config (:func:`coco_config`): your own images and COCO instances json per split
  (polygons, uncompressed or compressed RLE), read by :func:`flexvision.data.coco.read_coco`,
  which also defines what happens to images without instances, empty masks, boxes outside the
  image and unknown categories.

Every example: ``image`` [H, W, C] uint8, ``image/id`` int64 (COCO image id; tile index for
nuclei), ``image/origin`` [2] int32 (row, column of the crop in the source image; 0 for COCO),
and ``objects``, a sequence of ``box`` [4] float32 (x1, y1, x2, y2 pixels), ``label`` (class
index), ``mask`` [H, W, 1] uint8 in {0, 1} (PNG-encoded) and ``is_crowd`` bool. The ``det_*``
preprocessing ops in :mod:`flexvision.data.ops` turn them into padded, static-shape tensors.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from flexvision.data import coco

NAME = "flexvision_instances"
STARDIST_FILES = {"image": "stardist/data/images/img2d.tif",
                  "labels": "stardist/data/images/mask2d.tif"}


@dataclasses.dataclass(eq=False)
class InstancesConfig(tfds.core.BuilderConfig):
    """What to build: ``source`` "stardist_nuclei" (with its split/tiling) or "coco"."""

    source: str = "stardist_nuclei"
    channels: int = 1
    class_names: tuple[str, ...] | None = None
    # nuclei: held-out rows at the bottom, training tiles' size and step (pixels).
    eval_rows: int = 128
    tile: int = 128
    stride: int = 64
    # coco: image folder and {split: annotation json}.
    image_dir: str | None = None
    annotation_files: Mapping[str, str] | None = None


NUCLEI = InstancesConfig(
    name="nuclei", version=tfds.core.Version("1.0.0"), class_names=("nucleus",),
    description="stardist's 2018 Data Science Bowl nuclei image, spatial train/test split.")


def coco_config(name: str, image_dir: str, annotation_files: Mapping[str, str],
                class_names: Sequence[str] | None = None, channels: int = 3,
                version: str = "1.0.0") -> InstancesConfig:
    """Config reading COCO-format data: ``annotation_files`` maps split name -> json path.

    ``class_names`` (default: the first file's categories by id) fixes the labels; a category
    outside it makes building fail. ``channels`` 1 or 3: images are converted to it. Bump
    ``version`` (or use a new ``name``) after changing the files: a built dataset is reused.
    """
    if not annotation_files:
        raise ValueError("annotation_files must map at least one split name to a COCO json, "
                         "e.g. {'train': 'train.json', 'test': 'val.json'}")
    missing = [p for p in [image_dir, *annotation_files.values()] if not os.path.exists(p)]
    if missing:
        raise ValueError(f"coco_config {name!r}: {missing} do(es) not exist")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    return InstancesConfig(name=name, version=tfds.core.Version(version), source="coco",
                           channels=channels, image_dir=image_dir,
                           annotation_files=dict(annotation_files),
                           class_names=None if class_names is None else tuple(class_names),
                           description=f"COCO-format instances from {image_dir}")


# ----------------------------------------------------------------------------- stardist nuclei

def stardist_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """The stardist wheel's nuclei image (uint8 [512, 512]) and instance label map (int32).

    Reads the files of the installed ``stardist`` distribution without importing it.
    """
    import tifffile

    try:
        dist = importlib.metadata.distribution("stardist")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("the nuclei dataset reads two files shipped in the stardist wheel; "
                         "install it with `pip install stardist` (or `pip install --no-deps "
                         "stardist`: flexvision never imports it)") from None
    paths = {k: str(dist.locate_file(v)) for k, v in STARDIST_FILES.items()}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise ValueError(f"stardist {dist.version} is installed but lacks {missing}; install a "
                         f"version that ships them (0.9.2 does)")
    image, labels = tifffile.imread(paths["image"]), tifffile.imread(paths["labels"])
    if image.shape != labels.shape or image.ndim != 2:
        raise ValueError(f"unexpected stardist data: image {image.shape}, labels {labels.shape}")
    if image.max() > 255 or image.min() < 0:
        raise ValueError(f"stardist image values {image.min()}..{image.max()} do not fit uint8")
    return image.astype(np.uint8), labels.astype(np.int32)


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of ``tile``-long windows every ``stride`` over ``length``, the last one
    flush with the end (so the windows cover it)."""
    if not 0 < tile <= length or stride <= 0:
        raise ValueError(f"need 0 < tile <= length and stride > 0, got tile={tile}, "
                         f"length={length}, stride={stride}")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def nuclei_crops(config: InstancesConfig, height: int, width: int,
                 ) -> dict[str, list[tuple[int, int, int, int]]]:
    """Per split, the (row, column, height, width) crops of the source image (see module doc)."""
    split_row = height - config.eval_rows
    if not 0 < split_row < height:
        raise ValueError(f"eval_rows must be in (0, {height}), got {config.eval_rows}")
    if config.tile > split_row:
        raise ValueError(f"tile {config.tile} is taller than the training region ({split_row} "
                         f"rows); lower tile or eval_rows")
    train = [(y, x, config.tile, config.tile)
             for y in tile_origins(split_row, config.tile, config.stride)
             for x in tile_origins(width, config.tile, config.stride)]
    return {"train": train, "test": [(split_row, 0, config.eval_rows, width)]}


# ----------------------------------------------------------------------------- builder

def _objects(boxes, labels, masks, is_crowd) -> dict:
    n, h, w = masks.shape
    return {"box": np.asarray(boxes, np.float32).reshape(n, 4),
            "label": np.asarray(labels, np.int64).reshape(n),
            "mask": np.asarray(masks, np.uint8).reshape(n, h, w, 1),
            "is_crowd": np.asarray(is_crowd, bool).reshape(n)}


class FlexvisionInstances(tfds.core.GeneratorBasedBuilder):
    """Instance segmentation (boxes + masks) from stardist's nuclei or COCO-format files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "nuclei (spatial split) and COCO-format configs."}
    BUILDER_CONFIGS = [NUCLEI]

    def _class_names(self) -> list[str]:
        config = self.builder_config
        if config.class_names is not None:
            return list(config.class_names)
        first = next(iter(config.annotation_files.values()))
        import json
        with open(first) as f:
            categories = sorted(json.load(f).get("categories", []), key=lambda c: c["id"])
        return [c["name"] for c in categories]

    def _info(self) -> tfds.core.DatasetInfo:
        channels = self.builder_config.channels
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, channels)),
                "image/id": np.int64,
                "image/origin": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                "objects": tfds.features.Sequence({
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(names=self._class_names()),
                    "mask": tfds.features.Image(shape=(None, None, 1)),
                    "is_crowd": np.bool_,
                }),
            }),
            homepage="https://bbbc.broadinstitute.org/BBBC038",
            citation="Caicedo et al., Nucleus segmentation across imaging experiments: the 2018 "
                     "Data Science Bowl. Nature Methods 16, 1247-1253 (2019).",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        config = self.builder_config
        if config.source == "stardist_nuclei":
            height, width = stardist_nuclei()[0].shape
            return {split: self._generate_examples(crops)
                    for split, crops in nuclei_crops(config, height, width).items()}
        if config.source == "coco":
            return {split: self._generate_examples(path)
                    for split, path in config.annotation_files.items()}
        raise ValueError(f"unknown source {config.source!r}; use 'stardist_nuclei' or 'coco'")

    def _generate_examples(self, crops_or_annotation_file):
        """Nuclei crops (a list of (row, column, height, width)) or a COCO json's images."""
        if self.builder_config.source == "coco":
            yield from self._coco_examples(crops_or_annotation_file)
        else:
            image, labels = stardist_nuclei()
            yield from self._nuclei_examples(image, labels, crops_or_annotation_file)

    def _nuclei_examples(self, image, labels, crops):
        for index, (y, x, h, w) in enumerate(crops):
            masks, boxes = coco.instances_from_label_map(labels[y:y + h, x:x + w])
            yield index, {
                "image": image[y:y + h, x:x + w, None], "image/id": index,
                "image/origin": np.asarray([y, x], np.int32),
                "objects": _objects(boxes, np.zeros(len(masks)), masks, np.zeros(len(masks))),
            }

    def _coco_examples(self, annotation_file):
        from PIL import Image

        config = self.builder_config
        _, records = coco.read_coco(annotation_file, self._class_names())
        for record in records:
            path = os.path.join(config.image_dir, record["file_name"])
            with Image.open(path) as pil:
                if pil.size != (record["width"], record["height"]):
                    raise ValueError(f"{path} is {pil.size[0]}x{pil.size[1]} but "
                                     f"{annotation_file} says {record['width']}x"
                                     f"{record['height']}")
                image = np.asarray(pil.convert("L" if config.channels == 1 else "RGB"))
            yield record["id"], {
                "image": image.reshape(image.shape[:2] + (config.channels,)),
                "image/id": record["id"], "image/origin": np.zeros(2, np.int32),
                "objects": _objects(record["boxes"], record["labels"], record["masks"],
                                    record["is_crowd"]),
            }


def prepare(data_dir: str | None = None, config: InstancesConfig | str = "nuclei",
            ) -> FlexvisionInstances:
    """The instances builder for ``config`` in ``data_dir``, built there on first use."""
    builder = FlexvisionInstances(data_dir=data_dir, config=config)
    builder.download_and_prepare()
    return builder
