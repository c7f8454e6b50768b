"""Start-up checks of a training config.

:func:`validate_config` checks every value the trainer reads before anything is trained (a
batch size the device count does not divide, an eval setting that can never work, a model
option the model does not take, ...) and raises one :class:`ConfigError` listing every problem,
each under its config key (``config.eval.batch_size=30: ...``). It also puts values that came
from the command line as strings into their meaning (``--config.flexi.probs=(1,1,2)``).

Command-line overrides are parsed by :func:`flexvision.engine.overrides.parse_flags`.
"""

from __future__ import annotations

import math
from typing import Any

from flexvision.engine.overrides import literal

TASKS = ("classification", "detection", "segmentation")


class ConfigError(ValueError):
    """A config value that cannot work; the message names each offending key."""


# --------------------------------------------------------------------------------------------
# Config values
# --------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Checker:
    def __init__(self, config):
        self.config = config
        self.problems: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        node = self.config
        for part in key.split("."):
            if node is None or not hasattr(node, "get"):
                return default
            node = node.get(part, default)
        return node

    def bad(self, key: str, why: str) -> None:
        value = self.get(key)
        value = value.to_dict() if hasattr(value, "to_dict") else value
        self.problems.append(f"config.{key}={value!r}: {why}")

    def int_at_least(self, key: str, low: int, why: str = "", default: Any = None) -> None:
        value = self.get(key, default)
        if not _is_int(value) or value < low:
            self.bad(key, f"must be an integer >= {low}{why}")

    def sizes(self, key: str, allow_empty: bool) -> list[int]:
        value = self.get(key)
        if value is None and allow_empty:
            return []
        if (isinstance(value, (list, tuple)) and all(_is_int(v) and v > 0 for v in value)
                and (value or allow_empty)):
            return list(value)
        self.bad(key, "must be a " + ("" if allow_empty else "non-empty ")
                 + "list of positive integers, e.g. (8, 16)")
        return []

    def divisible(self, key: str, devices: int) -> None:
        value = self.get(key)
        if not _is_int(value) or value <= 0:
            self.bad(key, "must be a positive integer")
        elif value % devices:
            self.bad(key, f"must be divisible by the {devices} devices (every device gets the "
                          f"same number of rows); use {-(-value // devices) * devices}")

    def call(self, key: str, fn, *args) -> Any:
        try:
            return fn(*args)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            self.bad(key, str(err).strip().splitlines()[0] if str(err).strip() else repr(err))
            return None


def _normalise_probs(config) -> None:
    flexi = config.get("flexi")
    if flexi is None or not isinstance(flexi.get("probs"), str):
        return
    value = literal(flexi.probs)
    if isinstance(value, (list, tuple)):
        with flexi.ignore_type():
            flexi.probs = tuple(value)


