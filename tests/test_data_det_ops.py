"""Detection preprocessing ops: image, boxes and masks move together; static padded shapes."""

import numpy as np
import pytest
import tensorflow as tf

from flexvision.data import coco, ops
from flexvision.detection import targets as targets_lib
from flexvision.layers.instances import PADDED_DTYPES


def _instances(h=48, w=64):
    """Three rectangles and an L shape on a gradient image, as TFDS 'objects'."""
    masks = np.zeros((4, h, w), np.uint8)
    masks[0, 2:10, 3:20] = 1
    masks[1, 30:47, 40:64] = 1
    masks[2, 20:21, 0:1] = 1  # a single pixel at the left border
    masks[3, 5:25, 30:34] = 1
    masks[3, 21:25, 30:45] = 1
    image = (np.arange(h)[:, None, None] * 3 + np.arange(w)[None, :, None] + np.zeros(3))
    return {"image": tf.constant(image.astype(np.uint8)),
            "objects": {"box": tf.constant(coco.boxes_from_masks(masks)),
                        "label": tf.constant([0, 1, 0, 1], tf.int64),
                        "mask": tf.constant(masks[..., None]),
                        "is_crowd": tf.constant([False, False, False, True])}}


def _run(pp, seed=(0, 0), data=None):
    data = dict(_instances() if data is None else data)
    data[ops.RNG_KEY] = tf.constant(seed, tf.int64)
    return {k: v.numpy() for k, v in ops.parse(pp)(data).items()}


def _assert_consistent(out):
    """Boxes are the tight boxes of the masks; masks are binary; shapes agree with the image."""
    masks = out["masks"]
    assert masks.shape[1:] == out["image"].shape[:2]
    assert set(np.unique(masks)) <= {0, 1}
    np.testing.assert_array_equal(out["boxes"], coco.boxes_from_masks(masks))


def test_det_instances_unpacks():
    out = _run("det_instances")
    assert "objects" not in out
    assert out["boxes"].shape == (4, 4) and out["masks"].shape == (4, 48, 64)
    assert out["labels"].dtype == np.int32 and out["is_crowd"].tolist() == [0, 0, 0, 1]
    _assert_consistent(out)
    with pytest.raises(ValueError, match="put 'decode' before it"):
        _run("det_instances", data={**_instances(), "image": tf.constant(b"png")})
    with pytest.raises(ValueError, match="run 'det_instances' after 'decode'"):
        _run("det_flip_lr")


@pytest.mark.parametrize("op,axis", [("det_flip_lr", 1), ("det_flip_ud", 0)])
def test_flips_move_image_masks_and_boxes_together(op, axis):
    plain = _run("det_instances")
    outcomes = set()
    for seed in range(8):
        out = _run(f"det_instances|{op}", seed=(seed, 1))
        flipped = not np.array_equal(out["image"], plain["image"])
        outcomes.add(flipped)
        if flipped:
            np.testing.assert_array_equal(out["image"], np.flip(plain["image"], axis))
            np.testing.assert_array_equal(out["masks"], np.flip(plain["masks"], axis + 1))
        else:
            np.testing.assert_array_equal(out["masks"], plain["masks"])
        _assert_consistent(out)
        np.testing.assert_array_equal(out["labels"], plain["labels"])
    assert outcomes == {True, False}  # both branches happen
    again = _run(f"det_instances|{op}", seed=(3, 1))  # a function of the seed
    np.testing.assert_array_equal(again["boxes"], _run(f"det_instances|{op}", seed=(3, 1))["boxes"])


def test_scale_jitter_keeps_boxes_tight_and_drops_lost_instances():
    sizes, counts = set(), set()
    for seed in range(12):
        out = _run("det_instances|det_scale_jitter((40, 50), 0.3, 2.0)", seed=(seed, 2))
        h, w = out["image"].shape[:2]
        assert h <= 40 and w <= 50
        _assert_consistent(out)
        assert (out["masks"].reshape(len(out["masks"]), -1).max(axis=1) == 1).all()  # none empty
        assert len(out["labels"]) == len(out["boxes"]) == len(out["is_crowd"])
        sizes.add((h, w))
        counts.add(len(out["boxes"]))
    assert len(sizes) > 3 and len(counts) > 1  # scales vary; small/cropped instances vanish
    # scale 1 exactly (min = max = 1, target = image size): nothing changes
    out = _run("det_instances|det_scale_jitter((48, 64), 1.0, 1.0)")
    plain = _run("det_instances")
    for key in ("image", "masks", "boxes", "labels"):
        np.testing.assert_array_equal(out[key], plain[key])


def test_scale_jitter_upscale_matches_pixel_repetition_of_masks():
    # fit to (96, 128) is x2; scale 1: no crop
    out = _run("det_instances|det_scale_jitter((96, 128), 1.0, 1.0)")
    plain = _run("det_instances")
    np.testing.assert_array_equal(out["masks"], plain["masks"].repeat(2, 1).repeat(2, 2))
    np.testing.assert_array_equal(out["boxes"], plain["boxes"] * 2)


