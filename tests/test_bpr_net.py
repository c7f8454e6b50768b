"""BPR refinement network: parity with tinyalpha/BPR's HRNetRefine + FCNHead, importer, sizes.

The network is built from ``meta["net"]["reduced_config"]`` and every ``net/input/<b>`` of the
fixture is checked (the same tests run on other files)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexvision
from flexvision import convert
from flexvision.convert import bpr as bpr_convert
from flexvision.layers import flex
from flexvision.models import hrnet
from helpers import assert_parity, load_fixture, state_dict_of

FIXTURE = "torchvision/bpr.npz"


def _inputs():
    arrays, _ = load_fixture(FIXTURE)
    indices = sorted(int(k.split("/")[2]) for k in arrays if k.startswith("net/input/"))
    assert indices, f"{FIXTURE} has no net/input/<b>"
    return indices


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(FIXTURE)


@pytest.fixture(scope="module")
def network(fixture):
    """The reduced network with the fixture's weights, and a cache of its outputs per input: one
    compiled program gives the branches, the 1/4-resolution logits (the same model without the
    final resize) and the input-size logits."""
    arrays, meta = fixture
    model, variables = convert.from_official(
        "bpr_hrnet18s", state_dict_of(arrays, "net/state/"), extra=meta["net"]["reduced_config"])
    quarter = model.clone(upsample_logits=False)
    run = jax.jit(lambda v, x: (quarter.apply(v, x, method="features"), quarter.apply(v, x),
                                model.apply(v, x)))
    cache = {}

    def outputs(index):
        if index not in cache:
            cache[index] = run(variables, arrays[f"net/input/{index}"])
        return cache[index]

    return model, variables, outputs


@pytest.mark.parametrize("index", _inputs())
def test_backbone_outputs(fixture, network, index):
    arrays, _ = fixture
    features = network[2](index)[0]
    # the branch maps, high to low resolution, in the order the features dict lists them
    branches = [v for k, v in features.items() if k not in ("stem", "pre_logits")]
    levels = sorted(int(k.split("/")[-1]) for k in arrays
                    if k.startswith(f"net/backbone_nhwc/{index}/"))
    assert levels and len(branches) == len(levels)
    for level in levels:
        assert_parity(branches[level], arrays[f"net/backbone_nhwc/{index}/{level}"],
                      f"input {index} branch {level}")


@pytest.mark.parametrize("index", _inputs())
def test_logits(fixture, network, index):
    arrays, _ = fixture
    _, seg_logits, logits = network[2](index)
    assert_parity(seg_logits, arrays[f"net/seg_logits_nhwc/{index}"], f"input {index} seg logits")
    assert_parity(logits, arrays[f"net/logits_nhwc/{index}"], f"input {index} logits")
    foreground = jax.nn.softmax(logits, axis=-1)[..., 1]
    reference = jax.nn.softmax(jnp.asarray(arrays[f"net/logits_nhwc/{index}"]), axis=-1)[..., 1]
    assert_parity(foreground, reference, f"input {index} foreground probability")


def test_reduced_config_and_parameter_count(fixture, network):
    arrays, meta = fixture
    model = network[0]
    expected = bpr_convert.stages_from_mmseg(meta["net"]["reduced_config"])
    assert model.stages == expected
    state = state_dict_of(arrays, "net/state/")
    assert bpr_convert.infer_stages(state) == expected
    params = jax.tree_util.tree_leaves(network[1]["params"])
    assert sum(p.size for p in params) == meta["net"]["reduced_num_params"]


def _param_count(model) -> int:
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                              jnp.zeros((1, 32, 32, model.in_chans))))
    leaves = jax.tree_util.tree_leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unnamed = [leaf for leaf in leaves
               if not isinstance(leaf, nn.Partitioned) or len(leaf.names) != leaf.value.ndim]
    assert not unnamed, f"{len(unnamed)} parameters without logical axis names"
    return sum(math.prod(leaf.value.shape) for leaf in leaves)


def test_full_size_models_are_registered_with_the_reference_parameter_counts(fixture):
    """Each full config of the meta is a registered bpr_* model with the reference count."""
    _, meta = fixture
    registered = {name: flexvision.create_model(name) for name in flexvision.list_models("bpr_*")}
    assert registered
    for config, extra in meta["net"]["full_configs"].items():
        stages = bpr_convert.stages_from_mmseg(extra)
        matches = [name for name, model in registered.items() if model.stages == stages]
        assert len(matches) == 1, f"{config}: no registered bpr_* model has its stages"
        assert _param_count(registered[matches[0]]) == meta["net"]["full_num_params"][config], config


def test_full_checkpoint_names_and_shapes_import(fixture):
    """A state dict with every name/shape of the real hrnet18s checkpoint imports (stages read
    off the names, none missing, none left over) into a model of the meta's full config."""
    _, meta = fixture
    shapes = meta["net"]["full_hrnet18s_state_shapes"]
    state = {name: np.zeros(shape, np.int64 if name.endswith("num_batches_tracked") else np.float32)
             for name, shape in shapes.items()}
    stages = bpr_convert.infer_stages(state)
    assert stages in [bpr_convert.stages_from_mmseg(c) for c in meta["net"]["full_configs"].values()]
    name = next(n for n in flexvision.list_models("bpr_*")
                if flexvision.create_model(n).stages == stages)
    model, variables = convert.from_official(name, state)
    assert model.in_chans == 4 and model.num_classes == shapes["decode_head.conv_seg.weight"][0]
    assert variables["params"]["backbone"]["conv1"]["kernel"].shape[2] == 4


def test_bilinear_fuse_is_upsample_then_resize():
    """Sizes that halve exactly: one bilinear resize; others: two interpolations, not one."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 3, 2))
    np.testing.assert_allclose(flex.upsample_then_resize_bilinear(x, 4, (16, 12)),
                               flex.resize_bilinear(x, (16, 12)), atol=1e-6)
    twice = flex.resize_bilinear(flex.resize_bilinear(x, (16, 12)), (13, 11))
    np.testing.assert_allclose(flex.upsample_then_resize_bilinear(x, 4, (13, 11)), twice,
                               atol=1e-6)
    assert np.abs(np.asarray(twice) - np.asarray(flex.resize_bilinear(x, (13, 11)))).max() > 1e-3


def test_bad_fuse_mode_and_bad_checkpoint():
    model = flexvision.create_model("bpr_hrnet18s", fuse_mode="bicubic")
    with pytest.raises(ValueError, match="fuse_mode"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="unexpected tensors"):
        bpr_convert.to_hrnet_names({"auxiliary_head.conv_seg.weight": np.zeros((2, 4, 1, 1))})
    with pytest.raises(ValueError, match="stage1"):
        bpr_convert.stages_from_mmseg({"stage2": {}})


def test_nearest_fuse_is_still_the_default():
    assert hrnet.HRNetSegmentation().fuse_mode == "nearest"
    assert flexvision.create_model("hrnet_w18_small_seg").fuse_mode == "nearest"
