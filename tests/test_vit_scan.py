"""ViT depth options (issue 19): ``remat`` and ``scan_layers`` compute what the unrolled model
computes, from the same parameters (``stack_blocks`` converts the layout); and the exact-GELU
form the ViT family uses equals jax.nn's erfc form."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexvision
from flexvision.engine.sharding import unbox
from flexvision.layers.mlp import gelu_exact
from flexvision.models.vit import stack_blocks, unstack_blocks


SMALL = dict(num_classes=5, depth=2, embed_dim=48, num_heads=2)


def _create(**options):
    return flexvision.create_model("vit_micro", **SMALL, **options)


@pytest.fixture(scope="module")
def micro():
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    model = _create()
    params = unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images))["params"]
    return model, params, images, _outputs(model, params, images)


def _outputs(model, params, images):
    """Logits, features and the gradient of a train-mode loss, in one jitted call."""

    def loss(p):
        return jnp.sum(model.apply({"params": p}, images, train=True) ** 2)

    return jax.jit(lambda p: (model.apply({"params": p}, images),
                              model.apply({"params": p}, images, method=model.features),
                              jax.grad(loss)(p)))(params)


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b)))


@pytest.mark.parametrize("options", [{"remat": True}, {"scan_layers": True},
                                     {"scan_layers": True, "remat": True}])
def test_depth_options_match_the_unrolled_model(micro, options):
    model, params, images, (logits, features, reference) = micro
    variant = _create(**options)
    scanned = options.get("scan_layers", False)
    converted = stack_blocks(params, model.depth) if scanned else params
    fresh = unbox(jax.eval_shape(variant.init, jax.random.PRNGKey(0), images))["params"]
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, converted)

    got_logits, got_features, grads = _outputs(variant, converted, images)
    assert _max_diff(got_logits, logits) <= 1e-5
    assert list(got_features) == list(features) and _max_diff(got_features, features) <= 1e-5
    scale = max(1.0, max(float(jnp.abs(g).max()) for g in jax.tree.leaves(reference)))
    assert _max_diff(unstack_blocks(grads) if scanned else grads, reference) <= 1e-4 * scale


def test_stack_blocks_round_trip_and_layer_axis(micro):
    model, params, images, _ = micro
    stacked = stack_blocks(params, model.depth)
    assert "blocks_0" not in stacked and stacked["blocks"]["attn"]["qkv"]["kernel"].shape == (
        model.depth, *params["blocks_0"]["attn"]["qkv"]["kernel"].shape)
    assert _max_diff(unstack_blocks(stacked), params) == 0.0
    with pytest.raises(KeyError, match=f"blocks_{model.depth}"):
        stack_blocks(params, model.depth + 1)
    boxed = jax.eval_shape(_create(scan_layers=True).init, jax.random.PRNGKey(0),
                           images)["params"]["blocks"]["attn"]["qkv"]["kernel"]
    assert boxed.names == ("layers", "embed", "mlp")


def test_scan_layers_refuses_per_block_drop_path(micro):
    images = micro[2]
    model = _create(scan_layers=True, drop_path_rate=0.1)
    with pytest.raises(ValueError, match="drop_path_rate"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


def test_gelu_exact_is_the_erf_gelu():
    x = jnp.linspace(-10.0, 10.0, 20001, dtype=jnp.float32)
    assert float(jnp.abs(gelu_exact(x) - jax.nn.gelu(x, approximate=False)).max()) <= 2e-6
    exact = 0.5 * np.float64(x) * (1.0 + np.vectorize(math.erf)(np.float64(x) / np.sqrt(2.0)))
    assert float(np.abs(np.asarray(gelu_exact(x), np.float64) - exact).max()) <= 2e-6
