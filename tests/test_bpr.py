"""BPR boundary patches and reassembly: parity with tinyalpha/BPR's split/merge tools, bad input,
and the end-to-end refine() with stand-in networks whose answers are known.

Every case is read from the fixture's keys and meta (the same tests run on other files)."""

import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexvision
from flexvision.convert.common import abstract_variables
from flexvision.detection import boundary, bpr
from flexvision.models.hrnet import StageSpec
from helpers import assert_parity, load_fixture

FIXTURE = "torchvision/bpr.npz"
_SPLIT_KEY = re.compile(r"split/mask(\d+)/patch(\d+)/iou([0-9.eE+-]+)/boxes")


def _fixture():
    return load_fixture(FIXTURE)


def _split_cases():
    arrays, _ = _fixture()
    cases = []
    for key in sorted(arrays):
        match = _SPLIT_KEY.fullmatch(key)
        if match:
            cases.append((int(match[1]), int(match[2]), match[3]))
    assert cases, f"{FIXTURE} has no split/mask<m>/patch<P>/iou<t>/boxes keys"
    return cases


def _merge_indices():
    arrays, meta = _fixture()
    indices = sorted({int(k.split("/")[1]) for k in arrays if k.startswith("merge/")})
    assert indices and len(indices) == len(meta["merge"]["cases"])
    return indices


def _case_id(case):
    return "mask{}-patch{}-iou{}".format(*case)


@pytest.fixture(scope="module")
def fixture():
    return _fixture()


def test_float_boundary(fixture):
    arrays, _ = fixture
    masks = arrays["masks"]
    keys = [k for k in arrays if re.fullmatch(r"split/mask\d+/float_boundary", k)]
    assert keys
    for key in keys:
        m = int(key.split("/")[1][len("mask"):])
        ours = bpr.float_boundary(masks[m])
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, arrays[key], err_msg=key)


@pytest.mark.parametrize("case", _split_cases(), ids=_case_id)
def test_boundary_patch_boxes(fixture, case):
    arrays, _ = fixture
    m, patch, iou = case
    prefix = f"split/mask{m}/patch{patch}/iou{iou}"
    result = bpr.boundary_patch_boxes(arrays["masks"][m], patch, float(iou))
    np.testing.assert_array_equal(result.keep, arrays[f"{prefix}/keep"], err_msg=prefix)
    np.testing.assert_array_equal(result.boxes, arrays[f"{prefix}/boxes"], err_msg=prefix)


@pytest.mark.parametrize("index", _merge_indices())
def test_merge_patches(fixture, index):
    arrays, meta = fixture
    case = meta["merge"]["cases"][index]
    boxes = arrays[f"merge/{index}/boxes"]
    np.testing.assert_array_equal(boxes, arrays[case["boxes"]])
    merged = bpr.merge_patches(arrays["masks"][case["mask"]], boxes,
                               arrays[f"merge/{index}/patch_probs"])
    np.testing.assert_array_equal(merged.count, arrays[f"merge/{index}/count"])
    np.testing.assert_array_equal(merged.mask, arrays[f"merge/{index}/refined_mask"])
    assert_parity(merged.mean_prob, arrays[f"merge/{index}/mean_prob"], f"merge/{index}")


def test_boundary_patches_and_crops_agree_with_single_instance(fixture):
    """All instances at once: each instance's boxes as in the one-mask call, and the crops are
    the image/mask pixels under each box."""
    arrays, _ = fixture
    masks = arrays["masks"]
    patch, iou = _split_cases()[0][1:]
    boxes, instance = bpr.boundary_patches(masks, patch, float(iou))
    for m in range(len(masks)):
        np.testing.assert_array_equal(
            boxes[instance == m], bpr.boundary_patch_boxes(masks[m], patch, float(iou)).boxes)
    height, width = masks.shape[1:]
    image = np.arange(height * width * 3, dtype=np.int32).reshape(height, width, 3)
    image_patches, mask_patches = bpr.crop_patches(image, masks, boxes, instance, patch)
    for k in range(0, len(boxes), 3):
        x1, y1, x2, y2 = boxes[k, :4].astype(int)
        np.testing.assert_array_equal(image_patches[k], image[y1:y2, x1:x2])
        np.testing.assert_array_equal(mask_patches[k], masks[instance[k], y1:y2, x1:x2])


