"""Necks: the FPN on every hierarchical family and ViTDet's simple feature pyramid on the ViT
family, at a square and a non-square size not divisible by 32; the FPN against a NumPy
transcription of torchvision's algorithm; FlexiViT at several patch sizes on one grid."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexvision import registry
from flexvision.detection import necks
from flexvision.layers.flex import resize_matrix_1d

HIERARCHICAL = ("swin", "mvit", "hrnet", "cyclemlp", "asmlp")
SIZES = ((64, 64), (56, 88))  # square; non-square, neither side a multiple of 32


def _neck_shapes(backbone, neck, size, **flex):
    """Shapes of the neck's levels on a (2, *size, 3) batch, without compiling."""
    images = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)

    def run(images):
        maps = backbone.init_with_output(jax.random.PRNGKey(0), images, method="features",
                                         **flex)[0]
        if isinstance(neck, necks.SimpleFeaturePyramid):
            stride = size[0] // maps[neck.in_feature].shape[1]
            return neck.init_with_output(jax.random.PRNGKey(1), maps, stride)[0]
        return neck.init_with_output(jax.random.PRNGKey(1), maps)[0]

    return jax.eval_shape(run, images)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", HIERARCHICAL)
def test_fpn_on_every_hierarchical_family(family, size):
    backbone = registry.create_model(registry.tiny_variant(family), num_classes=0)
    neck = necks.build_neck(backbone, out_channels=12)
    assert isinstance(neck, necks.FPN)
    info = neck.feature_info()
    chosen = necks.pyramid_inputs(backbone.feature_info())
    assert [i.stride[0] for i in info] == [i.stride[0] for i in chosen] + [
        2 * chosen[-1].stride[0]]
    assert "stem" not in neck.in_features  # the stage output at stride 4, not the stem
    out = _neck_shapes(backbone, neck, size)
    assert list(out) == [i.name for i in info]
    for item in info:  # ceil(H / stride): the families' rounding, and the pool level's
        assert out[item.name].shape == (2, math.ceil(size[0] / item.stride[0]),
                                        math.ceil(size[1] / item.stride[1]), 12), item


@pytest.mark.parametrize("patch", [8, 16])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])  # the ViT needs sizes its patch tiles
def test_simple_feature_pyramid_on_vit(size, patch):
    backbone = registry.create_model("vit_micro", num_classes=0)  # base patch 8
    neck = necks.build_neck(backbone, out_channels=12)
    assert isinstance(neck, necks.SimpleFeaturePyramid)
    assert [i.stride for i in neck.feature_info()] == [(4, 4), (8, 8), (16, 16), (32, 32),
                                                         (64, 64)]
    out = _neck_shapes(backbone, neck, size, patch_size=patch)
    for item in neck.feature_info():
        assert out[item.name].shape == (2, math.ceil(size[0] / item.stride[0]),
                                        math.ceil(size[1] / item.stride[1]), 12), item


def test_flexivit_neck_gives_one_grid_at_every_patch_size():
    backbone = registry.create_model("flexivit_micro", num_classes=0)
    neck = necks.build_neck(backbone, out_channels=8)
    images = jax.random.normal(jax.random.PRNGKey(0), (1, 48, 96, 3))
    variables = backbone.init(jax.random.PRNGKey(0), images)
    neck_vars = None
    outputs = {}
    for patch in (8, 12, 16):
        maps = backbone.apply(variables, images, method="features", patch_size=patch)
        if neck_vars is None:
            neck_vars = neck.init(jax.random.PRNGKey(1), maps, patch)
        outputs[patch] = neck.apply(neck_vars, maps, patch)  # one set of neck weights
    for patch, out in outputs.items():
        assert [v.shape for v in out.values()] == [
            (1, 12, 24, 8), (1, 6, 12, 8), (1, 3, 6, 8), (1, 2, 3, 8), (1, 1, 2, 8)], patch
        assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
    assert not np.allclose(outputs[8]["0"], outputs[16]["0"])  # the patch size matters


