"""flexvision.layers.flex: resize matrices against the libraries they reproduce, PI-resize,
position-embedding resampling and the flexible patch embedding."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flexvision.layers import flex

SIZES = [(7, 5), (5, 7), (7, 30), (32, 48), (32, 15), (16, 8), (3, 3), (15, 4), (1, 3)]


@pytest.mark.parametrize("old,new", SIZES)
def test_jax_linear_matrix_matches_jax_image_resize(old, new):
    x = np.random.default_rng(old * 100 + new).normal(size=(old, old + 2)).astype(np.float32)
    ref = jax.image.resize(jnp.asarray(x), (new, new + 1), "linear")  # antialias=True default
    ours = flex.resize_matrix((old, old + 2), (new, new + 1), "jax_linear") @ x.reshape(-1)
    # JAX computes sample positions in float32: ~1e-6 relative error per weight.
    np.testing.assert_allclose(ours.reshape(new, new + 1), ref, atol=5e-5)


def test_tf_bilinear_matrix_matches_tf_image_resize():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    for old, new in SIZES:
        x = rng.normal(size=(old, old + 2)).astype(np.float32)
        ref = tf.image.resize(x[None, ..., None], (new, new + 1), method="bilinear")
        ours = flex.resize_matrix((old, old + 2), (new, new + 1), "tf_bilinear") @ x.reshape(-1)
        np.testing.assert_allclose(ours.reshape(new, new + 1), ref.numpy()[0, ..., 0], atol=1e-5)


@pytest.mark.parametrize("old,new", SIZES)
def test_torch_bicubic_aa_matrix_matches_pil_bicubic(old, new):
    """torch's antialiased bicubic is PIL's resampling filter (a = -0.5, support scaled when
    downsampling, edge taps renormalised); PIL's float 'F' mode is an independent reference.
    (The timm fixture's resampled arrays pin the same matrices in test_vit_convert.py.)"""
    x = np.random.default_rng(old * 7 + new).normal(size=(old, old + 2)).astype(np.float32)
    ref = np.asarray(Image.fromarray(x, mode="F").resize((new + 1, new), Image.BICUBIC))
    ours = flex.resize_matrix((old, old + 2), (new, new + 1), "torch_bicubic_aa") @ x.reshape(-1)
    np.testing.assert_allclose(ours.reshape(new, new + 1), ref, atol=1e-5)


def test_resize_matrix_rows_sum_to_one():
    for kernel in flex._KERNELS_1D:  # pylint: disable=protected-access
        for old, new in SIZES:
            np.testing.assert_allclose(flex.resize_matrix_1d(old, new, kernel).sum(1), 1.0,
                                       atol=1e-12)


def test_torch_bilinear_is_tf_bilinear_and_matrices_are_shared_read_only():
    """torch's align_corners=False bilinear and TF's half-pixel bilinear are one operator."""
    for old, new in [*SIZES, (3, 6), (7, 57), (57, 7)]:
        torch_matrix = flex.resize_matrix_1d(old, new, "torch_bilinear")
        np.testing.assert_array_equal(torch_matrix, flex.resize_matrix_1d(old, new, "tf_bilinear"))
        assert torch_matrix is flex.resize_matrix_1d(old, new, "torch_bilinear")
        with pytest.raises(ValueError, match="read-only"):
            torch_matrix[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        flex.pi_resize_matrix((8, 8), (12, 12), "timm")[0, 0] = 1.0
    with pytest.raises(ValueError, match="unknown 1-D resize kernel.*torch_bicubic"):
        flex.resize_matrix_1d(4, 8, "bicubic")


@pytest.mark.parametrize("method", ["big_vision", "timm"])
@pytest.mark.parametrize("old,new", [(8, 12), (16, 24), (16, 30), (32, 48), ((8, 6), (12, 9))])
def test_pi_resize_preserves_tokens_when_upsampling(method, old, new):
    """FlexiViT eq. 6: <x, w> == <resize(x), pinv(B^T) w> for every patch x when P' >= P."""
    old, new = flex.to_pair(old), flex.to_pair(new)
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(*old, 3, 5)).astype(np.float32)
    patches = rng.normal(size=(4, *old, 3)).astype(np.float32)
    resized_kernel = np.asarray(flex.pi_resize_kernel(jnp.asarray(kernel), new, method))
    if method == "big_vision":
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        resized_patches = tf.image.resize(patches, new, method="bilinear").numpy()
    else:
        matrix = flex.resize_matrix(old, new, "torch_bicubic_aa")
        resized_patches = np.einsum("nm,bmc->bnc", matrix, patches.reshape(4, -1, 3)).reshape(
            4, *new, 3)
    before = np.einsum("bhwc,hwcd->bd", patches, kernel)
    after = np.einsum("bhwc,hwcd->bd", resized_patches, resized_kernel)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["big_vision", "timm"])
def test_pi_resize_downsampling_is_least_squares(method):
    """For P' < P, w' = pinv(B^T) w minimises ||B^T w' - w|| (the paper's choice)."""
    kernel = np.random.default_rng(1).normal(size=(16, 16, 2, 3))
    resized = np.asarray(flex.pi_resize_kernel(jnp.asarray(kernel, jnp.float32), 10, method))
    kernel_name = "tf_bilinear" if method == "big_vision" else "torch_bicubic_aa"
    b_transposed = flex.resize_matrix((16, 16), (10, 10), kernel_name).T
    solution = np.linalg.lstsq(b_transposed, kernel.reshape(256, -1), rcond=None)[0]
    np.testing.assert_allclose(resized.reshape(100, -1), solution, atol=1e-4)