def test_merge_with_probability_of_the_coarse_mask_is_identity(fixture):
    arrays, _ = fixture
    mask = arrays["masks"][0]
    patch, iou = _split_cases()[0][1:]
    boxes = bpr.boundary_patch_boxes(mask, patch, float(iou)).boxes
    _, crops = bpr.crop_patches(mask[..., None], mask[None], boxes, np.zeros(len(boxes), int),
                                patch)
    merged = bpr.merge_patches(mask, boxes, crops.astype(np.float32))
    np.testing.assert_array_equal(merged.mask, mask)
    assert set(np.unique(merged.count[merged.count > 0]).tolist()) <= set(range(1, len(boxes) + 1))


# --- bad input, defined -----------------------------------------------------------------------

def test_empty_mask_has_no_boxes_and_merges_to_itself():
    mask = np.zeros((40, 50), np.uint8)
    assert not bpr.float_boundary(mask).any()
    result = bpr.boundary_patch_boxes(mask, 16, 0.25)
    assert result.boxes.shape == (0, 5) and result.keep.shape == (0,)
    merged = bpr.merge_patches(mask, result.boxes, np.zeros((0, 16, 16), np.float32))
    np.testing.assert_array_equal(merged.mask, mask)
    assert not merged.count.any()


def test_mask_touching_the_border():
    """Foreground on the border is boundary (zero padding); patches are moved back inside."""
    mask = np.zeros((40, 50), bool)
    mask[:, 30:] = True  # touches the top, bottom and right borders
    band = bpr.float_boundary(mask)
    # corner pixel: 4 of its 9 neighbours are foreground -> min(5, 4) / 4.5
    assert band[0, 49] == np.float32(4) / np.float32(4.5)
    assert band[20, 49] == np.float32(3) / np.float32(4.5)  # 6 foreground -> min(3, 6)
    assert band[20, 40] == 0  # interior
    assert band[20, 29] == np.float32(3) / np.float32(4.5)  # background next to the edge
    boxes = bpr.boundary_patch_boxes(mask, 16, 0.25).boxes
    assert len(boxes)
    assert boxes[:, 0].min() >= 0 and boxes[:, 1].min() >= 0
    assert boxes[:, 2].max() <= 49 and boxes[:, 3].max() <= 39  # BPR's W-1 / H-1 rule
    np.testing.assert_array_equal(boxes[:, 2] - boxes[:, 0], 16)
    np.testing.assert_array_equal(boxes[:, 3] - boxes[:, 1], 16)


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (10, 10)])
def test_image_not_larger_than_the_patch_is_refused(shape):
    mask = np.zeros(shape, np.uint8)
    mask[2:5, 2:5] = 1
    with pytest.raises(ValueError, match="not larger than a 16x16 patch"):
        bpr.boundary_patch_boxes(mask, 16, 0.25)
    with pytest.raises(ValueError, match="not larger than"):
        bpr.boundary_patches(mask[None], 16, 0.25)


def test_mask_of_another_size_than_the_image_is_refused():
    image = np.zeros((40, 50, 3), np.uint8)
    masks = np.zeros((1, 40, 48), np.uint8)
    with pytest.raises(ValueError, match="do not match the 40x50 image"):
        bpr.crop_patches(image, masks, np.zeros((0, 5), np.float32), np.zeros(0, int), 16)


