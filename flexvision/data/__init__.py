"""Input data: TFDS pipelines, preprocessing-op strings, built-in datasets, image folders, the
COCO instance format and its metrics."""

from flexvision.data import coco, digits, image_folder, instances, ops, overlay, pipeline
from flexvision.data.ops import list_ops, register_op

__all__ = ["coco", "digits", "image_folder", "instances", "ops", "overlay", "pipeline",
           "list_ops", "register_op"]
