"""Parity of the ViT family with its reference implementations (timm, big_vision fixtures)."""

import jax
import numpy as np
import pytest

from flexvision import convert
from flexvision.layers import flex
from flexvision.models.vit import VisionTransformer
from tests.helpers import assert_parity, load_fixture, parity_error, state_dict_of


def _apply(model, variables, images, **kwargs):
    """model.apply under jit (patch_size, train, method static): faster than op-by-op on CPU."""
    apply = jax.jit(model.apply, static_argnames=("patch_size", "train", "method"))
    return apply(variables, images, **kwargs)


def _report(what, ours, ref):
    err, allowed = parity_error(ours, ref)
    print(f"{what}: max|ours-ref| = {err:.3g} (allowed {allowed:.3g})")
    assert_parity(ours, ref, what)


@pytest.fixture(scope="module")
def vit_dynamic():
    arrays, meta = load_fixture("timm/vit_patch16_dynamic.npz")
    model, variables = convert.from_timm(meta["timm_name"], state_dict_of(arrays), **meta["kwargs"])
    return arrays, model, variables


@pytest.mark.parametrize("index", [0, 1, 2])
def test_timm_vit_dynamic_img_size(vit_dynamic, index):
    arrays, model, variables = vit_dynamic
    logits = _apply(model, variables, arrays[f"input/{index}"])
    _report(f"timm vit dynamic input/{index} {arrays[f'input/{index}'].shape}", logits,
            arrays[f"output/{index}"])


def test_timm_deit_distilled():
    arrays, meta = load_fixture("timm/deit_tiny_distilled_patch16.npz")
    model, variables = convert.from_timm(meta["timm_name"], state_dict_of(arrays), **meta["kwargs"])
    assert model.dist_token and model.posemb_prefix
    for index in (0, 1):
        logits = _apply(model, variables, arrays[f"input/{index}"])
        _report(f"timm deit distilled input/{index}", logits, arrays[f"output/{index}"])
    cls_logits, dist_logits = _apply(model, variables, arrays["input/0"], train=True)
    np.testing.assert_allclose((cls_logits + dist_logits) / 2, arrays["output/0"], atol=1e-4)
    assert np.abs(np.asarray(cls_logits) - np.asarray(dist_logits)).max() > 1e-3


@pytest.fixture(scope="module")
def flexivit_timm():
    arrays, meta = load_fixture("timm/flexivit_small_patch_sizes.npz")
    model, variables = convert.from_timm(meta["timm_name"], state_dict_of(arrays), **meta["kwargs"])
    return arrays, meta, model, variables


@pytest.mark.parametrize("patch", [8, 10, 16, 30, 48])
def test_timm_flexivit_patch_sizes(flexivit_timm, patch):
    arrays, _, model, variables = flexivit_timm
    assert not model.posemb_prefix and tuple(model.posemb_grid) == (15, 15)
    logits = _apply(model, variables, arrays["input/0"], patch_size=patch)
    _report(f"timm flexivit patch {patch}", logits, arrays[f"output/patch{patch}"])
    if patch == 16:
        _report("timm flexivit base patch (patch_size=None)",
                _apply(model, variables, arrays["input/0"]), arrays["output/0"])


@pytest.mark.parametrize("patch", [8, 10, 30, 48])
def test_timm_flexivit_resampled_arrays(flexivit_timm, patch):
    arrays, _, _, variables = flexivit_timm
    params = variables["params"]
    kernel = flex.pi_resize_kernel(params["patch_embed"]["kernel"], patch, "timm")
    ref_kernel = arrays[f"resampled/patch{patch}/patch_embed.proj.weight"].transpose(2, 3, 1, 0)
    _report(f"timm PI-resized kernel 16->{patch}", kernel, ref_kernel)
    grid = 240 // patch
    posemb = flex.resample_posemb(params["pos_embed"], 15, grid, 0, "timm")
    _report(f"timm posemb 15->{grid}", posemb, arrays[f"resampled/patch{patch}/pos_embed"])


@pytest.fixture(scope="module")
def big_vision_flexivit():
    arrays, meta = load_fixture("big_vision/bigvision_flexivit_tok.npz")
    params = {k: v for k, v in arrays.items() if k.startswith("params/")}
    model, variables = convert.from_big_vision(params)
    return arrays, meta, model, variables


