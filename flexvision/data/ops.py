"""Preprocessing ops driven by strings, after big_vision's ``pp/`` registry.

A preprocessing string is a ``|``-separated list of op calls, each a registered name with
Python-literal arguments::

    "decode|inception_crop(240)|flip_lr|value_range(-1, 1)|onehot(1000)"

Every op is a factory: called with the parsed arguments it returns a function from a feature
dict (``{"image": ..., "label": ...}``, TensorFlow tensors of one example) to a feature dict.
Random ops never use TensorFlow's stateful RNG: they draw from the stateless seed in
``data["_rng"]`` (shape [2], int64), which the input pipeline derives from (seed, example
index). The same example at the same position therefore always gets the same augmentation, and a
resumed run sees exactly the data an uninterrupted one would.

Register an op with::

    @register_op("my_op")
    def get_my_op(size: int):
        def _my_op(data):
            ...
            return data
        return _my_op
"""

from __future__ import annotations

import ast
import difflib
import inspect
from typing import Any, Callable

import tensorflow as tf

from flexvision.layers.flex import to_pair
from flexvision.layers.instances import PADDED_DTYPES, capacity_error

RNG_KEY = "_rng"
Op = Callable[[dict], dict]

_OPS: dict[str, Callable[..., Op]] = {}


def register_op(name: str) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
    """Decorator registering an op factory under ``name`` for preprocessing strings."""
    def _register(factory: Callable[..., Op]) -> Callable[..., Op]:
        if name in _OPS:
            raise ValueError(f"preprocessing op {name!r} is registered twice")
        _OPS[name] = factory
        return factory
    return _register


def list_ops() -> list[str]:
    """Names of all registered preprocessing ops."""
    return sorted(_OPS)


def _parse_call(spec: str) -> tuple[str, list[Any], dict[str, Any]]:
    """Splits ``"name(arg, key=value)"`` into the name and its literal arguments."""
    try:
        node = ast.parse(spec, mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"cannot parse preprocessing op {spec!r}: {err.msg}. Write ops as "
                         f"name or name(args), e.g. 'resize(224)' or 'value_range(-1, 1)'.") from None
    if isinstance(node, ast.Name):
        return node.id, [], {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"cannot parse preprocessing op {spec!r}: expected name or name(args), "
                         f"e.g. 'flip_lr' or 'resize(224)'")
    try:
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
        raise ValueError(f"arguments of preprocessing op {spec!r} must be Python literals "
                         f"(numbers, strings, tuples, lists, None)") from None
    return node.func.id, args, kwargs


def get_op(spec: str) -> Op:
    """The op function for one call such as ``"resize(64)"``; ValueError for bad names/args."""
    name, args, kwargs = _parse_call(spec.strip())
    if name not in _OPS:
        close = difflib.get_close_matches(name, _OPS, n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown preprocessing op {name!r} in {spec!r}.{hint} "
                         f"Known ops: {', '.join(list_ops())}.")
    factory = _OPS[name]
    signature = inspect.signature(factory)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for preprocessing op {name!r} in {spec!r}: {err}. "
                         f"Usage: {name}{signature}") from None
    try:
        return factory(*args, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"bad arguments for preprocessing op {name!r} in {spec!r}: {err}. "
                         f"Usage: {name}{signature}") from None


def parse(pp: str) -> Op:
    """The composition of all ops in a ``|``-separated preprocessing string."""
    if not isinstance(pp, str) or not pp.strip():
        raise ValueError(f"a preprocessing string must be a non-empty string of ops separated "
                         f"by '|', got {pp!r}")
    ops = [get_op(spec) for spec in pp.split("|") if spec.strip()]

    def _apply(data: dict) -> dict:
        data = dict(data)
        for op in ops:
            data = op(data)
        return data
    return _apply


# ----------------------------------------------------------------------------- helpers

