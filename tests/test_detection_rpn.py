"""Parity of flexvision.detection's RPN with torchvision's RegionProposalNetwork (rpn.npz).

Every setting (top-n counts, thresholds, anchor sizes, image sizes, level names) comes from the
fixture's meta and keys.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexvision import convert
from flexvision import detection as det
from flexvision.detection import rpn as rpn_lib
from tests.helpers import assert_parity, load_fixture, state_dict_of


def anchor_config(reference: str):
    """(sizes, aspect_ratios) of the AnchorGenerator(...) in a meta 'reference' string."""
    match = re.search(r"AnchorGenerator\((\(\(.*?\)\)), (.*?\*\d+)\)", reference)
    assert match, reference
    return tuple(eval(g, {"__builtins__": {}}) for g in match.groups())  # pylint: disable=eval-used


@pytest.fixture(scope="module")
def rpn_case():
    arrays, meta = load_fixture("torchvision/rpn.npz")
    p = meta["params"]
    sizes, ratios = anchor_config(meta["reference"])
    model, variables = convert.from_torchvision(
        "rpn", state_dict_of(arrays), anchor_sizes=sizes, aspect_ratios=ratios,
        pre_nms_top_n_test=p["pre_nms_top_n"], post_nms_top_n_test=p["post_nms_top_n"],
        nms_thresh=p["nms_thresh"], score_thresh=p["score_thresh"], min_size=p["min_size"])
    features = [arrays[f"features/{n}"] for n in p["feature_names"]]
    return arrays, meta, model, variables, features


def test_head_outputs(rpn_case):
    arrays, meta, model, variables, features = rpn_case
    objectness, deltas = model.apply(variables, features, method=lambda m, f: m.head(f))
    for name, obj, dl in zip(meta["params"]["feature_names"], objectness, deltas):
        assert_parity(obj, arrays[f"head/objectness_nhwc/{name}"], f"objectness {name}")
        assert_parity(dl, arrays[f"head/bbox_deltas_nhwc/{name}"], f"deltas {name}")


def test_anchors_and_decoding(rpn_case):
    arrays, meta, model, variables, features = rpn_case
    padded = tuple(int(s) for s in arrays["padded_hw"])
    assert list(padded) == meta["params"]["padded_hw"]
    anchors = model.apply(variables, padded, features, method=lambda m, s, f: m.anchors(s, f))
    assert_parity(anchors, arrays["anchors"], "anchors")
    per_level = [f.shape[1] * f.shape[2] * meta["params"]["num_anchors_per_location"]
                 for f in features]
    np.testing.assert_array_equal(per_level, arrays["num_anchors_per_level"])
    obj, dl = rpn_lib.flatten_predictions(
        [arrays[f"head/objectness_nhwc/{n}"] for n in meta["params"]["feature_names"]],
        [arrays[f"head/bbox_deltas_nhwc/{n}"] for n in meta["params"]["feature_names"]])
    b = obj.shape[0]
    decoded = det.decode_boxes(dl.reshape(-1, 4), np.tile(anchors, (b, 1))).reshape(b, -1, 4)
    assert_parity(decoded, arrays["decoded_proposals"], "decoded proposals")


def _check_proposals(arrays, boxes, scores, valid):
    for i in range(arrays["image_sizes"].shape[0]):
        ref_boxes, ref_scores = arrays[f"proposals/{i}"], arrays[f"scores/{i}"]
        n = ref_boxes.shape[0]
        assert int(np.sum(valid[i])) == n, f"image {i}: {np.sum(valid[i])} proposals, ref {n}"
        assert np.all(valid[i][:n]), "valid proposals come first"
        assert_parity(boxes[i][:n], ref_boxes, f"proposals {i}")
        assert_parity(scores[i][:n], ref_scores, f"scores {i}")


def test_proposal_selection(rpn_case):
    arrays, meta, _, _, _ = rpn_case
    p = meta["params"]
    names = p["feature_names"]
    obj, _ = rpn_lib.flatten_predictions([arrays[f"head/objectness_nhwc/{n}"] for n in names],
                                         [arrays[f"head/bbox_deltas_nhwc/{n}"] for n in names])
    out = jax.jit(lambda o, d, s: rpn_lib.select_proposals(
        o, d, s, arrays["num_anchors_per_level"].tolist(), p["pre_nms_top_n"],
        p["post_nms_top_n"], p["nms_thresh"], p["score_thresh"], p["min_size"]))(
        obj, arrays["decoded_proposals"], arrays["image_sizes"])
    np.testing.assert_array_equal(out["top_n_idx"], arrays["top_n_idx"])
    _check_proposals(arrays, *(np.asarray(out[k]) for k in ("boxes", "scores", "valid")))


def test_full_rpn_under_jit(rpn_case):
    arrays, _, model, variables, features = rpn_case
    padded = tuple(int(s) for s in arrays["padded_hw"])
    fn = jax.jit(lambda v, f, s: model.apply(v, f, s, padded))
    out = fn(variables, features, arrays["image_sizes"])
    _check_proposals(arrays, *(np.asarray(out[k]) for k in ("boxes", "scores", "valid")))


def test_feature_count_must_match_anchor_sizes(rpn_case):
    arrays, meta, model, variables, features = rpn_case
    padded = tuple(int(s) for s in arrays["padded_hw"])
    with pytest.raises(ValueError, match="anchor size tuples"):
        model.apply(variables, features[:-1], arrays["image_sizes"], padded)


def test_nchw_features_are_rejected(rpn_case):
    arrays, _, model, variables, features = rpn_case
    padded = tuple(int(s) for s in arrays["padded_hw"])
    nchw = [np.transpose(f, (0, 3, 1, 2)) for f in features]
    with pytest.raises(ValueError, match="NHWC"):
        model.apply(variables, nchw, arrays["image_sizes"], padded)


def test_legacy_torchvision_names_load_the_same_weights(rpn_case):
    arrays, _, _, variables, _ = rpn_case
    legacy = {"rpn." + k.replace("head.conv.0.0.", "head.conv."): v
              for k, v in state_dict_of(arrays).items()}
    _, legacy_vars = convert.from_torchvision("rpn", legacy)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(legacy_vars)):
        np.testing.assert_array_equal(a, b)
