"""The model contract (flexvision/models/contract.py, docs/models.md), checked on every
registered family through its tiny variant: init, forward at a square and a non-square size,
features equal to feature_info, logical axis names on every parameter, bf16 compute, a jitted
train step with finite gradients, in_chans=4, batch 0, num_classes, and clear errors on bad
input.

Families are read from the registry, so a new family is tested without touching this file, and
a family without a tiny variant fails here by name.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexvision import registry
from flexvision.models.contract import Backbone, FeatureInfo

NUM_CLASSES = 5
SQUARE, WIDE = (32, 32), (32, 64)  # multiples of every tiny variant's largest stride
BATCH = 2


def _images(size, batch=BATCH, channels=3, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, *size, channels), jnp.float32)


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves XLA's CPU compile time


def _maps_and_logits(module, images, train=False):
    return module.features(images, train=train), module(images, train=train)


def _fields(model) -> set[str]:
    return {f for f in model.__dataclass_fields__ if f not in ("parent", "name")}


@functools.lru_cache(maxsize=None)
def _run(family: str) -> dict:
    """What the tests below look at, for the family's tiny variant. One compiled call (XLA's
    compile dominates the time) runs init, the float32 logits at SQUARE, and a train step at
    WIDE in bfloat16 compute (train=True, dropout and drop path on, BatchNorm statistics
    mutable) with its gradients; the features and logits at both sizes, float32 and bfloat16,
    are traced for their shapes and dtypes (jax.eval_shape)."""
    model = registry.create_model(registry.tiny_variant(family), num_classes=NUM_CLASSES)
    bf16 = model.clone(dtype=jnp.bfloat16)
    noisy = bf16.clone(drop_rate=0.1, **({"drop_path_rate": 0.1}
                                         if "drop_path_rate" in _fields(model) else {}))
    labels = jnp.arange(BATCH) % NUM_CLASSES

    def everything(square, wide, key):
        variables = model.init(jax.random.PRNGKey(1), square)
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}  # e.g. BatchNorm stats

        def loss_fn(params):
            logits, updates = noisy.apply({"params": params, **state}, wide, train=True,
                                          rngs={"dropout": key}, mutable=list(state))
            one_hot = jax.nn.one_hot(labels, NUM_CLASSES)
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
            return -jnp.mean(jnp.sum(one_hot * log_probs, -1)), (logits, updates)

        (loss, (train_logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params)
        return dict(variables=variables, logits=model.apply(variables, square),
                    loss=loss, train_logits=train_logits, updates=updates, grads=grads)

    args = (_images(SQUARE), _images(WIDE, seed=1), jax.random.PRNGKey(2))
    compiled = jax.jit(everything).lower(*args).compile(compiler_options=FAST_COMPILE)
    out = compiled(*args)
    shapes = jax.eval_shape(lambda v, square, wide: (
        model.apply(v, square, method=_maps_and_logits),
        model.apply(v, wide, method=_maps_and_logits),
        bf16.apply(v, square, method=_maps_and_logits)), out["variables"], *args[:2])
    return dict(out, model=model, bf16_model=bf16, square=shapes[0], wide=shapes[1],
                bf16=shapes[2])


FAMILIES = registry.families()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_has_a_tiny_variant_implementing_the_contract(family):
    model = registry.create_model(registry.tiny_variant(family))
    assert isinstance(model, Backbone), f"{family}: {type(model).__name__} is not a Backbone"
    info = model.feature_info()  # from the configuration alone: the module is not bound
    assert info and all(isinstance(i, FeatureInfo) for i in info)
    assert len({i.name for i in info}) == len(info)
    height, width, chans = model.input_shape()
    assert min(height, width) >= 1 and chans == model.in_chans == 3


def _check_maps(model, maps, size, batch=BATCH, dtype=jnp.float32):
    info = model.feature_info()
    assert list(maps) == [i.name for i in info] + ["pre_logits"]
    for item in info:
        expected = (batch, size[0] // item.stride[0], size[1] // item.stride[1], item.channels)
        assert maps[item.name].shape == expected, (item, maps[item.name].shape)
        assert maps[item.name].dtype == dtype, item.name
    assert maps["pre_logits"].shape[0] == batch


@pytest.mark.parametrize("family", FAMILIES)
def test_init_forward_and_features_at_two_sizes(family):
    run = _run(family)
    assert run["logits"].shape == (BATCH, NUM_CLASSES) and np.isfinite(run["logits"]).all()
    for size in ("square", "wide"):  # shapes and dtypes
        maps, logits = run[size]
        assert logits.shape == (BATCH, NUM_CLASSES)
        _check_maps(run["model"], maps, SQUARE if size == "square" else WIDE)
    assert run["train_logits"].shape == (BATCH, NUM_CLASSES)  # computed at WIDE
    assert np.isfinite(np.asarray(run["train_logits"], np.float32)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_has_logical_axis_names(family):
    variables = _run(family)["variables"]
    leaves = jax.tree_util.tree_leaves(variables["params"],
                                       is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unnamed = [leaf.shape for leaf in leaves if not isinstance(leaf, nn.Partitioned)]
    assert leaves and not unnamed, f"{family}: parameters without logical axis names: {unnamed}"
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and leaf.value.dtype == jnp.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_keeps_float32_params_and_trains(family):
    run = _run(family)
    _check_maps(run["bf16_model"], run["bf16"][0], SQUARE, dtype=jnp.bfloat16)
    assert run["train_logits"].dtype in (jnp.bfloat16, jnp.float32)
    grads = jax.tree_util.tree_leaves(nn.meta.unbox(run["grads"]))
    assert all(g.dtype == jnp.float32 for g in grads)  # params stay float32


@pytest.mark.parametrize("family", FAMILIES)
def test_jitted_train_step_has_finite_gradients(family):
    run = _run(family)
    assert np.isfinite(run["loss"])
    grads = [np.asarray(g) for g in jax.tree_util.tree_leaves(nn.meta.unbox(run["grads"]))]
    assert all(np.isfinite(g).all() for g in grads)
    assert sum(float(np.abs(g).sum()) for g in grads) > 0
    state_keys = sorted(k for k in run["variables"] if k != "params")
    assert sorted(run["updates"]) == state_keys


def _shape_of_logits(model, images):
    """Logits shape of a fresh model on ``images`` without compiling (jax.eval_shape)."""
    def run(images):
        variables = model.init(jax.random.PRNGKey(0), images)
        return model.apply(variables, images)
    return jax.eval_shape(run, images)


@pytest.mark.parametrize("family", FAMILIES)
def test_in_chans_4_and_batch_of_0(family):
    name = registry.tiny_variant(family)
    model = registry.create_model(name, num_classes=NUM_CLASSES, in_chans=4)
    assert model.input_shape()[2] == 4
    four = jax.ShapeDtypeStruct((BATCH, *SQUARE, 4), jnp.float32)
    assert _shape_of_logits(model, four).shape == (BATCH, NUM_CLASSES)
    kernels = jax.tree_util.tree_leaves(nn.meta.unbox(jax.eval_shape(
        model.init, jax.random.PRNGKey(0), four)["params"]))
    assert any(k.ndim == 4 and k.shape[2] == 4 for k in kernels), "no conv kernel reads 4 channels"
    empty = jax.ShapeDtypeStruct((0, *SQUARE, 3), jnp.float32)
    three = registry.create_model(name, num_classes=NUM_CLASSES)
    assert _shape_of_logits(three, empty).shape == (0, NUM_CLASSES)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape,dtype,message", [
    ((*SQUARE, 3), jnp.float32, r"NHWC images.*got an array of shape \(32, 32, 3\).*images\[None\]"),
    ((1, 3, *SQUARE), jnp.float32, r"with 3 channels.*\(1, 3, 32, 32\).*NCHW.*transpose"),
    ((1, *SQUARE, 3), jnp.uint8, r"floating-point images.*uint8.*refused, not cast"),
    ((1, *SQUARE, 3), jnp.bool_, r"floating-point images.*bool"),
    ((1, 0, 32, 3), jnp.float32, r"at least \d+x\d+ pixels.*got 0x32"),
])
def test_bad_images_raise_a_clear_value_error(family, shape, dtype, message):
    model = registry.create_model(registry.tiny_variant(family), num_classes=NUM_CLASSES)
    images = jax.ShapeDtypeStruct(shape, dtype)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


@pytest.mark.parametrize("family", FAMILIES)
def test_num_classes(family):
    name = registry.tiny_variant(family)
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0.*got -3"):
        registry.create_model(name, num_classes=-3)
    headless = registry.create_model(name, num_classes=0)
    images = jax.ShapeDtypeStruct((BATCH, *SQUARE, 3), jnp.float32)

    def run(images):
        variables = headless.init(jax.random.PRNGKey(0), images)
        return headless.apply(variables, images, method=_maps_and_logits)

    maps, out = jax.eval_shape(run, images)
    assert out.shape == maps["pre_logits"].shape


def test_a_family_without_a_tiny_variant_fails_by_name_and_does_not_leak():
    class Headless(Backbone):
        num_classes: int = 0
        in_chans: int = 3

    with registry.scoped_registrations():
        registry.register_model("untested_big_model", Headless, family="untested_family")
        assert "untested_family" in registry.families()
        with pytest.raises(ValueError, match=r"family 'untested_family' has no tiny variant"):
            registry.tiny_variant("untested_family")
        with pytest.raises(ValueError, match=r"already has a tiny variant \('vit_micro'\)"):
            registry.register_model("second_tiny_vit", Headless, family="vit", tiny=True)
    assert "untested_family" not in registry.families()
    assert "untested_big_model" not in registry.list_models()
    with pytest.raises(ValueError, match=r"unknown model family 'resnet'"):
        registry.tiny_variant("resnet")
