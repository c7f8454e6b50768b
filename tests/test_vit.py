"""flexvision.models.vit: registry entries, parameter counts, pooling variants, training mode,
dtype, sharding annotations and input validation."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexvision
from flexvision.models.vit import VisionTransformer
from tests.helpers import FIXTURES

FULL_SIZE = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
             "vit_base_patch8_224", "vit_large_patch16_224", "deit_tiny_distilled_patch16_224",
             "deit_small_distilled_patch16_224", "flexivit_small", "flexivit_base",
             "flexivit_large"]


def _param_count(model) -> int:
    patch = tuple(model.patch_size)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *patch, 3)))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))


@pytest.mark.parametrize("name", FULL_SIZE)
def test_parameter_count_equals_the_reference(name):
    counts = json.loads((FIXTURES / "param_counts.json").read_text())["counts"]
    assert _param_count(flexvision.create_model(name)) == counts[name]


def test_list_models_lists_the_family():
    names = flexvision.list_models(family="vit")
    for name in FULL_SIZE + ["vit_base_patch32_224", "deit_tiny_patch16_224", "vit_micro",
                             "flexivit_micro", "deit_base_distilled_patch16_224"]:
        assert name in names


@pytest.mark.parametrize("variant,width,depth,heads,mlp,patch", [
    ("Ti/16", 192, 12, 3, 768, 16), ("S/16", 384, 12, 6, 1536, 16), ("B/8", 768, 12, 12, 3072, 8),
    ("L/16", 1024, 24, 16, 4096, 16), ("So400m/14", 1152, 27, 16, 4304, 14)])
def test_big_vision_variant_strings(variant, width, depth, heads, mlp, patch):
    model = flexvision.create_model(variant, num_classes=10)
    assert (model.embed_dim, model.depth, model.num_heads, model.hidden_dim) == (
        width, depth, heads, mlp)
    assert tuple(model.patch_size) == (patch, patch)
    assert tuple(model.posemb_grid) == (224 // patch, 224 // patch)
    assert model.resize == "big_vision" and model.gelu_approximate and not model.posemb_prefix
    assert model.num_classes == 10


def test_unknown_names_raise_value_error():
    with pytest.raises(ValueError, match=r"unknown model name 'X/16'.*list_models"):
        flexvision.create_model("X/16")
    with pytest.raises(ValueError, match=r"unknown model name 'flexivit_tiny'.*Did you mean"):
        flexvision.create_model("flexivit_tiny")


def _micro(**overrides):
    return flexvision.create_model("flexivit_micro", **{"num_classes": 5, "depth": 1, **overrides})


def _init(model, images, seed=1):
    """model.init under jit (op-by-op dispatch is slow on a loaded CPU)."""
    return jax.jit(model.init)(jax.random.PRNGKey(seed), images)


def _apply(model, variables, images, **kwargs):
    """model.apply under jit; patch_size, train and method are static."""
    return jax.jit(model.apply, static_argnames=("patch_size", "train", "method"))(
        variables, images, **kwargs)


@pytest.fixture(scope="module")
def micro():
    model = _micro()
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 48, 48, 3))
    variables = _init(model, images, 1)
    return model, variables, images


def test_big_vision_option_names_are_accepted_and_translated():
    model = _micro(width=48, dropout=0.1, drop_path=0.2, pool_type="gap", class_token=False)
    assert (model.embed_dim, model.drop_rate, model.drop_path_rate, model.global_pool) == (
        48, 0.1, 0.2, "avg")
    with pytest.raises(ValueError, match=r"'width' \(big_vision's name\) and 'embed_dim'"):
        _micro(width=48, embed_dim=48)


def test_features_and_feature_info_follow_the_patch_size(micro):
    model, variables, images = micro
    apply = jax.jit(model.apply, static_argnames=("patch_size", "method"))
    for patch, grid in ((4, (12, 12)), ((12, 6), (4, 8))):
        feats = apply(variables, images, patch_size=patch, method="features")
        info = model.feature_info(patch_size=patch)
        assert list(feats) == [i.name for i in info] + ["pre_logits"]
        assert [i.name for i in info] == ["patch_embed", "block0", "feature_map"]
        for item in info:
            assert item.stride == (48 // grid[0], 48 // grid[1]) and item.channels == 96
            assert feats[item.name].shape == (2, *grid, 96)
        assert feats["pre_logits"].shape == (2, 96)
        logits = apply(variables, images, patch_size=patch)
        assert logits.shape == (2, 5) and np.all(np.isfinite(logits))
    base = apply(variables, images)
    np.testing.assert_array_equal(base, apply(variables, images, patch_size=8))


def test_train_mode_uses_dropout_and_drop_path():
    model = _micro(drop_rate=0.1, drop_path_rate=0.2)
    images = jnp.ones((2, 16, 16, 3))
    variables = _init(model, images, 0)
    params = nn.meta.unbox(variables["params"])

    @jax.jit
    def run(params, key):
        def loss(params):
            out = model.apply({"params": params}, images, train=True, patch_size=4,
                              rngs={"dropout": key})
            return jnp.sum(out ** 2), out

        (_, train_out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return model.apply({"params": params}, images), train_out, grads

    eval_a, train_a, grads = run(params, jax.random.PRNGKey(1))
    eval_b, train_b, _ = run(params, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(eval_a, eval_b)
    assert np.abs(np.asarray(train_a) - np.asarray(train_b)).max() > 0
    assert grads["patch_embed"]["kernel"].shape == (8, 8, 3, 96)
    assert float(jnp.abs(grads["patch_embed"]["kernel"]).sum()) > 0


def test_deit_returns_both_heads_in_training_and_their_mean_in_eval():
    model = flexvision.create_model("deit_tiny_distilled_patch16_224", num_classes=4, depth=1)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 48, 3))
    variables = _init(model, images, 1)
    cls_logits, dist_logits = _apply(model, variables, images, train=True)
    np.testing.assert_allclose(_apply(model, variables, images), (cls_logits + dist_logits) / 2,
                               atol=1e-6)
    assert nn.meta.unbox(variables["params"])["pos_embed"].shape == (1, 2 + 14 * 14, 192)
    single = model.clone(distilled_training=False)
    assert _apply(single, variables, images, train=True).shape == (2, 4)


@pytest.mark.parametrize("overrides,extra_params", [
    (dict(global_pool="avg", class_token=False, fc_norm=True), {"fc_norm"}),
    (dict(global_pool="avg", class_token=True), set()),
    (dict(global_pool="map", class_token=False), {"attn_pool"}),
    (dict(global_pool="token", num_reg_tokens=4), {"reg_token"}),
    (dict(global_pool="none", class_token=False, num_classes=0), set()),
])
def test_pooling_variants(overrides, extra_params):
    model = _micro(**overrides)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 24, 3))

    @jax.jit
    def init_and_run(images):  # one compilation for init, features and logits
        variables = model.init(jax.random.PRNGKey(1), images)
        return (variables, model.apply(variables, images, method="features"),
                model.apply(variables, images))

    variables, feats, out = init_and_run(images)
    params = nn.meta.unbox(variables["params"])
    assert extra_params <= set(params)
    prefix = model.num_prefix_tokens
    if model.global_pool == "none":
        assert out.shape == (2, prefix + 2 * 3, 96)
        return
    assert out.shape == (2, 5)
    if model.global_pool == "avg" and not model.fc_norm:
        np.testing.assert_allclose(feats["pre_logits"], feats["feature_map"].mean((1, 2)),
                                   atol=1e-6)
    if model.global_pool == "map":  # no prefix tokens: the encoded tokens are the feature map
        _check_map_head(params["attn_pool"], feats["feature_map"].reshape(2, 6, 96),
                        feats["pre_logits"])


def _layer_norm(x, p, eps=1e-6):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _check_map_head(p, tokens, pooled, heads=3):
    """big_vision MAPHead in NumPy: probe attends over the tokens, then probe + MLP(LN(probe))."""
    p = jax.tree_util.tree_map(np.asarray, p)
    tokens = np.asarray(tokens, np.float64)
    batch, length, width = tokens.shape
    head_dim = width // heads
    q = (p["latent"][0] @ p["q"]["kernel"] + p["q"]["bias"]).reshape(1, heads, head_dim)
    kv = (tokens @ p["kv"]["kernel"] + p["kv"]["bias"]).reshape(batch, length, 2, heads, head_dim)
    logits = np.einsum("qhd,bkhd->bhqk", q, kv[:, :, 0]) / np.sqrt(head_dim)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("bhqk,bkhd->bqhd", probs, kv[:, :, 1]).reshape(batch, width)
    x = attended @ p["proj"]["kernel"] + p["proj"]["bias"]
    hidden = _layer_norm(x, p["norm"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    hidden = np.asarray(jax.nn.gelu(hidden, approximate=False))
    expected = x + hidden @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
    np.testing.assert_allclose(pooled, expected, atol=1e-4)


@pytest.mark.parametrize("shape,patch,message", [
    ((1, 48, 44, 3), 8, r"patch size 8x8 does not tile a 48x44 image.*\[1, 2, 4\]"),
    ((1, 4, 48, 3), None, r"4x48 pixels is smaller than one 8x8 patch"),
])
def test_bad_input_raises_value_error(micro, shape, patch, message):
    model, variables, _ = micro
    with pytest.raises(ValueError, match=message):
        _apply(model, variables, jnp.ones(shape), patch_size=patch)


@pytest.mark.parametrize("overrides,message", [
    (dict(global_pool="gap"), r"global_pool='gap' is unknown; accepted"),
    (dict(global_pool="token", class_token=False), r"set class_token=True"),
    (dict(resize="bicubic"), r"resize='bicubic' is unknown; accepted"),
    (dict(num_heads=5), r"embed_dim=96 is not divisible by num_heads=5"),
    (dict(dist_token=True, global_pool="avg"), r"dist_token=True \(DeiT\) needs"),
])
def test_bad_config_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(_micro(**overrides).init, jax.random.PRNGKey(0), jnp.ones((1, 16, 16, 3)))


def test_module_is_the_documented_class():
    assert isinstance(flexvision.create_model("vit_micro"), VisionTransformer)
