"""HRNet: timm parity, any input size, the HRNetV2 segmentation head, BatchNorm training."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flexvision
from flexvision import convert
from flexvision.convert import common as convert_common
from flexvision.convert import hrnet as hrnet_convert
from flexvision.layers import common, flex
from flexvision.models import hrnet
from helpers import FIXTURES, assert_parity, load_fixture, state_dict_of

FIXTURE = "timm/hrnet_w18_small.npz"


@pytest.fixture(scope="module")
def fixture_arrays():
    return load_fixture(FIXTURE)


@pytest.fixture(scope="module")
def classifier(fixture_arrays):
    """hrnet_w18_small with the fixture's weights, and its jitted logits and features functions,
    reused for every input size (one compilation per shape)."""
    arrays, meta = fixture_arrays
    model, variables = convert.from_timm("hrnet_w18_small", state_dict_of(arrays), **meta["kwargs"])
    logits = jax.jit(lambda v, x: model.apply(v, x))
    features = jax.jit(lambda v, x: model.apply(v, x, method="features"))
    return model, variables, logits, features


@pytest.fixture(scope="module")
def segmenter(fixture_arrays):
    """hrnet_w18_small_seg whose backbone comes from the classification checkpoint."""
    arrays, _ = fixture_arrays
    model, variables = convert.from_timm("hrnet_w18_small_seg", state_dict_of(arrays),
                                         num_classes=5)
    features = jax.jit(lambda v, x: model.apply(v, x, method="features"))
    return model, variables, features


def _images(height, width, batch=1, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, height, width, 3), jnp.float32)


# --- parity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("index", [0, 1])
def test_parity_with_timm(classifier, fixture_arrays, index):
    arrays, _ = fixture_arrays
    _, variables, logits_fn, _ = classifier
    logits = logits_fn(variables, arrays[f"input/{index}"])
    assert_parity(logits, arrays[f"output/{index}"], f"hrnet_w18_small input/{index}")


# --- configurations -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hrnet_w18_small", "hrnet_w18_small_v2", "hrnet_w18",
                                  "hrnet_w32", "hrnet_w48"])
def test_param_counts_and_logical_axes(name):
    counts = json.loads((FIXTURES / "param_counts.json").read_text())["counts"]
    model = flexvision.create_model(name)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    leaves = jax.tree_util.tree_leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unnamed = [leaf for leaf in leaves
               if not isinstance(leaf, nn.Partitioned) or len(leaf.names) != leaf.value.ndim]
    assert not unnamed, f"{len(unnamed)} parameters without logical axis names"
    assert sum(math.prod(leaf.value.shape) for leaf in leaves) == counts[name]
    assert set(boxed["batch_stats"]) == {"backbone", "incre0", "incre1", "incre2", "incre3",
                                         "downsamp0", "downsamp1", "downsamp2", "final_layer"}


def test_registered_names():
    names = flexvision.list_models(family="hrnet")
    for width in ("18_small", "18_small_v2", "18", "30", "32", "40", "44", "48", "64"):
        assert f"hrnet_w{width}" in names and f"hrnet_w{width}_seg" in names
    assert {"hrnet_w18_ssld", "hrnet_w48_ssld"} <= set(names)


# --- any input size -----------------------------------------------------------------------------

def _expected_branch_sizes(height, width):
    """Stride-2 3x3 convs with padding 1 map n -> ceil(n / 2): branch k is at ceil(n / 2**(k+2))."""
    return [(-(-height // 2 ** (k + 2)), -(-width // 2 ** (k + 2))) for k in range(4)]


@pytest.mark.parametrize("size,batch", [((225, 225), 2), ((97, 131), 2), ((512, 1024), 1)])
def test_classifier_runs_at_any_size(classifier, size, batch):
    _, variables, _, features_fn = classifier
    features = features_fn(variables, _images(*size, batch=batch))
    branch_sizes = _expected_branch_sizes(*size)
    assert features["stem"].shape == (batch, *branch_sizes[0], 64)
    for k, (channels, hw) in enumerate(zip((16, 32, 64, 128), branch_sizes)):
        assert features[f"stage{k + 1}"].shape == (batch, *hw, channels)
    assert features["pre_logits"].shape == (batch, 2048)
    assert all(np.isfinite(np.asarray(f)).all() for f in features.values())
    # The logits are the linear classifier on pre_logits (checked against timm by the parity test).
    head = nn.unbox(variables["params"]["classifier"])
    logits = np.asarray(features["pre_logits"]) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    assert logits.shape == (batch, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("size,batch", [((97, 131), 2), ((512, 1024), 1)])
def test_segmentation_output_at_quarter_size(segmenter, classifier, size, batch):
    model, seg_variables, seg_features_fn = segmenter
    _, cls_variables, _, cls_features_fn = classifier
    images = _images(*size, batch=batch)
    features = seg_features_fn(seg_variables, images)
    quarter = (-(-size[0] // 4), -(-size[1] // 4))
    assert features["pre_logits"].shape == (batch, *quarter, 16 + 32 + 64 + 128)
    assert all(np.isfinite(np.asarray(f)).all() for f in features.values())
    if size == (97, 131):
        # The backbone is the classifier's, with its imported weights (same compiled shapes).
        cls_features = cls_features_fn(cls_variables, images)
        for key in ("stem", "stage1", "stage2", "stage3", "stage4"):
            np.testing.assert_array_equal(features[key], cls_features[key])
        # __call__ returns the head's logits at ceil(H/4) x ceil(W/4) (shapes only: no compute).
        logits = jax.eval_shape(lambda v, x: model.apply(v, x), seg_variables, images)
        assert logits.shape == (batch, *quarter, model.num_classes)
    else:
        head = nn.unbox(seg_variables["params"]["head"]["classifier"])
        logits = np.einsum("bhwc,ck->bhwk", np.asarray(features["pre_logits"]),
                           np.asarray(head["kernel"])[0, 0]) + np.asarray(head["bias"])
        assert logits.shape == (batch, *quarter, model.num_classes) and np.isfinite(logits).all()


def test_segmentation_checkpoint_round_trip(segmenter):
    """A HRNet-Semantic-Segmentation state dict (last_layer.{0,1,3} head) imports exactly."""
    _, variables, _ = segmenter
    params = nn.unbox(variables["params"])["head"]
    stats = variables["batch_stats"]["head"]
    head = {
        "last_layer.0.weight": np.transpose(params["last_layer"]["conv"]["kernel"], (3, 2, 0, 1)),
        "last_layer.0.bias": params["last_layer"]["conv"]["bias"],
        "last_layer.1.weight": params["last_layer"]["bn"]["scale"],
        "last_layer.1.bias": params["last_layer"]["bn"]["bias"],
        "last_layer.1.running_mean": stats["last_layer"]["bn"]["mean"] + 1.0,
        "last_layer.1.running_var": stats["last_layer"]["bn"]["var"],
        "last_layer.3.weight": np.transpose(params["classifier"]["kernel"], (3, 2, 0, 1)),
        "last_layer.3.bias": params["classifier"]["bias"],
    }
    arrays, _ = load_fixture(FIXTURE)
    backbone = {k: v for k, v in state_dict_of(arrays).items()
                if not k.startswith(("incre", "downsamp", "final_layer", "classifier"))}
    # As HRNet-Semantic-Segmentation saves it: its FullModel wrapper adds 'model.' and 'loss.'.
    checkpoint = {f"model.{k}": v for k, v in {**backbone, **head}.items()}
    checkpoint["loss.criterion.weight"] = np.ones(5, np.float32)
    _, imported = convert.from_timm("hrnet_w18_small_seg", checkpoint)
    np.testing.assert_array_equal(imported["batch_stats"]["head"]["last_layer"]["bn"]["mean"],
                                  stats["last_layer"]["bn"]["mean"] + 1.0)
    for a, b in zip(jax.tree_util.tree_leaves(imported["params"]),
                    jax.tree_util.tree_leaves(nn.unbox(variables["params"]))):
        np.testing.assert_array_equal(a, b)


def test_compute_dtype_bfloat16():
    """``dtype`` sets the compute dtype; params stay float32, logits come back as float32."""
    stages = hrnet.hrnet_stages(8, stage1_blocks=1, stage1_width=8, blocks=1)
    images = jnp.zeros((1, 45, 61, 3), jnp.float32)
    for model in (hrnet.HRNet(stages=stages, num_classes=3, dtype=jnp.bfloat16),
                  hrnet.HRNetSegmentation(stages=stages, num_classes=3, dtype=jnp.bfloat16)):
        variables = convert_common.abstract_variables(model, images)
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {np.dtype(np.float32)}
        logits = jax.eval_shape(lambda v: model.apply(v, images), variables)
        features = jax.eval_shape(lambda v: model.apply(v, images, method="features"), variables)
        assert logits.dtype == jnp.float32
        assert features["stage4"].dtype == features["pre_logits"].dtype == jnp.bfloat16
        assert features["stage4"].shape == (1, 2, 2, 64)


# --- resizing semantics ---------------------------------------------------------------------------

def test_nearest_resize_equals_scale_factor_upsampling_on_exact_multiples():
    x = np.arange(2 * 3 * 5 * 2, dtype=np.float32).reshape(2, 3, 5, 2)
    for factor in (2, 4, 8):
        expected = np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)
        np.testing.assert_array_equal(flex.resize_nearest(jnp.asarray(x), (3 * factor, 5 * factor)),
                                      expected)
    # Inexact sizes index floor(dst * in / out), PyTorch's F.interpolate(size=..., 'nearest').
    np.testing.assert_array_equal(flex.nearest_source_indices(4, 7), [0, 0, 1, 1, 2, 2, 3])


def test_bilinear_matrix_matches_align_corners_false():
    # 2x upsampling by hand: source = dst / 2 - 0.25, clamped at 0 and at the last pixel.
    expected = np.array([[1, 0, 0], [0.75, 0.25, 0], [0.25, 0.75, 0], [0, 0.75, 0.25],
                         [0, 0.25, 0.75], [0, 0, 1]], np.float32)
    np.testing.assert_allclose(flex.resize_matrix_1d(3, 6, "torch_bilinear"), expected, atol=1e-7)
    # For upsampling, half-pixel linear resize with edge renormalization is the same operator.
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 7, 4, 3))
    ours = flex.resize_bilinear(x, (57, 13))
    ref = jax.image.resize(x, (1, 57, 13, 3), method="linear", antialias=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# --- errors ---------------------------------------------------------------------------------------

def test_converter_rejects_unknown_names():
    with pytest.raises(ValueError, match="unexpected timm HRNet module 'head.fc'"):
        hrnet_convert.convert_state_dict({"head.fc.weight": np.zeros((2, 2), np.float32)})
    assert (hrnet_convert.timm_module_path("stage3.0.fuse_layers.2.0.1.1")
            == "backbone/stage3_0/fuse_2_0/step_1/bn")


# --- training -------------------------------------------------------------------------------------

def test_batch_norm_follows_pytorch_batchnorm2d():
    """Train mode: output (x - mean) / sqrt(var_biased + eps) * scale + bias and running
    averages moved with the UNBIASED variance (torch.nn.BatchNorm2d); eval mode: running stats."""
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (3, 4, 5, 6)).astype(np.float32)
    norm = common.BatchNorm(momentum=0.9, epsilon=1e-5)
    variables = norm.init(jax.random.key(0), x, use_running_average=False)
    params = {"scale": rng.normal(size=6).astype(np.float32),
              "bias": rng.normal(size=6).astype(np.float32)}
    stats = {"mean": rng.normal(size=6).astype(np.float32),
             "var": rng.uniform(0.5, 2.0, 6).astype(np.float32)}
    y, updates = norm.apply({"params": params, "batch_stats": stats}, x,
                            use_running_average=False, mutable=["batch_stats"])
    x64 = x.astype(np.float64)
    mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
    np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5) * params["scale"]
                               + params["bias"], rtol=1e-5, atol=1e-5)
    new = updates["batch_stats"]
    np.testing.assert_allclose(new["mean"], 0.9 * stats["mean"] + 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 * stats["var"] + 0.1 * var * 60 / 59, rtol=1e-6)
    y_eval = norm.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)
    np.testing.assert_allclose(y_eval, (x64 - stats["mean"]) / np.sqrt(stats["var"] + 1e-5)
                               * params["scale"] + params["bias"], rtol=1e-5, atol=1e-5)
    assert set(variables["batch_stats"]) == {"mean", "var"}
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(6))  # init untouched
    bf16 = common.BatchNorm(dtype=jnp.bfloat16).apply(variables, x, use_running_average=True)
    assert bf16.dtype == jnp.bfloat16


def test_train_step_updates_batch_stats():
    """One SGD step in train mode: BatchNorm normalizes with batch statistics and moves the
    running averages by PyTorch momentum 0.1 (Flax 0.9), the variance unbiased as in PyTorch;
    the params move too."""
    # Two stages keep the compilation of the gradient cheap; the code path is the full model's.
    stages = hrnet.hrnet_stages(8, stage1_blocks=1, stage1_width=8, blocks=1)[:2]
    model = hrnet.HRNet(stages=stages, num_classes=3, drop_rate=0.1)
    images, labels = _images(32, 48, batch=2, seed=3), jnp.array([0, 2])
    # Random weights from NumPy: model.init would compile one RNG kernel per parameter.
    shapes = convert_common.abstract_variables(model, images)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32), shapes["params"])
    stats = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape) if path[-1].key == "var"
                                    else rng.normal(0.0, 0.1, s.shape), jnp.float32),
        shapes["batch_stats"])
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, stats, opt_state, key):
        def loss_fn(p):
            logits, updates = model.apply({"params": p, "batch_stats": stats}, images, train=True,
                                          rngs={"dropout": key}, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    new_params, new_stats, _, loss = train_step(params, stats, opt_state, jax.random.PRNGKey(1))
    assert np.isfinite(loss)
    kernel = params["backbone"]["conv1"]["kernel"]
    stem = jax.lax.conv_general_dilated(images, kernel, (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    old = stats["backbone"]["bn1"]
    new = new_stats["backbone"]["bn1"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * stem.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    unbiased = np.var(np.asarray(stem, np.float64), axis=(0, 1, 2), ddof=1)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * unbiased, rtol=1e-4, atol=1e-5)
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                     stats, new_stats)
    assert all(jax.tree_util.tree_leaves(changed)), "every running average moves"
    assert np.any(new_params["classifier"]["kernel"] != params["classifier"]["kernel"])