def validate_config(config, device_count: int | None = None, build_model=None) -> None:
    """Checks every config value the trainer reads (configs/flexivit_digits.py lists them);
    raises ConfigError naming each bad key, what it holds and what is accepted.

    ``device_count``: devices the batches are split over (default ``jax.device_count()``);
    ``build_model(config)``: how the caller builds the model (default
    ``flexvision.engine.state.build_model``), tried to check ``model.name``/``model.kwargs``.
    Strings given on the command line for sequence-valued keys (``flexi.probs``) are parsed.
    """
    import jax

    from flexvision.data import ops
    from flexvision.engine import losses, optim
    from flexvision.engine import patch_schedule as flexi
    from flexvision.engine.state import build_model as default_build_model

    devices = int(device_count or jax.device_count())
    _normalise_probs(config)
    c = _Checker(config)
    c.int_at_least("seed", 0)
    if not isinstance(c.get("model.name"), str):
        c.bad("model.name", "must be a registered model name (flexvision.list_models())")
    else:
        c.call("model.kwargs" if c.get("model.kwargs") else "model.name",
               build_model or default_build_model, config)
    c.divisible("input.batch_size", devices)
    c.call("input.pp", ops.parse, c.get("input.pp"))
    c.int_at_least("input.shuffle_buffer", 1, default=1)
    if c.get("flexi") is not None and c.get("flexi.patch_sizes"):
        if c.sizes("flexi.patch_sizes", allow_empty=False):
            c.call("flexi.probs", flexi.patch_size_distribution, config.flexi)
    smoothing = c.get("label_smoothing", 0.0)
    if not _is_number(smoothing) or not 0 <= smoothing < 1:
        c.bad("label_smoothing", "must be a number in [0, 1)")
    else:
        c.call("loss", losses.get_loss, c.get("loss", "softmax_xent"), float(smoothing))
    mixup = c.get("mixup_alpha", 0.0)
    if mixup is not None and (not _is_number(mixup) or mixup < 0):
        c.bad("mixup_alpha", "must be a number >= 0 (0 disables mixup)")
    lr = c.get("lr")
    if not _is_number(lr) or lr < 0 or math.isinf(lr):  # NaN is let through: the NaN guard
        c.bad("lr", "must be a finite number >= 0")
    c.int_at_least("total_steps", 0)
    if not c.problems:  # these build on lr and total_steps
        if c.call("schedule", optim.make_schedule, config) is not None:
            c.call("optax", optim.make_optimizer, config)
    c.int_at_least("log_every", 1, default=50)
    c.int_at_least("checkpoint_every", 0, " (0: only the final checkpoint)", default=500)
    c.int_at_least("keep_checkpoints", 0, " (0 keeps every checkpoint)", default=3)
    c.divisible("eval.batch_size", devices)
    c.call("eval.pp", ops.parse, c.get("eval.pp"))
    splits = c.get("eval.splits")
    if not (isinstance(splits, (list, tuple)) and splits
            and all(isinstance(s, str) and s for s in splits)):
        c.bad("eval.splits", "must be a non-empty list of split names, e.g. ('test',)")
    c.sizes("eval.patch_sizes", allow_empty=True)
    c.sizes("eval.resolutions", allow_empty=True)
    c.int_at_least("eval.every", 0, " (0: only at the end)", default=0)
    _check_task(c, config, build_model or default_build_model)
    if c.get("task") == "segmentation":
        _check_segmentation(c)
    if c.problems:
        raise ConfigError(f"invalid config ({len(c.problems)} problem"
                          f"{'s' if len(c.problems) > 1 else ''}): " + "; ".join(c.problems))


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

def _check_task(c: _Checker, config, build_model) -> None:
    """``config.task`` and, for detection, the keys a Mask R-CNN run reads."""
    from flexvision.detection.maskrcnn import list_detectors

    task = c.get("task") or "classification"
    if task not in TASKS:
        c.bad("task", f"must be one of {TASKS}")
        return
    is_detector = c.get("model.name") in list_detectors()
    if task != "detection":
        if is_detector and task == "classification":
            c.bad("task", f"model.name={c.get('model.name')!r} is a detector; set "
                          f"config.task='detection'")
        return
    if not is_detector:
        c.bad("model.name", f"config.task='detection' needs a detector, one of "
                            f"{list_detectors()}")
    if c.get("distill") is not None:
        c.bad("distill", "distillation trains classifiers only; remove config.distill (set it "
                         "to None) for config.task='detection'")
    if c.get("mixup_alpha", 0.0):
        c.bad("mixup_alpha", "mixup is not defined for detection targets; set it to 0")
    if c.get("eval.resolutions"):
        c.bad("eval.resolutions", "detection evals run at the eval pp's size; leave it empty "
                                  "and resize in eval.pp with det_resize")
    capacities = {key: _det_pad_capacity(c, key) for key in ("input.pp", "eval.pp")}
    if c.problems or not is_detector:
        return  # the checks below build the model and read the dataset
    model = c.call("model.name", build_model, config)
    if model is None:
        return
    from flexvision.engine.step import accepts_patch_size

    if c.get("eval.patch_sizes") and not accepts_patch_size(model):
        c.bad("eval.patch_sizes", f"{c.get('model.name')} has no patch_size argument; leave it "
                                  f"empty")
    if c.get("flexi") is not None and c.get("flexi.patch_sizes") and not accepts_patch_size(
            model):
        c.bad("flexi.patch_sizes", f"{c.get('model.name')} has no patch_size argument; set "
                                   f"config.flexi = None")
    c.int_at_least("eval.timing_repeats", 1, default=1)
    for key, default, low_open in (("eval.mask_threshold", 0.5, True),
                                   ("eval.overlay_score", 0.5, False)):
        value = c.get(key, default)
        if not _is_number(value) or not (0 < value < 1 if low_open else 0 <= value <= 1):
            c.bad(key, "must be a number in " + ("(0, 1)" if low_open else "[0, 1]"))
    _check_detection_data(c, model, capacities)


