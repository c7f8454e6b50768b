"""Parity of flexvision.detection's ops with torchvision (fixtures torchvision/ops.npz).

Every case, threshold, size and ratio is read from the fixture's keys and meta, so the same
tests run on other ops.npz files with other values.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexvision import detection as det
from tests.helpers import assert_parity, load_fixture


@pytest.fixture(scope="module")
def ops():
    return load_fixture("torchvision/ops.npz")


def _call_arg(call: str, name: str):
    """A keyword argument's value in a meta 'call' string, e.g. sampling_ratio=2."""
    match = re.search(rf"{name}=([^,)]+)", call)
    assert match, f"{name} not in {call!r}"
    return eval(match.group(1), {"__builtins__": {}})  # pylint: disable=eval-used


def _cases(arrays, prefix: str) -> list[str]:
    return sorted({k[len(prefix):].split("/")[0] for k in arrays if k.startswith(prefix)})


def test_box_coder(ops):
    arrays, _ = ops
    cases = _cases(arrays, "box_coder/w")
    assert cases, "no box_coder/w<weights> cases in the fixture"
    for case in cases:
        weights = tuple(float(w) for w in case.split("_"))
        key = f"box_coder/w{case}"
        encoded = det.encode_boxes(arrays["box_coder/reference_boxes"],
                                   arrays["box_coder/proposals"], weights)
        assert_parity(encoded, arrays[f"{key}/encoded"], f"encode {case}")
        decoded = det.decode_boxes(arrays[f"{key}/rel_codes"], arrays["box_coder/proposals"],
                                   weights)
        assert_parity(decoded, arrays[f"{key}/decoded"], f"decode {case}")


def test_box_iou(ops):
    arrays, _ = ops
    iou = det.box_iou(arrays["box_iou/boxes1"], arrays["box_iou/boxes2"])
    assert_parity(iou, arrays["box_iou/iou"], "box_iou")


def _kept(indices, valid) -> np.ndarray:
    indices, valid = np.asarray(indices), np.asarray(valid)
    assert not valid[np.argmin(valid):].any() if not valid.all() else True, "valid slots not first"
    return indices[valid]


