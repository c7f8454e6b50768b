"""CycleMLP: parity with the official CycleNet, Cycle FC semantics, any input size, configs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexvision
from flexvision import convert
from flexvision.convert.common import abstract_variables
from flexvision.models.cyclemlp import CycleFC, CycleMLP, cycle_fc_offset_buffer, cycle_fc_offsets
from helpers import FIXTURES, assert_parity, load_fixture, state_dict_of

FIXTURE = "official/cyclemlp_reduced.npz"


@pytest.fixture(scope="module")
def reference():
    arrays, meta = load_fixture(FIXTURE)
    model, variables = convert.from_official("cyclemlp", state_dict_of(arrays), **meta["kwargs"])
    return arrays, meta, model, variables, jax.jit(model.apply)


@pytest.mark.parametrize("index", [0, 1])
def test_parity_with_official_cyclenet(reference, index):
    arrays, _, _, variables, apply = reference
    assert_parity(apply(variables, arrays[f"input/{index}"]), arrays[f"output/{index}"],
                  f"cyclemlp {arrays[f'input/{index}'].shape}")


def test_imported_parameter_count_matches_reference(reference):
    _, meta, _, variables, _ = reference
    assert sum(x.size for x in jax.tree_util.tree_leaves(variables)) == meta["num_params"]


@pytest.mark.parametrize("size", [(97, 131), (512, 512)])
def test_runs_at_any_size_with_finite_outputs(reference, size):
    _, _, model, variables, _ = reference
    images = jax.random.normal(jax.random.PRNGKey(0), (1, *size, 3))
    features = jax.jit(lambda v, x: model.apply(v, x, method="features"))(variables, images)
    height, width = size
    for stage, stride in zip(range(1, 5), (4, 8, 16, 32)):
        fmap = features[f"stage{stage}"]
        # 7x7/4 embedding (pad 2), then 3x3/2 transitions (pad 1): ceil-like size arithmetic.
        expect_h, expect_w = (height - 3) // 4 + 1, (width - 3) // 4 + 1
        for _ in range(stage - 1):
            expect_h, expect_w = (expect_h - 1) // 2 + 1, (expect_w - 1) // 2 + 1
        assert fmap.shape == (1, expect_h, expect_w, model.embed_dims[stage - 1]), stride
        assert np.isfinite(np.asarray(fmap)).all()
    assert np.isfinite(np.asarray(features["pre_logits"])).all()


@pytest.mark.parametrize("name, axis", [("sfc_h", 2), ("sfc_w", 1)])
def test_cycle_fc_reads_each_channel_at_its_offset_with_zero_padding(name, axis):
    """Official trap: sfc_h (kernel 1x3) mixes along W, sfc_w (3x1) along H. With an identity
    kernel, output (i, j, c) is the input at (i, j + offset_c) (or (i + offset_c, j)), zero
    outside the map, as torchvision's deform_conv2d with these offsets computes."""
    channels, height, width = 7, 4, 5
    x = np.random.default_rng(0).normal(size=(1, height, width, channels)).astype(np.float32)
    layer = CycleFC(kernel_size=3, axis=axis)
    params = {"kernel": jnp.eye(channels), "bias": jnp.zeros(channels)}
    out = np.asarray(layer.apply({"params": params}, x))
    expected = np.zeros_like(x)
    offsets = cycle_fc_offsets(channels, 3)
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                si, sj = (i, j + offsets[c]) if axis == 2 else (i + offsets[c], j)
                if 0 <= si < height and 0 <= sj < width:
                    expected[0, i, j, c] = x[0, si, sj, c]
    np.testing.assert_array_equal(out, expected)
    assert offsets[:4] == (0, 1, -1, 0)
    kernel = (1, 3) if name == "sfc_h" else (3, 1)
    arrays, _ = load_fixture(FIXTURE)
    np.testing.assert_array_equal(cycle_fc_offset_buffer(16, kernel),
                                  arrays[f"state/network.0.0.attn.{name}.offset"])


def test_importer_rejects_modified_offsets_and_wrong_kwargs():
    arrays, meta = load_fixture(FIXTURE)
    state = state_dict_of(arrays)
    tampered = dict(state)
    tampered["network.2.0.attn.sfc_w.offset"] = tampered["network.2.0.attn.sfc_w.offset"] + 0.5
    with pytest.raises(ValueError, match="sfc_w.offset.*offsets differ"):
        convert.from_official("cyclemlp", tampered, **meta["kwargs"])
    wrong = dict(meta["kwargs"], layers=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="no place in CycleNet"):
        convert.from_official("cyclemlp", state, **wrong)
    with pytest.raises(ValueError, match="unknown CycleNet argument"):
        convert.from_official("cyclemlp", state, **meta["kwargs"], window_size=7)


def test_registered_variants_have_the_official_parameter_counts():
    counts = json.loads((FIXTURES / "param_counts.json").read_text())["counts"]
    expected = {f"cyclemlp_b{i}": counts[f"CycleMLP_B{i} (official cycle_mlp.py)"]
                for i in (1, 2, 3)}
    official = {f"cyclemlp_b{i}" for i in range(1, 6)}
    assert set(flexvision.list_models(family="cyclemlp")) == official | {"cyclemlp_micro"}
    images = np.zeros((1, 64, 64, 3), np.float32)
    for name in sorted(official):
        variables = abstract_variables(flexvision.create_model(name), images)
        count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables))
        if name in expected:
            assert count == expected[name], name
        else:  # B4, B5: the paper's Table 2 gives 52M and 76M
            assert round(count / 1e6) == {"cyclemlp_b4": 52, "cyclemlp_b5": 76}[name], count


def test_a_width_change_without_a_transition_is_refused():
    with pytest.raises(ValueError, match="without a transition"):
        jax.eval_shape(CycleMLP(depths=(1, 1), embed_dim=(8, 16), mlp_ratio=(4, 4),
                                transitions=(False,)).init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"mlp_ratio \(4.0, 4.0, 4.0\) needs one entry per stage"):
        CycleMLP(depths=(1, 1), mlp_ratio=(4, 4, 4)).mlp_ratios
