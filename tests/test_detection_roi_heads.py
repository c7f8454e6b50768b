"""Parity of flexvision.detection's RoI heads with torchvision's RoIHeads (roi_heads.npz).

Settings (classes, widths, pool sizes, thresholds, detections per image, level names) come from
the fixture's meta and arrays.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from flexvision import convert
from tests.helpers import assert_parity, load_fixture, state_dict_of


def pad_boxes(arrays, prefix: str, n_images: int):
    """Stacks ``prefix/i`` (n_i, 4) into (B, max n_i, 4) with a validity mask."""
    boxes = [arrays[f"{prefix}/{i}"] for i in range(n_images)]
    cap = max(b.shape[0] for b in boxes)
    out = np.zeros((n_images, cap, 4), np.float32)
    valid = np.zeros((n_images, cap), bool)
    for i, b in enumerate(boxes):
        out[i, :len(b)], valid[i, :len(b)] = b, True
    return out, valid


@pytest.fixture(scope="module")
def heads_case():
    arrays, meta = load_fixture("torchvision/roi_heads.npz")
    p = meta["params"]
    pooled = re.search(r"box_roi_pool=MultiScaleRoIAlign\(\[(.*?)\]", meta["reference"]).group(1)
    names = re.findall(r"'([^']+)'", pooled)
    model, variables = convert.from_torchvision(
        "roi_heads", state_dict_of(arrays), box_output_size=p["box_pool"]["output_size"],
        box_sampling_ratio=p["box_pool"]["sampling_ratio"],
        mask_output_size=p["mask_pool"]["output_size"],
        mask_sampling_ratio=p["mask_pool"]["sampling_ratio"],
        score_thresh=p["box_score_thresh"], nms_thresh=p["box_nms_thresh"],
        detections_per_img=p["box_detections_per_img"],
        bbox_reg_weights=tuple(p["bbox_reg_weights"]))
    assert model.num_classes == p["num_classes"]
    assert model.representation_size == p["representation_size"]
    features = [arrays[f"features/{n}"] for n in names]
    n_images = arrays["image_sizes"].shape[0]
    proposals, valid = pad_boxes(arrays, "proposals", n_images)
    padded = tuple(p["padded_hw"])
    return arrays, model, variables, features, proposals, valid, padded


def test_box_head_and_predictor(heads_case):
    arrays, model, variables, features, proposals, valid, padded = heads_case
    rep = model.apply(variables, features, proposals, padded, method=lambda m, f, b, s: m.box_head(
        m._pool(f, b, s, m.box_output_size, m.box_sampling_ratio)))
    logits, deltas = model.apply(variables, features, proposals, padded,
                                 method=lambda m, f, b, s: m.box_branch(f, b, s))
    rows = valid.reshape(-1)
    assert_parity(np.asarray(rep)[rows], arrays["box_head/representation"], "representation")
    assert_parity(np.asarray(logits).reshape(rows.size, -1)[rows], arrays["box_head/class_logits"],
                  "class logits")
    assert_parity(np.asarray(deltas).reshape(rows.size, -1)[rows],
                  arrays["box_head/box_regression"], "box regression")


def test_mask_head_on_reference_detections(heads_case):
    arrays, model, variables, features, _, _, padded = heads_case
    boxes, valid = pad_boxes(arrays, "detections/boxes", arrays["image_sizes"].shape[0])
    logits = model.apply(variables, features, boxes, padded,
                         method=lambda m, f, b, s: m.mask_branch(f, b, s))
    ours = np.asarray(logits)[valid].transpose(0, 3, 1, 2)
    assert_parity(ours, arrays["mask_head/mask_logits"], "mask logits")


def test_postprocess_and_masks_under_jit(heads_case):
    arrays, model, variables, features, proposals, valid, padded = heads_case
    out = jax.jit(lambda v, f, b, bv, s: model.apply(v, f, b, bv, s, padded))(
        variables, features, proposals, valid, arrays["image_sizes"])
    out = {k: np.asarray(v) for k, v in out.items()}
    assert out["boxes"].shape[1] == model.detections_per_img
    for i in range(arrays["image_sizes"].shape[0]):
        n = arrays[f"detections/labels/{i}"].shape[0]
        assert int(out["valid"][i].sum()) == n and out["valid"][i][:n].all()
        np.testing.assert_array_equal(out["labels"][i][:n], arrays[f"detections/labels/{i}"])
        assert_parity(out["boxes"][i][:n], arrays[f"detections/boxes/{i}"], f"boxes {i}")
        assert_parity(out["scores"][i][:n], arrays[f"detections/scores/{i}"], f"scores {i}")
        assert_parity(out["masks"][i][:n], arrays[f"detections/masks/{i}"][:, 0], f"masks {i}")
        assert not out["masks"][i][n:].any() and not out["scores"][i][n:].any()


def test_legacy_torchvision_names_load_the_same_weights(heads_case):
    arrays, model, variables, *_ = heads_case
    legacy = {}
    for name, value in state_dict_of(arrays).items():
        parts = name.split(".")
        if parts[0] == "mask_head":  # mask_head.{i}.0.weight -> mask_head.mask_fcn{i+1}.weight
            name = f"mask_head.mask_fcn{int(parts[1]) + 1}.{parts[-1]}"
        legacy[f"roi_heads.{name}"] = value
    legacy["backbone.body.conv1.weight"] = np.zeros((1,), np.float32)  # other parts: ignored
    _, legacy_vars = convert.from_torchvision("roi_heads", legacy,
                                              box_output_size=model.box_output_size)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(legacy_vars)):
        np.testing.assert_array_equal(a, b)
