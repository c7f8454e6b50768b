"""Input data: TFDS pipelines, preprocessing-op strings, built-in datasets."""

from flexvision.data import digits, ops, pipeline
from flexvision.data.ops import list_ops, register_op

__all__ = ["digits", "ops", "pipeline", "list_ops", "register_op"]
