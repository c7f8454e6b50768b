"""MViTv2 / MViT v1 (flexvision/models/mvit.py): timm parity, any input size, configs, import."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import flexvision
from flexvision import convert
from flexvision.convert.common import abstract_variables
from flexvision.layers import attention, flex
from flexvision.models import mvit
from tests.helpers import FIXTURES, assert_parity, load_fixture, parity_error, state_dict_of

FIXTURE = "timm/mvitv2_tiny_reduced.npz"


@functools.lru_cache(maxsize=None)
def _fixture_model():
    arrays, meta = load_fixture(FIXTURE)
    model, variables = convert.from_timm("mvitv2_tiny", state_dict_of(arrays), **meta["cfg"],
                                         img_size=meta["img_size"])
    return model, variables, arrays, meta


@functools.lru_cache(maxsize=None)
def _fixture_outputs():
    """Logits and features of the fixture model at 224x224 from one compiled call."""
    model, variables, arrays, _ = _fixture_model()
    both = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method="features")))
    return both(variables, arrays["input/0"])


@functools.lru_cache(maxsize=None)
def _jitted(model, method=None):
    return jax.jit(functools.partial(model.apply, method=method))


def _random_variables(model, shape, seed=0):
    """Random float32 variables of the model's shapes without compiling its init."""
    template = abstract_variables(model, jnp.zeros(shape))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(0.0, 0.2, x.shape).astype(np.float32)), template)


def _num_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# ----- parity with timm -----

def test_parity_with_timm_fixture_at_224():
    _, _, arrays, _ = _fixture_model()
    logits, _ = _fixture_outputs()
    err, allowed = parity_error(logits, arrays["output/0"])
    print(f"mvitv2_tiny_reduced 224x224: max|ours-ref| = {err:.3g} (allowed {allowed:.3g})")
    assert_parity(logits, arrays["output/0"], "mvitv2_tiny_reduced logits at 224x224")


def test_features_are_nhwc_stage_maps_and_pre_logits():
    _, variables, arrays, _ = _fixture_model()
    _, feats = _fixture_outputs()
    assert set(feats) == {"stage1", "stage2", "stage3", "stage4", "pre_logits"}
    assert [feats[f"stage{i}"].shape for i in range(1, 5)] == [
        (1, 56, 56, 24), (1, 28, 28, 48), (1, 14, 14, 96), (1, 7, 7, 192)]
    assert feats["pre_logits"].shape == (1, 192)
    head = variables["params"]["head"]
    np.testing.assert_allclose(feats["pre_logits"] @ head["kernel"] + head["bias"],
                               arrays["output/0"], atol=1e-4)


def test_official_flat_block_names_import_to_the_same_model():
    """MViTv2 official names (blocks.N, blocks.N.proj, head.projection) map to timm's layout."""
    model, variables, arrays, meta = _fixture_model()
    timm_state = state_dict_of(arrays)
    starts = np.cumsum([0] + list(meta["cfg"]["depths"]))
    official = {}
    for key, value in timm_state.items():
        if key.startswith("stages."):
            _, stage, _, block, rest = key.split(".", 4)
            rest = rest.replace("shortcut_proj_attn.", "proj.")
            key = f"blocks.{starts[int(stage)] + int(block)}.{rest}"
        official["model_state." + key.replace("head.fc.", "head.projection.")] = value
    model2, variables2 = convert.from_timm("mvitv2_tiny", official, **meta["cfg"], img_size=224)
    assert model2 == model
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables2, variables)


# ----- any input size -----