def test_resample_tokens_uses_the_flex_resize_matrices():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 12, 3))  # stride 8, 48x96 pixels
    out = necks.resample_tokens(x, 8, 16)
    expected = np.einsum("oh,pw,bhwc->bopc", resize_matrix_1d(6, 3, "jax_linear"),
                         resize_matrix_1d(12, 6, "jax_linear"), np.asarray(x, np.float64))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert necks.resample_tokens(x, 16, 16) is x
    with pytest.raises(ValueError, match=r"covers 42x84 pixels.*pad the images to a multiple "
                                         r"of 112"):
        necks.resample_tokens(x[:, :6, :12], 7, 16)


def _nearest(x, size):
    """torch F.interpolate(mode='nearest'): source index floor(dst * in / out)."""
    rows = np.arange(size[0]) * x.shape[1] // size[0]
    cols = np.arange(size[1]) * x.shape[2] // size[1]
    return x[:, rows][:, :, cols]


def _conv(x, kernel, bias):
    """Same-padded stride-1 NHWC convolution, HWIO kernel, written out tap by tap."""
    k = kernel.shape[0]
    p = k // 2
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            out += padded[:, i:i + x.shape[1], j:j + x.shape[2]] @ kernel[i, j]
    return out + bias


def test_fpn_matches_torchvisions_algorithm_on_odd_sizes():
    """torchvision FeaturePyramidNetwork.forward + LastLevelMaxPool, transcribed in NumPy."""
    shapes = [(2, 13, 21, 4), (2, 7, 11, 6), (2, 4, 6, 8)]  # ceil-halving, odd sizes
    maps = [jax.random.normal(jax.random.PRNGKey(i), s) for i, s in enumerate(shapes)]
    neck = necks.FPN(in_features=("a", "b", "c"), in_strides=(4, 8, 16), out_channels=5)
    variables = neck.init(jax.random.PRNGKey(3), maps)
    out = neck.apply(variables, {"a": maps[0], "b": maps[1], "c": maps[2]})
    p = {k: {n: np.asarray(getattr(v, "value", v), np.float64) for n, v in d.items()}
         for k, d in jax.lax.stop_gradient(variables["params"]).items()}
    x = [np.asarray(m, np.float64) for m in maps]
    last = _conv(x[2], p["inner_2"]["kernel"], p["inner_2"]["bias"])
    results = [_conv(last, p["layer_2"]["kernel"], p["layer_2"]["bias"])]
    for i in (1, 0):
        lateral = _conv(x[i], p[f"inner_{i}"]["kernel"], p[f"inner_{i}"]["bias"])
        last = lateral + _nearest(last, lateral.shape[1:3])
        results.insert(0, _conv(last, p[f"layer_{i}"]["kernel"], p[f"layer_{i}"]["bias"]))
    results.append(results[-1][:, ::2, ::2])
    assert list(out) == ["0", "1", "2", "pool"]
    for got, ref in zip(out.values(), results):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1, np.abs(ref).max()))


def test_every_neck_parameter_has_logical_axis_names():
    import flax.linen as nn
    backbone = registry.create_model("vit_micro", num_classes=0)
    for neck, args in ((necks.build_neck(backbone, 8), (jnp.zeros((1, 3, 5, 96)), 16)),
                       (necks.FPN(("a", "b"), (4, 8), 8),
                        ([jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 4, 4, 5))],))):
        params = jax.eval_shape(lambda x: neck.init(jax.random.PRNGKey(0), x, *args[1:]),
                                args[0])["params"]
        leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)


def test_bad_input():
    with pytest.raises(ValueError, match=r"no backbone map has a stride in \[16, 32\]"):
        necks.pyramid_inputs(registry.create_model("vit_micro").feature_info(), min_stride=16)
    neck = necks.FPN(("a", "b"), (4, 8), 8)
    with pytest.raises(ValueError, match=r"FPN reads 2 maps"):
        neck.init(jax.random.PRNGKey(0), [jnp.zeros((1, 8, 8, 3))])