def _split_rng(data: dict) -> tf.Tensor:
    """A fresh stateless seed for one random op; advances ``data['_rng']``."""
    if RNG_KEY not in data:
        raise ValueError("random preprocessing ops need a per-example seed in data['_rng']; "
                         "run them through flexvision.data pipelines, or add one yourself")
    seeds = tf.random.experimental.stateless_split(data[RNG_KEY], num=2)
    data[RNG_KEY] = seeds[0]
    return seeds[1]


def _resize(image: tf.Tensor, size: tuple[int, int], method: str) -> tf.Tensor:
    dtype = image.dtype
    image = tf.image.resize(image, size, method=method, antialias=True)
    if dtype == tf.uint8:
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return tf.cast(image, dtype)


_RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian",
                   "mitchellcubic")


def _check_method(method: str) -> str:
    if method not in _RESIZE_METHODS:
        raise ValueError(f"method must be one of {_RESIZE_METHODS}, got {method!r}")
    return method


# ----------------------------------------------------------------------------- ops

@register_op("decode")
def get_decode(channels: int = 3, key: str = "image"):
    """Decodes encoded image bytes (JPEG/PNG/...) to uint8 HWC with ``channels`` channels."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")

    def _decode(data):
        image = data[key]
        if image.dtype == tf.string:
            image = tf.io.decode_image(image, channels=channels, expand_animations=False)
        elif image.shape[-1] == 1 and channels == 3:
            image = tf.image.grayscale_to_rgb(image)
        data[key] = image
        return data
    return _decode


@register_op("resize")
def get_resize(size, method: str = "bilinear", key: str = "image"):
    """Resizes the image to exactly ``size`` (int or (height, width)), antialiased."""
    size = to_pair(size)
    method = _check_method(method)

    def _op(data):
        data[key] = _resize(data[key], size, method)
        return data
    return _op


@register_op("resize_small")
def get_resize_small(smaller_size: int, method: str = "bilinear", key: str = "image"):
    """Resizes so that the shorter side is ``smaller_size``, keeping the aspect ratio."""
    smaller_size = to_pair(smaller_size, "smaller_size")[0]
    method = _check_method(method)

    def _op(data):
        image = data[key]
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        ratio = tf.cast(smaller_size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
        new_h = tf.cast(tf.round(tf.cast(h, tf.float32) * ratio), tf.int32)
        new_w = tf.cast(tf.round(tf.cast(w, tf.float32) * ratio), tf.int32)
        data[key] = _resize(image, tf.stack([new_h, new_w]), method)
        return data
    return _op


@register_op("central_crop")
def get_central_crop(size, key: str = "image"):
    """Crops the central ``size`` window (the image must be at least that large)."""
    crop_h, crop_w = to_pair(size)

    def _op(data):
        image = data[key]
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        data[key] = tf.image.crop_to_bounding_box(image, top, left, crop_h, crop_w)
        return data
    return _op


@register_op("random_crop")
def get_random_crop(size, key: str = "image"):
    """Crops a uniformly placed ``size`` window."""
    crop_h, crop_w = to_pair(size)

    def _op(data):
        image = data[key]
        shape = tf.stack([crop_h, crop_w, tf.shape(image)[-1]])
        data[key] = tf.image.stateless_random_crop(image, shape, seed=_split_rng(data))
        return data
    return _op


@register_op("inception_crop")
def get_inception_crop(size=None, area_min: float = 5, area_max: float = 100,
                       method: str = "bilinear", key: str = "image"):
    """Inception-style random crop (Szegedy et al. 2015): a window covering ``area_min``..
    ``area_max`` percent of the image with aspect ratio in [3/4, 4/3], resized to ``size``."""
    if not 0 < area_min <= area_max <= 100:
        raise ValueError(f"need 0 < area_min <= area_max <= 100 (percent), got "
                         f"area_min={area_min!r}, area_max={area_max!r}")
    size = None if size is None else to_pair(size)
    method = _check_method(method)

    def _op(data):
        image = data[key]
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=_split_rng(data),
            area_range=(area_min / 100, area_max / 100), aspect_ratio_range=(3 / 4, 4 / 3),
            min_object_covered=0, use_image_if_no_bounding_boxes=True)
        crop = tf.slice(image, begin, crop_size)
        crop.set_shape([None, None, image.shape[-1]])
        data[key] = crop if size is None else _resize(crop, size, method)
        return data
    return _op


@register_op("flip_lr")
def get_flip_lr(key="image"):
    """Flips the image left-right with probability 1/2.

    ``key`` may be a tuple of keys, e.g. ``flip_lr(('image', 'mask', 'label'))``: one draw
    flips all of them or none (a segmentation example's image, input mask and per-pixel
    labels, each [H, W, ...], stay aligned; BPR's ``RandomFlip`` on img and gt_semantic_seg).
    """
    if isinstance(key, str):
        def _op(data):
            data[key] = tf.image.stateless_random_flip_left_right(data[key],
                                                                  seed=_split_rng(data))
            return data
        return _op
    keys = tuple(key)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"key must be a key name or a tuple of key names, got {key!r}")

    def _op_together(data):
        flip = tf.random.stateless_uniform([], seed=_split_rng(data)) < 0.5
        for k in keys:
            data[k] = tf.cond(flip, lambda k=k: tf.reverse(data[k], axis=[1]),
                              lambda k=k: data[k])
        return data
    return _op_together


@register_op("value_range")
def get_value_range(vmin: float = -1, vmax: float = 1, in_min: float = 0, in_max: float = 255,
                    clip_values: bool = False, key: str = "image"):
    """Maps [in_min, in_max] linearly to [vmin, vmax] (float32), optionally clipping."""
    if in_min == in_max:
        raise ValueError(f"in_min and in_max must differ, got {in_min!r} for both")

    def _op(data):
        image = tf.cast(data[key], tf.float32)
        image = (image - in_min) / (in_max - in_min) * (vmax - vmin) + vmin
        if clip_values:
            image = tf.clip_by_value(image, min(vmin, vmax), max(vmin, vmax))
        data[key] = image
        return data
    return _op


@register_op("onehot")
def get_onehot(depth: int, key: str = "label", key_result: str = "labels", on: float = 1.0,
               off: float = 0.0):
    """One-hot encodes integer ``data[key]`` into ``data[key_result]`` (float32, ``depth``)."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth <= 0:
        raise ValueError(f"depth must be a positive int (the number of classes), got {depth!r}")

    def _op(data):
        data[key_result] = tf.one_hot(tf.cast(data[key], tf.int32), depth, on_value=on,
                                      off_value=off, dtype=tf.float32)
        return data
    return _op


# mmseg PhotoMetricDistortion defaults (tinyalpha/BPR configs/bpr/*.py use them)
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # OpenCV hue units of 2 degrees; numpy randint(-18, 18) draws -18 .. 17


def _truncate(image: tf.Tensor) -> tf.Tensor:
    """mmseg's ``convert``: clip to [0, 255], then ``astype(np.uint8)`` (truncation)."""
    return tf.floor(tf.clip_by_value(image, 0.0, 255.0))


@register_op("photometric_distortion")
def get_photometric_distortion(brightness_delta: float = BRIGHTNESS_DELTA,
                               contrast_range=CONTRAST_RANGE, saturation_range=SATURATION_RANGE,
                               hue_delta: int = HUE_DELTA, key: str = "image"):
    """mmseg ``PhotoMetricDistortion`` (mmseg/datasets/pipelines/transforms.py, BPR's training
    pipeline) on one RGB uint8 image [H, W, 3], each step applied with probability 1/2:
    brightness + U(-delta, delta); contrast x U(range) either right after it or last (1/2
    each); saturation x U(range); hue + randint(-hue_delta, hue_delta) OpenCV units (2 degrees).

    As mmseg on uint8 images: after brightness and contrast the pixels are clipped to [0, 255]
    and truncated to integers, saturation is clipped and truncated on OpenCV's 0..255 scale,
    and the HSV -> RGB conversion rounds. Not replicated: OpenCV's uint8 HSV quantises hue to
    2-degree units and value to integers before the conversion back; here HSV is float
    (``tf.image.rgb_to_hsv``). Returns uint8.
    """
    low_c, high_c = (float(v) for v in contrast_range)
    low_s, high_s = (float(v) for v in saturation_range)
    if not 0 <= low_c <= high_c or not 0 <= low_s <= high_s or brightness_delta < 0:
        raise ValueError(f"need brightness_delta >= 0 and ranges 0 <= low <= high, got "
                         f"{brightness_delta!r}, {contrast_range!r}, {saturation_range!r}")
    if not isinstance(hue_delta, int) or not 0 <= hue_delta < 180:
        raise ValueError(f"hue_delta must be an int in [0, 180) (OpenCV units), got "
                         f"{hue_delta!r}")

    def _op(data):
        image = data[key]
        if image.shape[-1] != 3:
            raise ValueError(f"photometric_distortion needs an RGB [H, W, 3] image under "
                             f"{key!r}, got shape {image.shape}; decode with channels=3")
        seeds = tf.random.experimental.stateless_split(_split_rng(data), num=9)

        def coin(i):
            return tf.random.stateless_uniform([], seed=seeds[i]) < 0.5

        def uniform(i, low, high):
            return tf.random.stateless_uniform([], seed=seeds[i], minval=low, maxval=high)

        image = tf.cast(image, tf.float32)
        image = tf.where(coin(0), _truncate(image + uniform(1, -brightness_delta,
                                                            brightness_delta)), image)
        contrast_alpha = uniform(3, low_c, high_c)
        apply_contrast = coin(2)

        def contrast(x):
            return tf.where(apply_contrast, _truncate(x * contrast_alpha), x)

        contrast_first = coin(4)
        image = tf.where(contrast_first, contrast(image), image)
        hsv = tf.image.rgb_to_hsv(image / 255.0)
        saturation = tf.floor(tf.clip_by_value(hsv[..., 1] * 255.0 * uniform(6, low_s, high_s),
                                               0.0, 255.0)) / 255.0
        hsv = tf.stack([hsv[..., 0], saturation, hsv[..., 2]], axis=-1)
        image = tf.where(coin(5), tf.round(tf.image.hsv_to_rgb(hsv) * 255.0), image)
        hsv = tf.image.rgb_to_hsv(image / 255.0)
        shift = tf.cast(tf.random.stateless_uniform([], seeds[8], minval=-hue_delta,
                                                    maxval=max(hue_delta, 1), dtype=tf.int32)
                        if hue_delta else 0, tf.float32) / 180.0
        hsv = tf.stack([tf.math.floormod(hsv[..., 0] + shift, 1.0), hsv[..., 1], hsv[..., 2]],
                       axis=-1)
        image = tf.where(coin(7), tf.round(tf.image.hsv_to_rgb(hsv) * 255.0), image)
        image = tf.where(contrast_first, image, contrast(image))
        data[key] = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
        return data
    return _op


@register_op("standardize")
def get_standardize(mean, std, key: str = "image"):
    """(x - mean) / std per channel (float32); ``mean`` and ``std`` are numbers or one per
    channel, in the image's units (e.g. BPR's/mmseg's RGB 0..255 statistics,
    ``flexvision.detection.bpr.IMAGE_MEAN`` / ``IMAGE_STD``)."""
    mean_values = [float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean])]
    std_values = [float(v) for v in (std if isinstance(std, (list, tuple)) else [std])]
    if not all(v > 0 for v in std_values):
        raise ValueError(f"std must be positive, got {std!r}")

    def _op(data):
        data[key] = (tf.cast(data[key], tf.float32) - mean_values) / std_values
        return data
    return _op


