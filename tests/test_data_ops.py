"""Preprocessing-op strings: every op's effect, and clear errors for bad names and arguments."""

import numpy as np
import pytest
import tensorflow as tf

from flexvision.data import ops


def _image(h=6, w=8, c=3):
    return np.arange(h * w * c, dtype=np.uint8).reshape(h, w, c)


def _run(pp, image=None, seed=(0, 0), **extra):
    data = {"image": tf.constant(_image() if image is None else image),
            ops.RNG_KEY: tf.constant(seed, tf.int64), **extra}
    return {k: v.numpy() for k, v in ops.parse(pp)(data).items()}


def test_decode_png_and_grayscale_to_rgb():
    gray = np.random.default_rng(0).integers(0, 256, (5, 7, 1), dtype=np.uint8)
    encoded = tf.io.encode_png(gray)
    out = _run("decode", image=encoded)["image"]
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(gray, 3, axis=-1))
    np.testing.assert_array_equal(_run("decode(1)", image=encoded)["image"], gray)


def test_resize_exact_size_and_constant_image_stays_constant():
    const = np.full((8, 8, 3), 77, np.uint8)
    out = _run("resize(48)", image=const)["image"]
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    assert (out == 77).all()
    assert _run("resize((3, 5))")["image"].shape == (3, 5, 3)
    nearest = _run("resize(16, method='nearest')", image=_image(8, 8))["image"]
    np.testing.assert_array_equal(nearest[::2, ::2], _image(8, 8))


def test_resize_small_keeps_aspect():
    assert _run("resize_small(3)", image=_image(6, 8))["image"].shape == (3, 4, 3)
    assert _run("resize_small(12)", image=_image(8, 6))["image"].shape == (16, 12, 3)


def test_central_crop_is_the_middle_window():
    image = _image(6, 8)
    np.testing.assert_array_equal(_run("central_crop((2, 4))", image=image)["image"],
                                  image[2:4, 2:6])


def test_random_crop_is_a_window_and_deterministic_per_seed():
    image = _image(6, 8)
    out = _run("random_crop(3)", image=image, seed=(1, 2))["image"]
    assert out.shape == (3, 3, 3)
    windows = [image[i:i + 3, j:j + 3] for i in range(4) for j in range(6)]
    assert any((out == w).all() for w in windows)
    np.testing.assert_array_equal(out, _run("random_crop(3)", image=image, seed=(1, 2))["image"])
    crops = {_run("random_crop(3)", image=image, seed=(1, s))["image"].tobytes() for s in range(20)}
    assert len(crops) > 1


def test_inception_crop_size_and_determinism():
    image = np.random.default_rng(1).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    first = _run("inception_crop(16)", image=image, seed=(3, 4))["image"]
    assert first.shape == (16, 16, 3)
    np.testing.assert_array_equal(first, _run("inception_crop(16)", image=image,
                                              seed=(3, 4))["image"])
    full = _run("inception_crop(area_min=100, area_max=100)", image=image)["image"]
    assert full.shape[0] * full.shape[1] >= 0.9 * 32 * 40


def test_flip_lr_flips_for_some_seeds_only():
    image = _image(4, 5)
    outs = [_run("flip_lr", image=image, seed=(0, s))["image"] for s in range(16)]
    flipped = [bool((o == image[:, ::-1]).all()) for o in outs]
    assert all(f or (o == image).all() for f, o in zip(flipped, outs))
    assert 0 < sum(flipped) < 16


def test_value_range_maps_endpoints():
    image = np.array([[[0], [255]], [[51], [102]]], np.uint8)
    out = _run("value_range(-1, 1)", image=image)["image"]
    np.testing.assert_allclose(out[..., 0], [[-1, 1], [-0.6, -0.2]], atol=1e-6)
    clipped = _run("value_range(0, 1, in_min=51, in_max=102, clip_values=True)", image=image)
    np.testing.assert_allclose(clipped["image"][..., 0], [[0, 1], [0, 1]], atol=1e-6)


def test_onehot_keep_copy():
    out = _run("onehot(4, on=0.9, off=0.1)|copy('labels', 'target')|keep('target')",
               label=tf.constant(2, tf.int64))
    assert set(out) == {"target", ops.RNG_KEY}
    np.testing.assert_allclose(out["target"], [0.1, 0.1, 0.9, 0.1])


def test_full_pipeline_string():
    encoded = tf.io.encode_png(_image(8, 8))
    out = _run("decode|inception_crop(24)|flip_lr|value_range(-1, 1)|onehot(10)", image=encoded,
               label=tf.constant(3, tf.int64))
    assert out["image"].shape == (24, 24, 3) and out["image"].dtype == np.float32
    assert -1 <= out["image"].min() and out["image"].max() <= 1
    assert out["labels"].argmax() == 3


@pytest.mark.parametrize("pp, message", [
    ("decode|flip_ud", "unknown preprocessing op 'flip_ud'"),
    ("resise(32)", "Did you mean 'resize'"),
    ("resize", "bad arguments for preprocessing op 'resize'"),
    ("resize(32, 32, 32, 32, 32)", "Usage: resize"),
    ("value_range(-1, 1, scale=2)", "unexpected keyword argument 'scale'"),
    ("resize(-4)", "size must be positive"),
    ("resize('big')", "size must be a positive int or a pair of positive ints"),
    ("resize(32, method='cubic')", "method must be one of"),
    ("onehot(0)", "depth must be a positive int"),
    ("inception_crop(32, area_min=50, area_max=20)", "area_min <= area_max"),
    ("decode(4)", "channels must be 1 or 3"),
    ("resize(32", "cannot parse preprocessing op"),
    ("resize(size)", "must be Python literals"),
    ("", "non-empty string"),
])
def test_bad_op_strings_raise_clear_errors(pp, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.parse(pp)


def test_random_op_without_seed_explains():
    with pytest.raises(ValueError, match="per-example seed"):
        ops.parse("flip_lr")({"image": tf.constant(_image())})


def test_register_custom_op_and_duplicate_name():
    @ops.register_op("_test_invert")
    def _get_invert(key="image"):
        def _op(data):
            data[key] = 255 - data[key]
            return data
        return _op

    np.testing.assert_array_equal(_run("_test_invert")["image"], 255 - _image())
    assert "_test_invert" in ops.list_ops()
    with pytest.raises(ValueError, match="registered twice"):
        ops.register_op("_test_invert")(_get_invert)
