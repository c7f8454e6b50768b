"""Blocks shared by several configs (not a config itself: it has no ``get_config``)."""

import ml_collections


def distill_block(source: str, *, resolution: int, workdir: str | None = None,
                  name: str | None = None, kwargs: dict | None = None):
    """A ``config.distill`` block (keys: flexvision/train/distill.py) for a frozen teacher from
    ``source`` ('workdir', 'timm' or 'big_vision') running at ``resolution`` px, KL at
    temperature 1 without the label loss, the student initialised from the teacher."""
    placeholder = ml_collections.config_dict.placeholder
    block = ml_collections.ConfigDict()
    block.teacher = ml_collections.ConfigDict()
    block.teacher.source = source
    block.teacher.workdir = workdir if workdir is not None else placeholder(str)
    block.teacher.name = name if name is not None else placeholder(str)
    block.teacher.weights = placeholder(str)
    block.teacher.kwargs = ml_collections.ConfigDict(kwargs or {})
    block.teacher.patch_size = placeholder(int)
    block.teacher.resolution = resolution
    block.temperature = 1.0
    block.label_weight = 0.0
    block.init_from_teacher = True
    return block