def test_big_vision_config_is_inferred(big_vision_flexivit):
    _, meta, model, _ = big_vision_flexivit
    config = meta["config"]
    assert (model.embed_dim, model.depth, model.num_heads, model.mlp_dim, model.num_classes) == (
        config["width"], config["depth"], config["num_heads"], config["mlp_dim"],
        config["num_classes"])
    assert tuple(model.patch_size) == tuple(config["patch_size"])
    assert tuple(model.posemb_grid) == tuple(config["posemb_size"])
    assert model.global_pool == "token" and model.resize == "big_vision" and model.gelu_approximate


@pytest.mark.parametrize("seqhw", [5, 8, 15, 16, 24, 30])
def test_big_vision_flexivit_seqhw(big_vision_flexivit, seqhw):
    arrays, meta, model, variables = big_vision_flexivit
    patch = meta["image_size"] // seqhw
    logits = _apply(model, variables, arrays["input/0"], patch_size=patch)
    _report(f"big_vision flexivit seqhw {seqhw} (patch {patch})", logits,
            arrays[f"output/seqhw{seqhw}"])


def test_big_vision_without_prefix_and_bfloat16_npz(tmp_path, big_vision_flexivit):
    arrays, _, model, variables = big_vision_flexivit
    import ml_dtypes

    bare = {k[len("params/"):]: v.astype(ml_dtypes.bfloat16)
            for k, v in arrays.items() if k.startswith("params/")}
    np.savez(tmp_path / "bv.npz", **bare)
    model_bf16, variables_bf16 = convert.from_big_vision(str(tmp_path / "bv.npz"))
    assert model_bf16 == model
    leaves = jax.tree_util.tree_leaves(variables_bf16)
    assert all(leaf.dtype == np.float32 for leaf in leaves)
    ref = jax.tree_util.tree_leaves(variables)
    assert all(np.abs(a - b).max() <= 1e-2 * max(1.0, np.abs(b).max()) for a, b in zip(leaves, ref))


def test_checkpoint_that_does_not_fit_raises():
    arrays, meta = load_fixture("timm/vit_patch16_dynamic.npz")
    kwargs = dict(meta["kwargs"], embed_dim=96)
    with pytest.raises(ValueError, match=r"(?s)does not fit the model.*model expects"):
        convert.from_timm(meta["timm_name"], state_dict_of(arrays), **kwargs)
    with pytest.raises(ValueError, match=r"timm kwargs \['bogus'\] are not supported.*supported"):
        convert.from_timm(meta["timm_name"], state_dict_of(arrays), bogus=1)
    with pytest.raises(ValueError, match=r"no flexvision ViT-family configuration.*accepted"):
        convert.from_timm("vit_unknown_patch3", state_dict_of(arrays))
    with pytest.raises(ValueError, match=r"not a big_vision ViT checkpoint"):
        convert.from_big_vision(state_dict_of(arrays))


def _big_vision_arrays(pool, width=24, depth=2, heads=2, mlp=48, classes=3, patch=4, grid=3,
                       prefix="params/"):
    """Random big_vision ViT arrays with the shapes and names of big_vision's models/vit.py."""
    rng = np.random.default_rng(0)
    head_dim = width // heads
    shapes = {"embedding/kernel": (patch, patch, 3, width), "embedding/bias": (width,),
              "pos_embedding": (1, grid * grid, width), "Transformer/encoder_norm/scale": (width,),
              "Transformer/encoder_norm/bias": (width,), "head/kernel": (width, classes),
              "head/bias": (classes,)}

    def attention(scope):
        for name in ("query", "key", "value"):
            shapes[f"{scope}/{name}/kernel"] = (width, heads, head_dim)
            shapes[f"{scope}/{name}/bias"] = (heads, head_dim)
        shapes[f"{scope}/out/kernel"] = (heads, head_dim, width)
        shapes[f"{scope}/out/bias"] = (width,)

    def mlp_block(scope):
        shapes.update({f"{scope}/Dense_0/kernel": (width, mlp), f"{scope}/Dense_0/bias": (mlp,),
                       f"{scope}/Dense_1/kernel": (mlp, width), f"{scope}/Dense_1/bias": (width,)})

    for i in range(depth):
        block = f"Transformer/encoderblock_{i}"
        for norm in ("LayerNorm_0", "LayerNorm_1"):
            shapes[f"{block}/{norm}/scale"] = shapes[f"{block}/{norm}/bias"] = (width,)
        attention(f"{block}/MultiHeadDotProductAttention_0")
        mlp_block(f"{block}/MlpBlock_0")
    if pool == "tok":
        shapes["cls"] = (1, 1, width)
    if pool == "map":
        shapes["MAPHead_0/probe"] = (1, 1, width)
        attention("MAPHead_0/MultiHeadDotProductAttention_0")
        shapes["MAPHead_0/LayerNorm_0/scale"] = shapes["MAPHead_0/LayerNorm_0/bias"] = (width,)
        mlp_block("MAPHead_0/MlpBlock_0")
    return {prefix + k: rng.normal(size=s).astype(np.float32) * 0.3 for k, s in shapes.items()}