@register_op("concat_channels")
def get_concat_channels(keys, key_result: str = "image"):
    """Concatenates ``data[k]`` for ``k`` in ``keys`` along the last axis (as float32) into
    ``data[key_result]``: e.g. BPR's image + coarse mask -> a 4-channel network input."""
    keys = tuple(keys) if isinstance(keys, (list, tuple)) else ()
    if len(keys) < 2 or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"keys must be a tuple of at least two key names, got {keys!r}")

    def _op(data):
        data[key_result] = tf.concat([tf.cast(data[k], tf.float32) for k in keys], axis=-1)
        return data
    return _op


@register_op("squeeze")
def get_squeeze(key: str, axis: int = -1):
    """Removes the size-1 axis ``axis`` of ``data[key]`` (a decoded [H, W, 1] label map ->
    [H, W] for ``onehot``)."""
    def _op(data):
        data[key] = tf.squeeze(data[key], axis=axis)
        return data
    return _op


@register_op("keep")
def get_keep(*keys: str):
    """Keeps only the given keys (and the internal seed)."""
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"keep needs one or more key names, got {keys!r}")

    def _op(data):
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"keep{keys}: keys {missing} not in the example (has {sorted(data)})")
        return {k: v for k, v in data.items() if k in keys or k == RNG_KEY}
    return _op


