"""Input data: TFDS pipelines, preprocessing-op strings, built-in datasets, mixup."""

from flexvision.data import digits, mixup, ops, pipeline
from flexvision.data.ops import list_ops, register_op

__all__ = ["digits", "mixup", "ops", "pipeline", "list_ops", "register_op"]
