"""AS-MLP: parity with the official AS_MLP, axial shift, GroupNorm, merging order, any size."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexvision
from flexvision import convert
from flexvision.convert.common import abstract_variables
from flexvision.layers.shift import shift_channels
from flexvision.models.asmlp import axial_shift_amounts, group_norm_one_group, merge_patches
from helpers import FIXTURES, assert_parity, load_fixture, state_dict_of

FIXTURE = "official/asmlp_reduced.npz"


@pytest.fixture(scope="module")
def reference():
    arrays, meta = load_fixture(FIXTURE)
    model, variables = convert.from_official("asmlp", state_dict_of(arrays), **meta["kwargs"])
    return arrays, meta, model, variables, jax.jit(model.apply)


@pytest.fixture(scope="module")
def features_fn(reference):
    """One jitted features function, so that tests sharing an input shape share a compile."""
    _, _, model, variables, _ = reference
    return jax.jit(lambda x: model.apply(variables, x, method="features"))


@pytest.mark.parametrize("index", [0, 1])
def test_parity_with_official_asmlp(reference, index):
    arrays, _, _, variables, apply = reference
    assert_parity(apply(variables, arrays[f"input/{index}"]), arrays[f"output/{index}"],
                  f"asmlp {arrays[f'input/{index}'].shape}")


def test_imported_parameter_count_matches_reference(reference):
    _, meta, _, variables, _ = reference
    assert sum(x.size for x in jax.tree_util.tree_leaves(variables)) == meta["num_params"]


@pytest.mark.parametrize("size", [(97, 131), (512, 512)])
def test_runs_at_any_size_with_finite_outputs(reference, features_fn, size):
    model = reference[2]
    images = jax.random.normal(jax.random.PRNGKey(0), (1, *size, 3))
    features = features_fn(images)
    # Detection-backbone padding: ceil to the patch, then ceil-halve at every merging.
    grid = [math.ceil(s / 4) for s in size]
    for stage in range(1, 5):
        width = model.embed_dim * 2 ** (stage - 1)
        assert features[f"stage{stage}"].shape == (1, *grid, width)
        assert np.isfinite(np.asarray(features[f"stage{stage}"])).all()
        grid = [math.ceil(g / 2) for g in grid]
    assert features["pre_logits"].shape == (1, 8 * model.embed_dim)
    assert np.isfinite(np.asarray(features["pre_logits"])).all()


def _official_torch_shift(x_nchw, shift_size, dim):
    """NumPy transcription of the algorithm of the official torch_shift: zero-pad H and W,
    torch.chunk the channels, roll chunk k by k - pad along ``dim``, crop."""
    _, channels, height, width = x_nchw.shape
    pad = shift_size // 2
    padded = np.pad(x_nchw, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    size = math.ceil(channels / shift_size)  # torch.chunk's chunk size
    chunks = [padded[:, i:i + size] for i in range(0, channels, size)]
    rolled = [np.roll(chunk, amount, dim) for chunk, amount in zip(chunks, range(-pad, pad + 1))]
    return np.concatenate(rolled, 1)[:, :, pad:pad + height, pad:pad + width]


@pytest.mark.parametrize("channels", [24, 7, 6, 3])
def test_axial_shift_matches_the_official_torch_shift(channels):
    x = np.random.default_rng(channels).normal(size=(2, 6, 9, channels)).astype(np.float32)
    amounts = axial_shift_amounts(channels, 5)
    for nchw_dim, nhwc_axis in ((3, 2), (2, 1)):  # W, then H
        expected = _official_torch_shift(x.transpose(0, 3, 1, 2), 5, nchw_dim).transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(np.asarray(shift_channels(x, amounts, axis=nhwc_axis)),
                                      expected)
    # Groups of ceil(C / 5), the last smaller; 6 channels give only 3 groups as torch.chunk does.
    assert axial_shift_amounts(24, 5) == (-2,) * 5 + (-1,) * 5 + (0,) * 5 + (1,) * 5 + (2,) * 4
    assert axial_shift_amounts(6, 5) == (-2, -2, -1, -1, 0, 0)


def test_group_norm_normalises_each_image_over_channels_and_space():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(2, 5, 7, 6)).astype(np.float32)
    norm = group_norm_one_group(None, "norm")
    scale, bias = np.linspace(0.5, 1.5, 6, dtype=np.float32), np.arange(6, dtype=np.float32)
    out = norm.apply({"params": {"scale": scale, "bias": bias}}, x)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-5) * scale + bias,
                               rtol=1e-5, atol=1e-5)


def test_patch_merging_uses_the_official_channel_order():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    merged = np.asarray(merge_patches(x))
    np.testing.assert_array_equal(merged[..., 0:3], x[:, 0::2, 0::2])
    np.testing.assert_array_equal(merged[..., 3:6], x[:, 1::2, 0::2])
    np.testing.assert_array_equal(merged[..., 6:9], x[:, 0::2, 1::2])
    np.testing.assert_array_equal(merged[..., 9:12], x[:, 1::2, 1::2])


def test_padding_modes(reference, features_fn):
    """pad_to_fit pads the image bottom/right to the patch size with zeros; without it the
    classification code's rules hold: the patch remainder is dropped, odd maps are refused."""
    _, _, model, variables, _ = reference
    image = jax.random.normal(jax.random.PRNGKey(0), (1, 97, 131, 3))
    padded = jnp.pad(image, ((0, 0), (0, 3), (0, 1), (0, 0)))
    np.testing.assert_allclose(features_fn(image)["pre_logits"], features_fn(padded)["pre_logits"],
                               rtol=1e-6, atol=1e-6)
    strict = model.clone(pad_to_fit=False)
    shapes = jax.eval_shape(lambda x: strict.apply(variables, x, method="features"), image)
    assert [shapes[f"stage{i}"].shape[1:3] for i in range(1, 5)] == [(24, 32), (12, 16), (6, 8),
                                                                      (3, 4)]
    with pytest.raises(ValueError, match=r"even feature map, got 25x25.*pad_to_fit=True"):
        jax.eval_shape(strict.apply, variables, jnp.zeros((1, 100, 100, 3)))