@register_op("copy")
def get_copy(inkey: str, outkey: str):
    """Copies ``data[inkey]`` to ``data[outkey]``."""
    def _op(data):
        data[outkey] = data[inkey]
        return data
    return _op


# ----------------------------------------------------------------------------- detection ops
#
# Instance data (boxes, labels, masks) travels with the image under fixed keys, and every op
# that moves pixels moves the instances with them:
#   image [H, W, C], boxes [N, 4] float32 (x1, y1, x2, y2 pixels), labels [N] int32,
#   masks [N, H, W] uint8 in {0, 1}, is_crowd [N] bool;
# after det_pad also valid [K] bool (K = capacity) and image_size [2] int32 (unpadded H, W).
# Boxes stay the tight boxes of their masks (as flexvision.data.coco.boxes_from_masks computes
# them) through every op; instances whose mask loses all its pixels are dropped.

_INSTANCE_KEYS = ("boxes", "labels", "masks", "is_crowd")


def _check_instances(data: dict, op: str):
    missing = [k for k in ("image",) + _INSTANCE_KEYS if k not in data]
    if missing:
        raise ValueError(f"{op} needs the keys {missing}; run 'det_instances' after 'decode' "
                         f"first (it unpacks the dataset's 'objects')")


def _tight_boxes(masks: tf.Tensor) -> tf.Tensor:
    """Tight (x1, y1, x2, y2) boxes of [N, H, W] masks (zeros for empty masks), float32."""
    masks = tf.cast(masks, tf.bool)
    h, w = tf.shape(masks)[1], tf.shape(masks)[2]
    rows, cols = tf.reduce_any(masks, axis=2), tf.reduce_any(masks, axis=1)

    def _span(hit, n):
        index = tf.range(n)[None]
        first = tf.reduce_min(tf.where(hit, index, n), axis=1)
        last = tf.reduce_max(tf.where(hit, index, -1), axis=1) + 1
        empty = tf.logical_not(tf.reduce_any(hit, axis=1))
        return (tf.cast(tf.where(empty, 0, first), tf.float32),
                tf.cast(tf.where(empty, 0, last), tf.float32))
    y1, y2 = _span(rows, h)
    x1, x2 = _span(cols, w)
    return tf.stack([x1, y1, x2, y2], axis=1)