def test_pi_resize_matrix_is_cached_and_identity_is_free():
    flex.pi_resize_matrix.cache_clear()
    first = flex.pi_resize_matrix((16, 16), (24, 24), "timm")
    again = flex.pi_resize_matrix((16, 16), (24, 24), "timm")
    assert first is again and flex.pi_resize_matrix.cache_info().hits == 1
    kernel = jnp.ones((16, 16, 3, 4))
    assert flex.pi_resize_kernel(kernel, 16, "timm") is kernel


@pytest.mark.parametrize("method,kernel", [("big_vision", "jax_linear"),
                                           ("timm", "torch_bicubic_aa")])
def test_resample_posemb_keeps_prefix_and_resizes_grid(method, kernel):
    rng = np.random.default_rng(2)
    posemb = rng.normal(size=(1, 2 + 7 * 7, 6)).astype(np.float32)
    out = np.asarray(flex.resample_posemb(jnp.asarray(posemb), 7, (5, 9), 2, method))
    assert out.shape == (1, 2 + 45, 6)
    np.testing.assert_array_equal(out[:, :2], posemb[:, :2])
    grid = posemb[0, 2:].reshape(7, 7, 6)
    if method == "big_vision":
        ref = np.asarray(jax.image.resize(jnp.asarray(grid), (5, 9, 6), "linear"))
    else:
        ref = np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize(
            (9, 5), Image.BICUBIC)) for c in range(6)], -1)
    np.testing.assert_allclose(out[0, 2:].reshape(5, 9, 6), ref, atol=1e-5)
    same = flex.resample_posemb(jnp.asarray(posemb), 7, 7, 2, method)
    np.testing.assert_array_equal(same, posemb)


def test_resample_posemb_rejects_wrong_length():
    with pytest.raises(ValueError, match=r"does not fit a 7x7 grid with 1 prefix.*expected"):
        flex.resample_posemb(jnp.zeros((1, 49, 4)), 7, 5, 1, "timm")
    with pytest.raises(ValueError, match=r"resize method 'bicubic' is unknown.*accepted"):
        flex.resample_posemb(jnp.zeros((1, 49, 4)), 7, 5, 0, "bicubic")


def _embed(patch_size=None, images=None):
    module = flex.FlexiPatchEmbed(width=8, patch_size=(16, 16), resize="timm")
    images = jnp.ones((2, 48, 48, 3)) if images is None else images
    variables = module.init(jax.random.PRNGKey(0), images)
    return module, variables, images


def test_flexi_patch_embed_stores_one_kernel_and_matches_conv_at_base_size():
    module, variables, _ = _embed()
    params = nn.meta.unbox(variables["params"])
    assert set(params) == {"kernel", "bias"} and params["kernel"].shape == (16, 16, 3, 8)
    assert variables["params"]["kernel"].names == ("conv_h", "conv_w", "conv_in", "conv_out")
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 48, 32, 3))
    out = module.apply(variables, images)
    patches = images.reshape(2, 3, 16, 2, 16, 3).transpose(0, 1, 3, 2, 4, 5)
    ref = jnp.einsum("bhwpqc,pqcd->bhwd", patches, params["kernel"]) + params["bias"]
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for patch, grid in ((8, (6, 4)), ((16, 8), (3, 4)), (16, (3, 2)), (None, (3, 2))):
        assert module.apply(variables, images, patch).shape == (2, *grid, 8)


def test_gradients_flow_into_the_single_stored_kernel():
    module, variables, _ = _embed()
    params = nn.meta.unbox(variables["params"])
    images = jax.random.normal(jax.random.PRNGKey(3), (2, 48, 48, 3))
    for patch in (8, 24):
        def loss(p, patch=patch):
            return jnp.sum(module.apply({"params": p}, images, patch) ** 2)

        grads = jax.grad(loss)(params)
        assert grads["kernel"].shape == (16, 16, 3, 8)
        assert set(grads) == {"kernel", "bias"}
        assert float(jnp.mean(jnp.abs(grads["kernel"]) > 0)) > 0.9, patch


def test_flexi_patch_embed_under_jit_with_static_patch_size():
    module, variables, images = _embed()
    apply = jax.jit(module.apply, static_argnums=2)
    assert apply(variables, images, 12).shape == (2, 4, 4, 8)
    assert apply(variables, images, 24).shape == (2, 2, 2, 8)


@pytest.mark.parametrize("shape,patch,message", [
    ((2, 48, 48), None, r"NHWC with 3 channels.*got shape \(2, 48, 48\)"),
    ((2, 48, 48, 1), None, r"NHWC with 3 channels.*got shape \(2, 48, 48, 1\)"),
    ((2, 48, 40, 3), 16, r"patch size 16x16 does not tile a 48x40 image.*\[1, 2, 4, 8\]"),
    ((2, 8, 48, 3), 16, r"8x48 pixels is smaller than one 16x16 patch"),
    ((2, 48, 48, 3), 0, r"patch_size must be positive, got 0"),
    ((2, 48, 48, 3), (4, 4, 4), r"patch_size must be a positive int or a pair"),
])
def test_flexi_patch_embed_rejects_bad_input(shape, patch, message):
    module, variables, _ = _embed()
    with pytest.raises(ValueError, match=message):
        module.apply(variables, jnp.ones(shape), patch)


def test_separable_pinv_equals_pinv_of_the_full_resize_matrix():
    for method, kernel in (("big_vision", "tf_bilinear"), ("timm", "torch_bicubic_aa")):
        for old, new in (((8, 6), (12, 9)), ((10, 10), (6, 6))):
            full = np.linalg.pinv(flex.resize_matrix(old, new, kernel).T)
            np.testing.assert_allclose(flex.pi_resize_matrix(old, new, method), full, atol=1e-10)
