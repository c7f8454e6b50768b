"""The paper-figure experiments (experiments/): the pieces that compute their results, and every
script end to end in --fast mode (JSON fields, a readable PNG)."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import digits_lab as lab
from experiments import patch_distribution, patch_size_sweep, resolution_sweep
from flexvision.layers.flex import resize_matrix

TIMM_PATCH_KERNEL = "torch_bicubic_aa"  # the patch interpolation of resize='timm' (layers/flex.py)


# ------------------------------------------------------------------------------------------------
# Units


@pytest.mark.parametrize("distribution", ["uniform", "area", "inverse_area", "fixed"])
def test_patch_size_probs_is_a_distribution(distribution):
    probs = lab.patch_size_probs((3, 4, 6, 8, 12), distribution)
    assert probs.shape == (5,)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-12)


def test_patch_size_probs_follow_each_rule():
    sizes = np.array([3, 4, 6, 8, 12], np.float64)
    np.testing.assert_allclose(lab.patch_size_probs(sizes, "uniform"), np.full(5, 0.2))
    area = lab.patch_size_probs(sizes, "area")
    np.testing.assert_allclose(area / area[0], sizes ** 2 / 9.0)
    inverse = lab.patch_size_probs(sizes, "inverse_area")
    np.testing.assert_allclose(inverse / inverse[0], 9.0 / sizes ** 2)
    np.testing.assert_array_equal(lab.patch_size_probs(sizes, "fixed"), [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(lab.patch_size_probs(sizes, "fixed", base_patch=8),
                                  [0, 0, 0, 1, 0])


def test_patch_size_probs_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown patch-size distribution 'zipf'"):
        lab.patch_size_probs((4, 8), "zipf")
    with pytest.raises(ValueError, match="base patch 5"):
        lab.patch_size_probs((4, 8), "fixed", base_patch=5)
    with pytest.raises(ValueError, match="non-empty"):
        lab.patch_size_probs((), "uniform")


def _upsample_each_patch(images: np.ndarray, patch: int, new_patch: int) -> np.ndarray:
    """B x for every patch x of the image separately (B: timm's patch interpolation)."""
    n, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    matrix = resize_matrix((patch, patch), (new_patch, new_patch), TIMM_PATCH_KERNEL)
    patches = images.reshape(n, gh, patch, gw, patch, c).transpose(0, 1, 3, 5, 2, 4)
    resized = patches.reshape(n, gh, gw, c, patch * patch) @ matrix.T
    resized = resized.reshape(n, gh, gw, c, new_patch, new_patch).transpose(0, 1, 4, 2, 5, 3)
    return resized.reshape(n, gh * new_patch, gw * new_patch, c).astype(np.float32)


def _patch_tokens(model, params, images):
    return np.asarray(model.apply({"params": params}, jnp.asarray(images),
                                  method="features")["patch_embed"])


def test_pi_resize_keeps_tokens_when_upsampling_and_bilinear_does_not():
    """FlexiViT eq. 6: <x, w> = <B x, PI(w)> for every patch x when P' >= P; the bilinear resize
    of the kernel changes the tokens (their scale grows with the patch area)."""
    overrides = dict(lab.FAST_MODEL_OVERRIDES)
    model = lab.make_model("vit_micro", **overrides)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    params = nn.meta.unbox(model.init(jax.random.key(0), images))["params"]
    reference = _patch_tokens(model, params, images)
    upsampled = _upsample_each_patch(images, lab.BASE_PATCH, 8)
    pi_model, pi_params = lab.with_resized_patch_embed("vit_micro", params, 8, "pi", **overrides)
    ours = _patch_tokens(pi_model, pi_params, upsampled)
    assert ours.shape == reference.shape == (2, 2, 2, overrides["embed_dim"])
    np.testing.assert_allclose(ours, reference, atol=1e-4 * max(1.0, np.abs(reference).max()))

    bl_model, bl_params = lab.with_resized_patch_embed("vit_micro", params, 8, "bilinear",
                                                       **overrides)
    bilinear = _patch_tokens(bl_model, bl_params, upsampled)
    assert np.abs(bilinear - reference).max() > 0.1 * np.abs(reference).max()


def test_with_resized_patch_embed_rejects_unknown_method():
    params = {"patch_embed": {"kernel": jnp.zeros((4, 4, 1, 8))}}
    with pytest.raises(ValueError, match="'pi' or 'bilinear'"):
        lab.with_resized_patch_embed("vit_micro", params, 8, "nearest")


def test_load_digits_split_shapes_and_channels():
    data = lab.load_digits_split(16, channels=3)
    images, labels = data["train"]
    assert images.shape == (1500, 16, 16, 3) and labels.shape == (1500,)
    assert data["test"][0].shape == (297, 16, 16, 3)
    assert images.min() >= -1.0 - 1e-6 and images.max() <= 1.0 + 1e-6
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_every_registered_family_has_a_tiny_config_that_runs_at_any_size():
    families = resolution_sweep.registered_families()
    assert {"vit", "swin", "mvit", "hrnet", "cyclemlp", "asmlp"} <= set(families)
    for family in families:
        _, model = resolution_sweep.tiny_model(family)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        for size in (24, 48):
            logits = jax.eval_shape(lambda v, x: model.apply(v, x), shapes,
                                    jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
            assert logits.shape == (2, 10), family


def test_tiny_model_names_the_missing_family():
    with pytest.raises(ValueError, match="no tiny configuration for family 'resnet'"):
        resolution_sweep.tiny_model("resnet")


def test_cosine_of_identical_and_opposite_features():
    a = np.random.default_rng(0).normal(size=(4, 6))
    assert resolution_sweep.cosine(a, a) == pytest.approx(1.0)
    assert resolution_sweep.cosine(a, -a) == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------------------
# Scripts end to end (--fast)


def _check_png(path):
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] >= 150 and image.shape[1] >= 200
    assert image[..., :3].std() > 0.01  # not a blank canvas


def _read_table(path, experiment):
    table = json.loads(path.read_text())
    assert table["experiment"] == experiment
    assert table["seconds"] >= 0
    return table


def _is_accuracy(value):
    return value is None or 0.0 <= value <= 1.0


def test_patch_size_sweep_fast(tmp_path):
    patch_size_sweep.main(["--outdir", str(tmp_path), "--fast"])
    table = _read_table(tmp_path / "patch_size_sweep.json", "patch_size_sweep")
    assert table["patch_sizes"] == [4, 8] and table["fixed_patches"] == [4]
    assert set(table["accuracy"]) == {"flexivit", "vit4_pi", "vit4_bilinear"}
    for accs in table["accuracy"].values():
        assert len(accs) == 2 and all(_is_accuracy(a) for a in accs)
    # At its own patch size both resizes are the identity: the same accuracy.
    assert table["accuracy"]["vit4_pi"][0] == table["accuracy"]["vit4_bilinear"][0]
    _check_png(tmp_path / "patch_size_sweep.png")


def test_patch_distribution_fast(tmp_path):
    patch_distribution.main(["--outdir", str(tmp_path), "--fast"])
    table = _read_table(tmp_path / "patch_distribution.json", "patch_distribution")
    assert set(table["accuracy"]) == set(patch_distribution.DISTRIBUTIONS)
    for name in patch_distribution.DISTRIBUTIONS:
        assert len(table["accuracy"][name]) == len(table["patch_sizes"]) == 2
        assert all(_is_accuracy(a) for a in table["accuracy"][name])
        assert sum(table["probs"][name]) == pytest.approx(1.0, abs=1e-3)
        assert table["mean_accuracy"][name] == pytest.approx(np.mean(table["accuracy"][name]))
    assert table["probs"]["fixed"] == [1.0, 0.0]
    _check_png(tmp_path / "patch_distribution.png")


def test_resolution_sweep_fast(tmp_path):
    # One family keeps this fast (each family's tiny model compiles in 5-40 s); every family
    # is traced at several sizes by the tiny-config test above.
    resolution_sweep.main(["--outdir", str(tmp_path), "--fast", "--families", "vit"])
    table = _read_table(tmp_path / "resolution_sweep.json", "resolution_sweep")
    assert table["resolutions"] == [16, 18] and table["train_resolution"] == 16
    assert set(table["families"]) == {"vit"}
    for family, result in table["families"].items():
        assert result["metric"] in ("accuracy", "stability")
        assert result["trained"] == (result["accuracy_at_train_resolution"]
                                     >= table["min_trained_accuracy"])
        assert len(result["accuracy"]) == len(result["stability"]) == 2
        assert all(_is_accuracy(a) for a in result["accuracy"])
        assert result["stability"][0] == pytest.approx(1.0, abs=1e-5)  # the training size
    # The ViT's 4x4 patches do not tile 18 px: recorded with the model's own message.
    vit = table["families"]["vit"]
    assert vit["accuracy"][1] is None and "does not tile" in vit["errors"]["18"]
    _check_png(tmp_path / "resolution_sweep.png")