def _drop_empty(data: dict) -> dict:
    """Removes instances whose mask has no pixel left."""
    keep = tf.reduce_any(tf.cast(data["masks"], tf.bool), axis=[1, 2])
    for k in _INSTANCE_KEYS:
        data[k] = tf.boolean_mask(data[k], keep)
    return data


@register_op("det_instances")
def get_det_instances(key: str = "objects"):
    """Unpacks a TFDS instance sequence (``box``, ``label``, ``mask`` [N, H, W, 1],
    ``is_crowd``; see flexvision.data.instances) into the detection keys above. Needs the
    decoded image (run ``decode`` first)."""
    def _op(data):
        if key not in data:
            raise ValueError(f"det_instances: no {key!r} in the example (has {sorted(data)})")
        objects = data.pop(key)
        data["boxes"] = tf.reshape(tf.cast(objects["box"], tf.float32), [-1, 4])
        data["labels"] = tf.cast(objects["label"], tf.int32)
        if data["image"].dtype == tf.string:
            raise ValueError("det_instances needs the decoded image: put 'decode' before it")
        # reshaping gives an image without instances masks of shape [0, H, W] (TFDS decodes an
        # empty sequence of images to [0, 0, 0, 1]).
        image_shape = tf.shape(data["image"])
        data["masks"] = tf.reshape(tf.cast(objects["mask"], tf.uint8),
                                   [-1, image_shape[0], image_shape[1]])
        data["is_crowd"] = tf.cast(objects["is_crowd"], tf.bool)
        return data
    return _op