def test_rel_pos_interpolation_is_the_identity_at_224_and_real_elsewhere(monkeypatch):
    """At the size the tables were built for every per-forward resize is exactly the identity;
    at 256 the tables really are resized (to 2 * max(q, k) - 1 rows)."""
    model, variables, arrays, _ = _fixture_model()
    reference = np.asarray(_fixture_outputs()[0])
    calls = []

    def always_interpolate(table, length):
        calls.append((table.shape[0], length))
        matrix = flex.resize_matrix_1d(table.shape[0], length, "torch_bilinear")
        return jnp.einsum("nl,lc->nc", matrix, table, precision=jax.lax.Precision.HIGHEST)

    monkeypatch.setattr(attention, "resize_rel_pos_table", always_interpolate)
    forced = np.asarray(jax.jit(model.apply)(variables, arrays["input/0"]))  # traces anew
    np.testing.assert_array_equal(forced, reference)  # bit-identical with the matmul applied
    assert calls and all(old == new for old, new in calls), calls
    for old, _ in set(calls):
        assert np.array_equal(flex.resize_matrix_1d(old, old, "torch_bilinear"), np.eye(old))

    calls.clear()
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 256, 256, 3)))
    assert (111, 127) in calls and any(old != new for old, new in calls), calls


@pytest.mark.parametrize("height,width", [(256, 256), (192, 320), (320, 192)])
def test_runs_at_other_sizes_with_finite_outputs(height, width):
    model, variables, arrays, _ = _fixture_model()
    images = jax.image.resize(arrays["input/0"], (1, height, width, 3), "linear")
    feats = _jitted(model, "features")(variables, images)
    grid = (-(-height // 4), -(-width // 4))
    for i in range(4):
        scale = 2 ** i
        assert feats[f"stage{i + 1}"].shape[1:3] == (-(-grid[0] // scale), -(-grid[1] // scale))
    head = variables["params"]["head"]
    logits = feats["pre_logits"] @ head["kernel"] + head["bias"]
    assert logits.shape == (1, 10) and np.all(np.isfinite(logits))


def test_linear_resize_matrix_matches_half_pixel_linear_interpolation():
    np.testing.assert_array_equal(flex.resize_matrix_1d(2, 4, "torch_bilinear"), np.array(
        [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], np.float32))
    rng = np.random.default_rng(0)
    for old, new in [(111, 127), (55, 63), (27, 13), (7, 9)]:
        table = rng.normal(size=(old, 4)).astype(np.float32)
        ours = flex.resize_matrix_1d(old, new, "torch_bilinear") @ table
        ref = jax.image.resize(table, (new, 4), "linear", antialias=False)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)  # jax: float32 weights
        matrix = flex.resize_matrix_1d(old, new, "torch_bilinear")
        assert matrix is flex.resize_matrix_1d(old, new, "torch_bilinear")


def test_decomposed_rel_pos_index():
    index = attention.decomposed_rel_pos_index(3, 3)  # equal grids: i - j + (k - 1)
    np.testing.assert_array_equal(index, np.arange(3)[:, None] - np.arange(3)[None, :] + 2)
    for q_len, k_len in [(56, 14), (14, 28), (64, 16), (13, 7), (10, 3)]:
        index = attention.decomposed_rel_pos_index(q_len, k_len)
        assert index.shape == (q_len, k_len)
        assert index.min() >= 0 and index.max() <= 2 * max(q_len, k_len) - 2
    # the coarser grid is stretched to the finer one's spacing (ratio 4 here)
    index = attention.decomposed_rel_pos_index(8, 2)
    np.testing.assert_array_equal(index[:, 1] - index[:, 0], np.full(8, -4))


def test_decomposed_rel_pos_bias_on_non_square_grids_matches_a_direct_sum():
    """bias[b, n, (i, j), (k, l)] = q[b, (i, j), n] . (R_h[i, k] + R_w[j, l]) (MViTv2 sec. 3.1),
    with different tables and grids along h and w so that a swapped axis cannot pass."""
    rng = np.random.default_rng(0)
    (q_h, q_w), (k_h, k_w), heads, dim = (3, 5), (2, 3), 2, 4
    q = rng.normal(size=(1, q_h * q_w, heads, dim)).astype(np.float32)
    table_h = rng.normal(size=(9, dim)).astype(np.float32)  # 9 rows, resized to 5
    table_w = rng.normal(size=(9, dim)).astype(np.float32)  # 9 rows, kept
    bias = np.asarray(attention.decomposed_rel_pos_bias(q, table_h, table_w, (q_h, q_w),
                                                        (k_h, k_w)))
    resized_h = flex.resize_matrix_1d(9, 5, "torch_bilinear") @ table_h
    expected = np.zeros((1, heads, q_h, q_w, k_h, k_w), np.float32)
    for n in range(heads):
        for i in range(q_h):
            for j in range(q_w):
                for k in range(k_h):
                    for l in range(k_w):
                        r_h = resized_h[int(i * 1.0 - k * 1.5 + (k_h - 1) * 1.5)]
                        r_w = table_w[int(j * 1.0 - l * (5 / 3) + (k_w - 1) * (5 / 3))]
                        expected[0, n, i, j, k, l] = q[0, i * q_w + j, n] @ (r_h + r_w)
    np.testing.assert_allclose(bias, expected.reshape(1, heads, q_h * q_w, k_h * k_w),
                               rtol=1e-5, atol=1e-5)


# ----- configurations -----

def test_mvitv2_param_counts_match_timm():
    counts = json.loads((FIXTURES / "param_counts.json").read_text())["counts"]
    for name in ("mvitv2_tiny", "mvitv2_small", "mvitv2_base"):
        model = flexvision.create_model(name)
        variables = abstract_variables(model, jnp.zeros((1, 224, 224, 3)))
        assert _num_params(variables["params"]) == counts[name], name
    assert set(flexvision.list_models(family="mvit")) >= {
        "mvitv2_tiny", "mvitv2_small", "mvitv2_base", "mvitv2_large", "mvit_base_16"}


# SlowFast configs/ImageNet/MVIT_B_16_CONV.yaml, with the defaults.py values it relies on.
SLOWFAST_MVIT_B_16_CONV = dict(
    EMBED_DIM=96, NUM_HEADS=1, MLP_RATIO=4.0, DEPTH=16, QKV_BIAS=True,
    DIM_MUL=[[1, 2.0], [3, 2.0], [14, 2.0]], HEAD_MUL=[[1, 2.0], [3, 2.0], [14, 2.0]],
    POOL_KVQ_KERNEL=[1, 3, 3], POOL_KV_STRIDE_ADAPTIVE=[1, 4, 4],
    POOL_Q_STRIDE=[[1, 1, 2, 2], [3, 1, 2, 2], [14, 1, 2, 2]],
    PATCH_KERNEL=[7, 7], PATCH_STRIDE=[4, 4], CROP_SIZE=224, IN_CHANS=3, NUM_CLASSES=1000,
    CLS_EMBED_ON=True, USE_ABS_POS=True, SEP_POS_EMBED=False, DIM_MUL_IN_ATT=False,
    REL_POS_SPATIAL=False,
)


def _slowfast_round_width(width, multiplier, divisor=1):
    """slowfast/models/utils.py round_width."""
    width *= multiplier
    width_out = max(divisor, int(width + divisor / 2) // divisor * divisor)
    return int(width_out + divisor if width_out < 0.9 * width else width_out)


def _slowfast_blocks(cfg):
    """Per block (dim, dim_out, heads, stride_q, stride_kv) the way SlowFast's MViT.__init__
    derives them from the per-block multiplier lists (video_model_builder.py; DIM_MUL_IN_ATT off)
    """
    depth = cfg["DEPTH"]
    dim_mul, head_mul = np.ones(depth + 1), np.ones(depth + 1)
    for i, m in cfg["DIM_MUL"]:
        dim_mul[i] = m
    for i, m in cfg["HEAD_MUL"]:
        head_mul[i] = m
    stride_q = [[] for _ in range(depth)]
    for entry in cfg["POOL_Q_STRIDE"]:
        stride_q[entry[0]] = entry[1:]
    stride_kv, current = [], cfg["POOL_KV_STRIDE_ADAPTIVE"]
    for i in range(depth):
        if stride_q[i]:
            current = [max(c // s, 1) for c, s in zip(current, stride_q[i])]
        stride_kv.append(current)
    blocks, dim, heads = [], cfg["EMBED_DIM"], cfg["NUM_HEADS"]
    for i in range(depth):
        heads = _slowfast_round_width(heads, head_mul[i])
        dim_out = _slowfast_round_width(dim, dim_mul[i + 1],
                                        divisor=_slowfast_round_width(heads, head_mul[i + 1]))
        blocks.append((dim, dim_out, heads, tuple(stride_q[i][1:]) or (1, 1),
                       tuple(stride_kv[i][1:])))
        dim = dim_out
    return blocks


def _slowfast_param_count(cfg):
    """Parameters of SlowFast's MViT built from ``cfg``, counted module by module."""
    dim0, kernel = cfg["EMBED_DIM"], int(np.prod(cfg["POOL_KVQ_KERNEL"]))
    grid = cfg["CROP_SIZE"] // cfg["PATCH_STRIDE"][0]
    count = cfg["IN_CHANS"] * dim0 * int(np.prod(cfg["PATCH_KERNEL"])) + dim0  # patch_embed
    count += dim0  # cls_token
    count += (grid * grid + 1) * dim0  # pos_embed (joint, with the class position)
    for dim, dim_out, heads, stride_q, _ in _slowfast_blocks(cfg):
        head_dim = dim // heads
        hidden = int(dim * cfg["MLP_RATIO"])
        count += 2 * dim  # norm1
        count += dim * 3 * dim + 3 * dim + dim * dim + dim  # attn.qkv, attn.proj
        pools = 2 + (stride_q != (1, 1))  # pool_k, pool_v always (kernel 3x3), pool_q if strided
        count += pools * (head_dim * kernel + 2 * head_dim)  # depthwise conv + its LayerNorm
        count += 2 * dim  # norm2
        count += dim * hidden + hidden + hidden * dim_out + dim_out  # mlp.fc1, mlp.fc2
        if dim != dim_out:
            count += dim * dim_out + dim_out  # proj (shortcut)
    last = dim_out
    count += 2 * last + last * cfg["NUM_CLASSES"] + cfg["NUM_CLASSES"]  # norm, head.projection
    return count


def test_mvit_v1_b16_matches_slowfast_config_and_param_count():
    expected = _slowfast_param_count(SLOWFAST_MVIT_B_16_CONV)
    assert expected == 36_982_600  # 37.0M: MViT-B-16 in Fan et al. 2021's ImageNet results
    model = flexvision.create_model("mvit_base_16")
    variables = abstract_variables(model, jnp.zeros((1, 224, 224, 3)))
    params = variables["params"]
    assert _num_params(params) == expected
    assert params["pos_embed"].shape == (1, 56 * 56 + 1, 96)
    assert params["cls_token"].shape == (1, 1, 96)

    blocks = [(f"stages_{s}_blocks_{i}", stride_kv)
              for s, (depth, stride_kv) in enumerate(zip(model.depths,
                                                        model.stage_config()["stride_kv"]))
              for i in range(depth)]
    reference = _slowfast_blocks(SLOWFAST_MVIT_B_16_CONV)
    assert len(blocks) == len(reference)
    for (name, stride_kv), (dim, dim_out, heads, stride_q, ref_kv) in zip(blocks, reference):
        block = params[name]
        assert block["attn"]["qkv"]["kernel"].shape == (dim, 3 * dim), name
        assert block["mlp"]["fc2"]["kernel"].shape[1] == dim_out, name
        assert block["attn"]["pool_k"]["kernel"].shape == (3, 3, 1, dim // heads), name
        assert ("pool_q" in block["attn"]) == (stride_q != (1, 1)), name
        assert ("shortcut_proj_mlp" in block) == (dim != dim_out), name
        assert "rel_pos_h" not in block["attn"] and "shortcut_proj_attn" not in block
        assert tuple(stride_kv) == ref_kv, name


V1_SMALL = dict(depths=(1, 1, 1, 1), embed_dim=8, num_heads=1, num_classes=5, img_size=64)


def test_mvit_v1_any_size_and_pos_embed_resampling():
    model = flexvision.create_model("mvit_base_16", **V1_SMALL)
    variables = _random_variables(model, (1, 64, 64, 3))
    pos = variables["params"]["pos_embed"]
    assert mvit.resample_abs_pos_embed(pos, (16, 16), (16, 16), 1) is pos  # identity at img_size
    resampled = mvit.resample_abs_pos_embed(pos, (16, 16), (12, 20), 1)
    np.testing.assert_array_equal(resampled[:, 0], pos[:, 0])  # class position untouched
    ref = jax.image.resize(pos[0, 1:].reshape(16, 16, -1), (12, 20, pos.shape[-1]), "linear",
                           antialias=False)
    np.testing.assert_allclose(resampled[0, 1:].reshape(12, 20, -1), ref, atol=1e-6)
    for size in [(48, 80)]:
        feats = _jitted(model, "features")(variables, jnp.ones((2, *size, 3)))
        assert feats["stage4"].shape == (2, -(-size[0] // 32), -(-size[1] // 32), 64)
        assert np.all(np.isfinite(feats["pre_logits"]))


def test_mvit_v1_imports_slowfast_names():
    model = flexvision.create_model("mvit_base_16", **V1_SMALL)
    variables = _random_variables(model, (1, 64, 64, 3), seed=1)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    starts = np.cumsum([0] + list(model.depths))
    state = {}
    for path, value in flat.items():
        value = np.asarray(value)
        parts = path.split("/")
        leaf = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
        if parts[0].startswith("stages_"):
            _, stage, _, block = parts[0].split("_")
            parts[0] = f"blocks.{starts[int(stage)] + int(block)}"
            parts = [("proj" if p == "shortcut_proj_mlp" else p) for p in parts]
        parts = [{"patch_embed": "patch_embed.proj", "head": "head.projection"}.get(p, p)
                 for p in parts]
        if parts[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        state[".".join(parts[:-1] + [leaf]) if len(parts) > 1 else leaf] = value
    assert "blocks.0.proj.weight" in state and "head.projection.weight" in state
    assert "blocks.1.attn.pool_q.weight" in state and "blocks.0.attn.pool_q.weight" not in state
    imported, imported_vars = convert.from_timm(
        "mvit_base_16", state, depths=(1, 1, 1, 1), embed_dim=8, num_heads=1, img_size=64)
    assert imported == model
    images = jax.random.normal(jax.random.PRNGKey(2), (1, 64, 64, 3))
    np.testing.assert_array_equal(_jitted(model)(imported_vars, images),
                                  _jitted(model)(variables, images))


# ----- variants beyond the tiny one of the contract test (tests/test_contract.py) -----

def test_every_parameter_of_cls_v1_and_mlp_expanding_variants_has_logical_axis_names():
    for name in ("mvitv2_base_cls", "mvitv2_large", "mvit_base_16"):
        model = flexvision.create_model(name, depths=(1, 2, 1, 1))
        boxed = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 224, 224, 3))))
        leaves = jax.tree_util.tree_leaves(
            boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), f"{name}: unnamed parameter {leaf}"
            assert len(leaf.names) == leaf.value.ndim


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_parameter_free_pooling_modes(mode):
    """timm's mode='max'/'avg': pooling without conv weights or norms; shapes as with 'conv'."""
    model = flexvision.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), embed_dim=8, mode=mode)
    block = abstract_variables(model, jnp.zeros((1, 64, 64, 3)))["params"]["stages_1_blocks_0"]
    assert set(block["attn"]) == {"qkv", "proj", "rel_pos_h", "rel_pos_w"}
    feats = jax.eval_shape(functools.partial(model.apply, method="features"),
                           _random_variables(model, (1, 64, 64, 3)), jnp.zeros((1, 72, 40, 3)))
    assert feats["stage4"].shape == (1, 3, 2, 64)


def test_bad_inputs_raise_clear_errors():
    model = flexvision.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), embed_dim=8)
    with pytest.raises(ValueError, match=r"mode='conv_unshared'.*accepted modes"):
        model.clone(mode="conv_unshared").init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match=r"unknown option.*'depth'.*accepted"):
        convert.from_timm("mvitv2_tiny", {}, depth=3)
    arrays, meta = load_fixture(FIXTURE)
    table_mismatch = r"(?s)does not fit the model.*rel_pos_h.*\(111, 24\).*img_size=256 here"
    with pytest.raises(ValueError, match=table_mismatch):
        convert.from_timm("mvitv2_tiny", state_dict_of(arrays), **meta["cfg"], img_size=256)