def _det_pad_capacity(c: _Checker, key: str) -> int | None:
    """``max_instances`` of the ``det_pad`` op in the pp string at ``key`` (after a
    ``det_instances``); records a problem when either op is missing."""
    from flexvision.data import ops

    pp = c.get(key)
    if not isinstance(pp, str):
        return None
    try:
        calls = [ops._parse_call(spec.strip()) for spec in pp.split("|") if spec.strip()]
    except ValueError:
        return None  # reported by the pp check itself
    names = [name for name, _, _ in calls]
    if "det_instances" not in names or "det_pad" not in names:
        c.bad(key, "a detection pp must unpack the instances with 'det_instances' and give "
                   "every example one shape with 'det_pad(size, max_instances)', e.g. "
                   "'decode(1)|det_instances|det_pad(128, 32)|value_range(-1, 1)'")
        return None
    _, args, kwargs = calls[names.index("det_pad")]
    return kwargs.get("max_instances", args[1] if len(args) > 1 else None)


_INSTANCE_COUNTS: dict[tuple[str, str], int] = {}


def _most_instances(builder, split: str) -> int:
    """The most instances one example of ``split`` has (masks left undecoded; cached)."""
    import tensorflow_datasets as tfds

    key = (str(builder.data_path), split)
    if key not in _INSTANCE_COUNTS:
        decoders = {"image": tfds.decode.SkipDecoding(),
                    "objects": {"mask": tfds.decode.SkipDecoding()}}
        counts = [len(example["objects"]["label"]) for example in tfds.as_numpy(
            builder.as_dataset(split=split, shuffle_files=False, decoders=decoders))]
        _INSTANCE_COUNTS[key] = max(counts, default=0)
    return _INSTANCE_COUNTS[key]


def _check_detection_data(c: _Checker, model, capacities: dict[str, int | None]) -> None:
    """num_classes (with the background) against the dataset's classes, and each det_pad
    capacity against the most instances an image of its split has."""
    from flexvision.data import pipeline

    builder = c.call("input.name", pipeline.get_builder, c.get("input.name"),
                     c.get("input.data_dir"), c.get("input.coco"))
    if builder is None:
        return
    features = getattr(getattr(builder, "info", None), "features", {})
    if "objects" not in features:
        c.bad("input.name", "is not an instance-segmentation dataset (no 'objects'); use "
                            "'nuclei' or 'coco' (flexvision/data/instances.py)")
        return
    names = list(features["objects"]["label"].names)
    num_classes = model.roi_heads.num_classes
    if num_classes != len(names) + 1:
        c.bad("model.kwargs.num_classes", f"counts the background class: dataset "
                                          f"{c.get('input.name')!r} has {len(names)} "
                                          f"class(es) {names}, so use {len(names) + 1}")
    splits = {"input.pp": [c.get("input.split")], "eval.pp": list(c.get("eval.splits") or [])}
    for key, capacity in capacities.items():
        for split in splits[key]:
            most = c.call(key, _most_instances, builder, split)
            if most is not None and _is_int(capacity) and capacity < most:
                c.bad(key, f"det_pad(..., max_instances={capacity}) holds fewer instances than "
                           f"an image of split {split!r} has ({most}); raise max_instances to "
                           f"at least {most}")


def _check_segmentation(c: _Checker) -> None:
    """The eval keys of flexvision/train/segmentation.py."""
    channel = c.get("eval.coarse_channel")
    if channel is not None and (not _is_int(channel) or channel < 0):
        c.bad("eval.coarse_channel", "must be None or the input channel (>= 0) holding the "
                                     "coarse mask, e.g. 3 for BPR's image + mask input")
    c.int_at_least("eval.boundary_width", 1, " (pixels)", default=1)
    if c.get("mixup_alpha"):
        c.bad("mixup_alpha", "must be 0 for segmentation (mixup would blend the label maps)")