@pytest.mark.parametrize("pool,prefix", [("gap", ""), ("map", "params/"), ("tok", "")])
def test_big_vision_import_infers_pooling_and_fuses_attention(pool, prefix):
    arrays = _big_vision_arrays(pool, prefix=prefix)
    model, variables = convert.from_big_vision(arrays)
    assert (model.embed_dim, model.depth, model.num_heads, model.mlp_dim, model.num_classes) == (
        24, 2, 2, 48, 3)
    assert model.global_pool == {"gap": "avg", "tok": "token"}.get(pool, pool)
    assert model.class_token == (pool == "tok")
    assert tuple(model.patch_size) == (4, 4) and tuple(model.posemb_grid) == (3, 3)
    params = variables["params"]
    attn = f"{prefix}Transformer/encoderblock_1/MultiHeadDotProductAttention_0"
    qkv = params["blocks_1"]["attn"]["qkv"]["kernel"].reshape(24, 3, 2, 12)
    for index, name in enumerate(("query", "key", "value")):
        np.testing.assert_array_equal(qkv[:, index], arrays[f"{attn}/{name}/kernel"])
    np.testing.assert_array_equal(params["blocks_1"]["attn"]["proj"]["kernel"],
                                  arrays[f"{attn}/out/kernel"].reshape(24, 24))
    if pool == "map":
        kv = params["attn_pool"]["kv"]["kernel"].reshape(24, 2, 2, 12)
        value = f"{prefix}MAPHead_0/MultiHeadDotProductAttention_0/value/kernel"
        np.testing.assert_array_equal(kv[:, 1], arrays[value])
    images = np.random.default_rng(1).normal(size=(1, 12, 12, 3)).astype(np.float32)
    feats = _apply(model, variables, images, method="features")
    if pool == "gap":  # big_vision: encoder_norm on every token, then the mean
        np.testing.assert_allclose(feats["pre_logits"],
                                   np.mean(feats["feature_map"], axis=(1, 2)), atol=1e-5)
    assert _apply(model, variables, images, patch_size=6).shape == (1, 3)


def test_timm_kwargs_translate_to_the_config():
    from flexvision.convert.vit import timm_config

    gap = timm_config("vit_base_patch16_224.augreg_in21k", global_pool="avg", class_token=False,
                      reg_tokens=4, no_embed_class=True, img_size=256, embed_dim=192,
                      num_heads=3, mlp_ratio=2.0, dynamic_img_size=True)
    assert (gap["global_pool"], gap["fc_norm"], gap["class_token"], gap["num_reg_tokens"]) == (
        "avg", True, False, 4)
    assert not gap["posemb_prefix"] and gap["posemb_grid"] == (16, 16)
    assert gap["embed_dim"] == 192 and gap["mlp_ratio"] == 2.0 and gap["mlp_dim"] is None
    model = VisionTransformer(**gap)
    assert model.hidden_dim == 384
    flexi = timm_config("flexivit_small", patch_size=8)
    assert flexi["patch_size"] == (8, 8) and flexi["posemb_grid"] == (30, 30)
    with pytest.raises(ValueError, match=r"global_pool='mean' is not supported; accepted"):
        timm_config("vit_small_patch16_224", global_pool="mean")
    for pool, fc_norm in (("max", True), ("avgmax", True), ("map", False), ("prr", False)):
        config = timm_config("vit_small_patch16_224", global_pool=pool, class_token=False,
                             pool_include_prefix=True)
        assert (config["fc_norm"], config["pool_include_prefix"]) == (fc_norm, True)
    with pytest.raises(ValueError, match=r"timm kwarg init_values other than None"):
        timm_config("vit_small_patch16_224", init_values=1e-5)