def _flip(axis: int, name: str):
    def _op(data):
        _check_instances(data, name)
        do_flip = tf.random.stateless_uniform([], seed=_split_rng(data)) < 0.5

        def flipped():
            image, masks, boxes = data["image"], data["masks"], data["boxes"]
            extent = tf.cast(tf.shape(image)[1 - axis], tf.float32)  # W for lr, H for ud
            lo, hi = (0, 2) if axis == 0 else (1, 3)
            new_lo, new_hi = extent - boxes[:, hi], extent - boxes[:, lo]
            columns = [boxes[:, i] for i in range(4)]
            columns[lo], columns[hi] = new_lo, new_hi
            return (tf.reverse(image, [1 - axis]), tf.reverse(masks, [2 - axis]),
                    tf.stack(columns, axis=1))
        image, masks, boxes = tf.cond(do_flip, flipped,
                                      lambda: (data["image"], data["masks"], data["boxes"]))
        data["image"], data["masks"], data["boxes"] = image, masks, boxes
        return data
    return _op


@register_op("det_flip_lr")
def get_det_flip_lr():
    """Flips image, masks and boxes left-right together with probability 1/2."""
    return _flip(0, "det_flip_lr")


@register_op("det_flip_ud")
def get_det_flip_ud():
    """Flips image, masks and boxes upside-down together with probability 1/2."""
    return _flip(1, "det_flip_ud")


def _fit_size(data: dict, target_h: int, target_w: int, scale) -> tf.Tensor:
    """(H', W') = round((H, W) * scale * min(H_t / H, W_t / W)), at least 1."""
    h = tf.cast(tf.shape(data["image"])[0], tf.float32)
    w = tf.cast(tf.shape(data["image"])[1], tf.float32)
    factor = tf.minimum(target_h / h, target_w / w) * scale
    return tf.maximum(1, tf.cast(tf.round(tf.stack([h, w]) * factor), tf.int32))


def _resize_instances(data: dict, new_size: tf.Tensor, method: str) -> dict:
    """Resizes the image (``method``, antialiased) and masks (bilinear, binarised at 1/2) to
    ``new_size``; boxes become the masks' tight boxes; emptied instances are dropped."""
    data["image"] = _resize(data["image"], new_size, method)
    masks = tf.image.resize(tf.cast(data["masks"][..., None], tf.float32), new_size,
                            method="bilinear")[..., 0]
    data["masks"] = tf.cast(masks >= 0.5, tf.uint8)
    data["boxes"] = _tight_boxes(data["masks"])
    return _drop_empty(data)


@register_op("det_resize")
def get_det_resize(size, method: str = "bilinear"):
    """Resizes image and instances to the largest size within ``size`` keeping the aspect
    ratio (deterministic, e.g. for evaluation). Masks are resized bilinearly and binarised at
    1/2, boxes recomputed as their tight boxes, instances left without pixels dropped."""
    target_h, target_w = to_pair(size)
    method = _check_method(method)

    def _op(data):
        _check_instances(data, "det_resize")
        return _resize_instances(data, _fit_size(data, target_h, target_w, 1.0), method)
    return _op