def test_importer_rejects_wrong_kwargs(reference):
    arrays, meta, _, _, _ = reference
    state = state_dict_of(arrays)
    with pytest.raises(ValueError, match="no place in AS_MLP"):
        convert.from_official("asmlp", state, **dict(meta["kwargs"], depths=[1, 2, 2, 2]))
    with pytest.raises(ValueError, match="no entry 'layers.0.blocks.2"):
        convert.from_official("asmlp", state, **dict(meta["kwargs"], depths=[3, 2, 2, 2]))
    with pytest.raises(ValueError, match="does not fit the model"):
        convert.from_official("asmlp", state, **dict(meta["kwargs"], num_classes=7))
    with pytest.raises(ValueError, match="unknown AS_MLP argument"):
        convert.from_official("asmlp", state, **meta["kwargs"], window_size=7)


def test_registered_variants_have_the_official_parameter_counts():
    counts = json.loads((FIXTURES / "param_counts.json").read_text())["counts"]
    expected = {
        "asmlp_tiny": counts["AS-MLP-T (official as_mlp.py, embed 96, depths 2-2-6-2, shift 5)"],
        "asmlp_small": counts["AS-MLP-S (official as_mlp.py, embed 96, depths 2-2-18-2)"],
        "asmlp_base": counts["AS-MLP-B (official as_mlp.py, embed 128, depths 2-2-18-2)"],
    }
    assert set(flexvision.list_models(family="asmlp")) == set(expected) | {"asmlp_micro"}
    images = np.zeros((1, 64, 64, 3), np.float32)
    for name, count in expected.items():
        variables = abstract_variables(flexvision.create_model(name), images)
        assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables)) == count


def test_an_even_shift_size_is_refused():
    model = flexvision.create_model("asmlp_micro", shift_size=4)
    with pytest.raises(ValueError, match="odd integer"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