def test_resize_fits_the_size_keeping_the_aspect_ratio():
    plain = _run("det_instances")
    up = _run("det_instances|det_resize((96, 200))")  # x2, limited by the height
    np.testing.assert_array_equal(up["masks"], plain["masks"].repeat(2, 1).repeat(2, 2))
    np.testing.assert_array_equal(up["boxes"], plain["boxes"] * 2)
    assert up["image"].shape == (96, 128, 3)
    down = _run("det_instances|det_resize((100, 32))")  # x1/2, limited by the width
    assert down["image"].shape == (24, 32, 3)
    _assert_consistent(down)
    assert len(down["boxes"]) == 3  # the single-pixel instance does not survive halving
    np.testing.assert_array_equal(down["labels"], [0, 1, 1])


def test_pad_gives_static_shapes_and_validity():
    out = _run("det_instances|det_flip_lr|det_pad((56, 72), 6)", seed=(5, 5))
    assert out["image"].shape == (56, 72, 3) and out["masks"].shape == (6, 56, 72)
    assert out["boxes"].shape == (6, 4) and out["labels"].shape == (6,)
    assert out["valid"].tolist() == [True] * 4 + [False] * 2
    assert out["image_size"].tolist() == [48, 64]
    assert not out["image"][48:].any() and not out["image"][:, 64:].any()
    assert not out["masks"][4:].any() and not out["boxes"][4:].any()
    _assert_consistent(out)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="more ground-truth instances than the padded capacity 3"):
        _run("det_instances|det_pad(64, 3)")
    with pytest.raises(tf.errors.InvalidArgumentError, match="the image is larger"):
        _run("det_instances|det_pad(32, 8)")
    with pytest.raises(ValueError, match="max_instances must be a positive int"):
        ops.parse("det_pad(32, 0)")


def test_det_pad_and_pad_targets_give_identical_padded_instances():
    # one layout (layers/instances.py) from the tf.data op and from the host-side padding of
    # in-memory data; the model's labels are the dataset's + 1 where valid (0 is background)
    empty = {"image": tf.zeros((30, 20, 3), tf.uint8),
             "objects": {"box": tf.zeros((0, 4)), "label": tf.zeros((0,), tf.int64),
                         "mask": tf.zeros((0, 30, 20, 1), tf.uint8),
                         "is_crowd": tf.zeros((0,), tf.bool)}}
    for data, shape, count in ((_instances(), (56, 72), 4), (empty, (32, 32), 0)):
        out = _run(f"det_instances|det_pad({shape}, 6)", data=data)
        masks = data["objects"]["mask"].numpy()[..., 0]
        ref = targets_lib.pad_targets(
            [data["objects"]["box"].numpy()], [data["objects"]["label"].numpy() + 1], 6,
            [masks], shape)
        assert out["valid"].tolist() == [True] * count + [False] * (6 - count)
        for key in ("boxes", "masks", "valid", "labels"):
            assert out[key].dtype == ref[key].dtype == PADDED_DTYPES[key], key
        for key in ("boxes", "masks", "valid"):
            np.testing.assert_array_equal(out[key], ref[key][0], err_msg=key)
        np.testing.assert_array_equal(np.where(out["valid"], out["labels"] + 1, 0),
                                      ref["labels"][0])


def test_image_without_instances_through_every_op():
    empty = {"image": tf.zeros((30, 20, 3), tf.uint8),
             "objects": {"box": tf.zeros((0, 4)), "label": tf.zeros((0,), tf.int64),
                         "mask": tf.zeros((0, 0, 0, 1), tf.uint8),  # as TFDS decodes it
                         "is_crowd": tf.zeros((0,), tf.bool)}}
    out = _run("det_instances|det_flip_lr|det_flip_ud|det_resize(40)|"
               "det_scale_jitter(32, 0.5, 1.5)|det_pad(32, 4)", data=empty)
    assert out["masks"].shape == (4, 32, 32) and not out["valid"].any()


def test_in_a_tf_data_pipeline_with_batching():
    ds = tf.data.Dataset.range(6).map(lambda i: {
        **_instances(), ops.RNG_KEY: tf.stack([i, tf.constant(0, tf.int64)])})
    pp = ops.parse("det_instances|det_flip_lr|det_scale_jitter(64, 0.5, 1.5)|det_pad(64, 8)|"
                   "value_range(-1, 1)")
    batch = next(iter(ds.map(pp).batch(6)))
    assert batch["image"].shape == (6, 64, 64, 3) and batch["masks"].shape == (6, 8, 64, 64)
    for i in range(6):
        valid = batch["valid"][i].numpy()
        np.testing.assert_array_equal(batch["boxes"][i].numpy()[valid],
                                      coco.boxes_from_masks(batch["masks"][i].numpy()[valid]))