def test_nms(ops):
    arrays, meta = ops
    keys = sorted(k for k in arrays if k.startswith("nms/keep_iou"))
    assert keys
    thresholds = sorted(float(k[len("nms/keep_iou"):]) for k in keys)
    assert thresholds == sorted(meta["nms_params"]["nms_thresholds"])
    boxes, scores = arrays["nms/boxes"], arrays["nms/scores"]
    for key in keys:
        t = float(key[len("nms/keep_iou"):])
        idx, valid = jax.jit(det.nms, static_argnums=(2, 3))(boxes, scores, t, boxes.shape[0])
        np.testing.assert_array_equal(_kept(idx, valid), arrays[key], err_msg=key)
        # A smaller static capacity returns the first max_output of the same list.
        cap = max(1, len(arrays[key]) // 2)
        idx, valid = det.nms(boxes, scores, t, cap)
        np.testing.assert_array_equal(_kept(idx, valid), arrays[key][:cap])


def test_nms_never_selects_padding(ops):
    arrays, meta = ops
    boxes, scores = arrays["nms/boxes"], arrays["nms/scores"]
    t = meta["nms_params"]["nms_thresholds"][0]
    n = boxes.shape[0]
    valid = np.arange(n) % 3 != 0
    idx, keep = det.nms(boxes, scores, t, n, valid=valid)
    ref_idx, ref_keep = det.nms(boxes[valid], scores[valid], t, n)
    np.testing.assert_array_equal(_kept(idx, keep), np.flatnonzero(valid)[_kept(ref_idx, ref_keep)])


def test_batched_nms(ops):
    arrays, meta = ops
    t = meta["nms_params"]["batched_nms_threshold"]
    boxes = arrays["batched_nms/boxes"]
    idx, valid = det.batched_nms(boxes, arrays["batched_nms/scores"], arrays["batched_nms/idxs"],
                                 t, boxes.shape[0])
    np.testing.assert_array_equal(_kept(idx, valid), arrays["batched_nms/keep"])


@pytest.mark.parametrize("under_jit", [False, True])
def test_roi_align(ops, under_jit):
    arrays, meta = ops
    features = arrays["roi_align/feature_nhwc"]
    configs = meta["roi_align"]["configs"]
    assert configs
    for cfg in configs:
        rois = arrays[cfg["rois"]]
        boxes, index = rois[:, 1:], rois[:, 0].astype(np.int32)
        args = (tuple(cfg["output_size"]), cfg["spatial_scale"], cfg["sampling_ratio"],
                cfg["aligned"])
        if under_jit:
            # Traced boxes: the adaptive cap is static, given exactly for these boxes.
            cap = det.adaptive_grid(boxes, *args[:2], cfg["aligned"])
            fn = jax.jit(lambda f, b, i, args=args, cap=cap: det.roi_align(f, b, i, *args,
                                                                            max_grid=cap))
            out = fn(features, boxes, index)
        else:
            out = det.roi_align(features, boxes, index, *args)
        assert_parity(np.asarray(out).transpose(0, 3, 1, 2), arrays[cfg["output"]],
                      f"roi_align {cfg}")


def test_anchors(ops):
    arrays, meta = ops
    call = meta["anchors"]["call"]
    sizes = eval(re.search(r"sizes=(.*), aspect_ratios=", call).group(1), {"__builtins__": {}})
    ratios = eval(re.search(r"aspect_ratios=(.*)\)\(", call).group(1), {"__builtins__": {}})
    levels = sorted(int(k.split("/")[-1]) for k in arrays if k.startswith("anchors/cell_anchors/"))
    assert levels == list(range(len(sizes)))
    for level in levels:
        assert_parity(det.cell_anchors(tuple(map(float, sizes[level])),
                                       tuple(map(float, ratios[level]))),
                      arrays[f"anchors/cell_anchors/{level}"], f"cell anchors {level}")
    cases = meta["anchors"]["cases"]
    assert cases
    for name, case in cases.items():
        grids = arrays[f"anchors/{name}/grid_sizes"].tolist()
        assert grids == case["grid_sizes"]
        image = tuple(case["image_tensor_hw"])
        np.testing.assert_array_equal(det.anchor_strides(image, grids),
                                      arrays[f"anchors/{name}/strides"])
        anchors = det.anchor_grid(image, grids, sizes, ratios)
        assert_parity(anchors, arrays[f"anchors/{name}/anchors"], f"anchors {name}")


def test_multiscale_roi_align(ops):
    arrays, meta = ops
    ms = meta["multiscale"]
    names = re.findall(r"'([^']+)'", re.search(r"\(\[(.*?)\]", ms["call"]).group(1))
    sampling_ratio = _call_arg(ms["call"], "sampling_ratio")
    features = [arrays[f"multiscale/features/{n}"] for n in names]
    image_shapes = arrays["multiscale/image_shapes"]
    max_h = int(image_shapes[:, 0].max())
    scales = det.infer_scales(tuple(f.shape[1:3] for f in features), (max_h, 0))
    np.testing.assert_allclose(scales, ms["scales"], rtol=0)
    n_images = image_shapes.shape[0]
    boxes = [arrays[f"multiscale/boxes/{i}"] for i in range(n_images)]
    index = np.concatenate([np.full(len(b), i, np.int32) for i, b in enumerate(boxes)])
    boxes = np.concatenate(boxes)
    outputs = sorted(k for k in arrays if k.startswith("multiscale/output_"))
    assert outputs
    for key in outputs:
        size = tuple(int(s) for s in key[len("multiscale/output_"):].split("x"))
        pooled, levels = jax.jit(
            lambda f, b, i, size=size: det.multiscale_roi_align(f, b, i, size, sampling_ratio,
                                                                 scales))(features, boxes, index)
        np.testing.assert_array_equal(levels, arrays["multiscale/levels"])
        assert_parity(np.asarray(pooled).transpose(0, 3, 1, 2), arrays[key], key)
    k_min = int(round(-np.log2(ms["scales"][0])))
    assert (ms["k_min"], ms["k_max"]) == (k_min, int(round(-np.log2(ms["scales"][-1]))))
    levels = det.level_for_boxes(jnp.asarray(boxes), ms["k_min"], ms["k_max"])
    np.testing.assert_array_equal(levels, arrays["multiscale/levels"])
    np.testing.assert_array_equal(
        levels, np.clip(np.floor(arrays["multiscale/level_value_f64"]), ms["k_min"], ms["k_max"])
        - ms["k_min"])


def test_paste_masks(ops):
    arrays, meta = ops
    padding = _call_arg(meta["paste"]["call"], "padding")
    masks = arrays["paste/masks"][:, 0]
    ref = arrays["paste/output"]
    np.testing.assert_array_equal(
        det.expanded_boxes_int(arrays["paste/boxes"], masks.shape[-1], padding),
        arrays["paste/boxes_expanded_int"])
    out = jax.jit(det.paste_masks, static_argnums=(2, 3))(masks, arrays["paste/boxes"],
                                                          ref.shape[2:], padding)
    assert_parity(out, ref[:, 0], "paste_masks")