def test_other_bad_input():
    with pytest.raises(ValueError, match="boolean or integer"):
        bpr.float_boundary(np.full((20, 20), 0.7))
    with pytest.raises(ValueError, match=r"\(height, width\)"):
        bpr.float_boundary(np.zeros((1, 20, 20), np.uint8))
    with pytest.raises(ValueError, match="iou_threshold"):
        bpr.boundary_patch_boxes(np.ones((20, 20), np.uint8), 8, 0.0)
    mask = np.zeros((40, 50), np.uint8)
    with pytest.raises(ValueError, match="16x16 square"):
        bpr.merge_patches(mask, np.array([[0, 0, 15, 16, 1]], np.float32),
                          np.zeros((1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="inside the 40x50 image"):
        bpr.merge_patches(mask, np.array([[40, 0, 56, 16, 1]], np.float32),
                          np.zeros((1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="one patch per box"):
        bpr.merge_patches(mask, np.zeros((2, 5), np.float32), np.zeros((1, 16, 16), np.float32))


def test_nms_suppresses_at_equal_iou_and_keeps_stable_tie_order():
    """Two 4x4 squares shifted by 2: IoU = 8 / 24 = 1/3 in float32. At t = float32(1/3) the
    second is suppressed (IoU >= t), above it kept; among equal scores the lower index wins."""
    xs, ys = np.array([0, 2]), np.array([0, 0])
    scores = np.array([0.5, 0.5], np.float32)
    third = float(np.float32(8) / np.float32(24))
    np.testing.assert_array_equal(bpr.nms_equal_squares(xs, ys, scores, 4, third), [0])
    np.testing.assert_array_equal(
        bpr.nms_equal_squares(xs, ys, scores, 4, float(np.nextafter(np.float32(third), 1))), [0, 1])
    np.testing.assert_array_equal(
        bpr.nms_equal_squares(xs[::-1], ys, scores, 4, third), [0])
    np.testing.assert_array_equal(
        bpr.nms_equal_squares(xs, ys, np.array([0.5, 0.7], np.float32), 4, third), [1])


def test_large_image_is_fast():
    """A 1024x2048 image with 30 instances: proposals + crops + merge in a few seconds on CPU."""
    rng = np.random.default_rng(0)
    height, width = 1024, 2048
    yy, xx = np.mgrid[:height, :width]
    masks = np.zeros((30, height, width), bool)
    for k in range(30):
        cy, cx = rng.uniform(100, height - 100), rng.uniform(100, width - 100)
        a, b = rng.uniform(30, 150, size=2)
        masks[k] = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 <= 1
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    start = time.perf_counter()
    boxes, instance = bpr.boundary_patches(masks, 64, 0.25)
    _, mask_patches = bpr.crop_patches(image, masks, boxes, instance, 64)
    for k in range(30):
        merged = bpr.merge_patches(masks[k], boxes[instance == k],
                                   mask_patches[instance == k].astype(np.float32))
        np.testing.assert_array_equal(merged.mask, masks[k])
    elapsed = time.perf_counter() - start
    assert len(boxes) > 30 * 4
    assert elapsed < 10.0, f"{elapsed:.2f} s"


# --- end to end: refine() ---------------------------------------------------------------------

class _ImageOracle(nn.Module):
    """A stand-in refinement net that reads the answer off the red channel: foreground logit
    10 * normalised red, background 0 (so p > 0.5 iff red > the mean 123.675)."""

    @nn.compact
    def __call__(self, x):
        assert x.shape[-1] == 4
        return jnp.stack([jnp.zeros_like(x[..., 0]), 10.0 * x[..., 0]], axis=-1)


class _MaskEcho(nn.Module):
    """Returns the coarse mask channel as the foreground logit."""

    @nn.compact
    def __call__(self, x):
        return jnp.stack([jnp.zeros_like(x[..., 3]), 10.0 * x[..., 3]], axis=-1)


def _disc_scene(height=96, width=120):
    yy, xx = np.mgrid[:height, :width]
    gt = np.stack([((yy - 40) / 22.0) ** 2 + ((xx - 50) / 30.0) ** 2 <= 1,
                   ((yy - 70) / 15.0) ** 2 + ((xx - 95) / 18.0) ** 2 <= 1]).astype(np.uint8)
    # coarse masks: ground truth at 1/8 resolution, upsampled (blocky boundaries)
    coarse = gt[:, 4::8, 4::8].repeat(8, axis=1).repeat(8, axis=2)[:, :height, :width]
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = 255 * gt.max(axis=0)
    return image, gt, coarse


def test_network_inputs_by_hand():
    image = np.zeros((1, 2, 2, 3), np.float32)
    image[0, 0, 0] = bpr.IMAGE_MEAN  # -> 0 after normalisation
    mask = np.array([[[1, 0], [0, 1]]], np.uint8)
    x = np.asarray(bpr.network_inputs(image, mask, 4))
    assert x.shape == (1, 4, 4, 4)
    np.testing.assert_allclose(x[0, 0, 0, :3], 0.0, atol=1e-6)
    np.testing.assert_allclose(x[0, 3, 3, :3], -np.array(bpr.IMAGE_MEAN) / bpr.IMAGE_STD, rtol=1e-6)
    np.testing.assert_array_equal(x[0, ..., 3], [[1, 1, -1, -1], [1, 1, -1, -1],
                                                 [-1, -1, 1, 1], [-1, -1, 1, 1]])


def test_refine_with_an_oracle_net_recovers_the_ground_truth_under_the_patches():
    image, gt, coarse = _disc_scene()
    patch = 16
    refined = bpr.refine(image, coarse, {}, model=_ImageOracle(), patch_size=patch,
                         iou_threshold=0.25, network_size=32, batch_size=8)
    boxes, instance = bpr.boundary_patches(coarse, patch, 0.25)
    for k in range(len(gt)):
        covered = np.zeros(gt.shape[1:], bool)
        for x1, y1, x2, y2 in boxes[instance == k, :4].astype(int):
            covered[y1:y2, x1:x2] = True
        # under the patches the oracle's answer (both discs: the red channel shows both)
        np.testing.assert_array_equal(refined[k][covered], gt.max(axis=0)[covered])
        np.testing.assert_array_equal(refined[k][~covered], coarse[k][~covered])
        before = boundary.boundary_iou(gt[k], coarse[k], width=2)
        after = boundary.boundary_iou(gt[k], refined[k], width=2)
        assert after > before


def test_refine_with_a_mask_echo_net_returns_the_coarse_masks():
    """Nearest x2 up then bilinear /2 down of the mask logits is exact: identity refinement."""
    _, _, coarse = _disc_scene()
    image = np.random.default_rng(0).integers(0, 255, coarse.shape[1:] + (3,), dtype=np.uint8)
    refined = bpr.refine(image, coarse, {}, model=_MaskEcho(), patch_size=16, network_size=32,
                         batch_size=5)
    np.testing.assert_array_equal(refined, coarse)


def test_refine_runs_the_registered_network():
    tiny = (StageSpec(1, "bottleneck", (1,), (4,)), StageSpec(1, "basic", (1, 1), (4, 6)))
    model = flexvision.create_model("bpr_hrnet18s", stages=tiny)
    # random variables of the model's shapes (model.init compiles slowly on CPU)
    shapes = abstract_variables(model, jnp.zeros((1, 32, 32, 4)))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: (0.5 + rng.random(s.shape) if s.ndim == 1 else 0.3 * rng.standard_normal(s.shape)
                   ).astype(np.float32), shapes)
    image, _, coarse = _disc_scene()
    refined = bpr.refine(image, coarse, variables, model=model, patch_size=16, network_size=32)
    assert refined.shape == coarse.shape and refined.dtype == np.uint8
    # padding the last batch changes nothing; pixels no patch reaches keep the coarse mask
    np.testing.assert_array_equal(
        bpr.refine(image, coarse, variables, model=model, patch_size=16, network_size=32,
                   batch_size=7), refined)
    boxes, instance = bpr.boundary_patches(coarse, 16, 0.25)
    for k in range(len(coarse)):
        covered = np.zeros(coarse.shape[1:], bool)
        for x1, y1, x2, y2 in boxes[instance == k, :4].astype(int):
            covered[y1:y2, x1:x2] = True
        np.testing.assert_array_equal(refined[k][~covered], coarse[k][~covered])


def test_refine_bad_input():
    image, _, coarse = _disc_scene()
    with pytest.raises(ValueError, match="do not match"):
        bpr.refine(image[:-1], coarse, {}, model=_MaskEcho(), patch_size=16)
    with pytest.raises(ValueError, match="even"):
        bpr.refine(image, coarse, {}, model=_MaskEcho(), patch_size=15)
    with pytest.raises(ValueError, match="not larger than"):
        bpr.refine(image[:64, :64], coarse[:, :64, :64], {}, model=_MaskEcho(), patch_size=64)
    empty = np.zeros_like(coarse)
    np.testing.assert_array_equal(
        bpr.refine(image, empty, {}, model=_MaskEcho(), patch_size=16, network_size=32), empty)
    none = bpr.refine(image, coarse[:0], {}, model=_MaskEcho(), patch_size=16, network_size=32)
    assert none.shape == (0,) + coarse.shape[1:]