@register_op("det_scale_jitter")
def get_det_scale_jitter(size, min_scale: float = 0.5, max_scale: float = 2.0,
                         method: str = "bilinear"):
    """Large-scale jitter (Ghiasi et al. 2021, "Simple Copy-Paste", Sec. 3.1).

    Resizes the image by ``s * min(H_t / H, W_t / W)`` with ``s`` uniform in
    [``min_scale``, ``max_scale``] and (H_t, W_t) = ``size``, then crops a uniformly placed
    window of at most ``size``. Masks are resized bilinearly and binarised at 1/2, boxes are
    recomputed as the masks' tight boxes, instances left without pixels are dropped. Follow it
    with ``det_pad(size, capacity)`` for a fixed shape.
    """
    target_h, target_w = to_pair(size)
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale!r}, {max_scale!r}")
    method = _check_method(method)

    def _op(data):
        _check_instances(data, "det_scale_jitter")
        scale = tf.random.stateless_uniform([], seed=_split_rng(data), minval=min_scale,
                                            maxval=max_scale)
        new_size = _fit_size(data, target_h, target_w, scale)
        new_h, new_w = new_size[0], new_size[1]
        crop_h, crop_w = tf.minimum(new_h, target_h), tf.minimum(new_w, target_w)
        offset = tf.random.stateless_uniform([2], seed=_split_rng(data))
        top = tf.cast(offset[0] * tf.cast(new_h - crop_h + 1, tf.float32), tf.int32)
        left = tf.cast(offset[1] * tf.cast(new_w - crop_w + 1, tf.float32), tf.int32)
        top, left = tf.minimum(top, new_h - crop_h), tf.minimum(left, new_w - crop_w)
        data = _resize_instances(data, new_size, method)
        data["image"] = data["image"][top:top + crop_h, left:left + crop_w]
        data["masks"] = data["masks"][:, top:top + crop_h, left:left + crop_w]
        data["boxes"] = _tight_boxes(data["masks"])
        return _drop_empty(data)
    return _op


@register_op("det_pad")
def get_det_pad(size, max_instances: int):
    """Pads the image (zeros, bottom/right) to ``size`` and the instances to ``max_instances``.

    The instances take the padded layout of :mod:`flexvision.layers.instances` (the one
    ``detection.targets.pad_targets`` produces too): ``valid`` [max_instances] (True for the
    real instances, in order) and zero boxes, masks, labels after them; also ``image_size``
    [2] (the unpadded height, width). An image larger
    than ``size`` or with more than ``max_instances`` instances fails (InvalidArgumentError):
    resize/crop first (e.g. det_scale_jitter) or raise the capacity.
    """
    target_h, target_w = to_pair(size)
    if not isinstance(max_instances, int) or isinstance(max_instances, bool) or max_instances < 1:
        raise ValueError(f"max_instances must be a positive int, got {max_instances!r}")

    def _op(data):
        _check_instances(data, "det_pad")
        image = data["image"]
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        n = tf.shape(data["boxes"])[0]
        checks = [
            tf.debugging.assert_less_equal(
                tf.stack([h, w]), tf.constant([target_h, target_w]),
                message=f"det_pad({(target_h, target_w)}): the image is larger; resize or crop "
                        f"it first"),
            tf.debugging.assert_less_equal(
                n, max_instances, message=f"det_pad: {capacity_error(max_instances)}"),
        ]
        with tf.control_dependencies(checks):
            data["image"] = tf.pad(image, [[0, target_h - h], [0, target_w - w], [0, 0]])
            extra = max_instances - n
        data["image"].set_shape([target_h, target_w, image.shape[-1]])
        data["masks"] = tf.pad(data["masks"], [[0, extra], [0, target_h - h], [0, target_w - w]])
        data["masks"].set_shape([max_instances, target_h, target_w])
        for k, tail in (("boxes", [[0, 0]]), ("labels", []), ("is_crowd", [])):
            data[k] = tf.pad(data[k], [[0, extra]] + tail)
            data[k].set_shape([max_instances] + data[k].shape[1:].as_list())
        for k in ("boxes", "labels", "masks"):
            data[k] = tf.cast(data[k], PADDED_DTYPES[k])
        data["valid"] = tf.range(max_instances) < n
        data["image_size"] = tf.stack([h, w])
        return data
    return _op
