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
def get_flip_lr(key: str = "image"):
    """Flips the image left-right with probability 1/2."""
    def _op(data):
        data[key] = tf.image.stateless_random_flip_left_right(data[key], seed=_split_rng(data))
        return data
    return _op


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
