"""timm's pooling semantics for every pooling x prefix-token layout x pool_include_prefix.

timm's ViT pools the patch tokens only (class and register tokens dropped) unless
``pool_include_prefix=True``, for the reductions ('avg', 'max', 'avgmax') and attention pooling
('map') alike; 'token' reads the class token; 'prr' always attends over every token; '' keeps
every token. Each combination is imported with ``convert.from_timm`` from a random timm state
dict and compared with tests/timm_vit_reference.py, a NumPy transcription of timm's forward that
is itself checked against the real timm outputs of the parity fixtures.
"""

import itertools

import jax
import numpy as np
import pytest

from flexvision import convert
from tests import timm_vit_reference as reference
from tests.helpers import assert_parity, load_fixture, state_dict_of

# The reproduction: width 48, depth 2, 3 heads, patch 8; a non-square 32x48 image keeps
# the position grid (4x6) exact so that only the pooling and prefix layout are under test.
EMBED_DIM, DEPTH, HEADS, PATCH, IMAGE, CLASSES = 48, 2, 3, 8, (32, 48), 5
LAYOUTS = [dict(class_token=c, reg_tokens=r, no_embed_class=n)
           for c, r, n in itertools.product((True, False), (0, 4), (False, True))
           if c or r or n]  # no prefix and a prefix-free posemb is the same as (False, 0, False)
PREFIX_SENSITIVE = ("avg", "avgmax", "max", "map")


def _cases():
    for pool, layout, include in itertools.product(reference.POOLS, LAYOUTS, (False, True)):
        if pool == "token" and not layout["class_token"]:
            continue  # timm asserts class_token for 'token'
        if pool not in PREFIX_SENSITIVE and include:
            continue  # 'token', 'prr' and '' do not read pool_include_prefix
        layout_id = (f"cls{int(layout['class_token'])}-reg{layout['reg_tokens']}-"
                     f"{'noembed' if layout['no_embed_class'] else 'embedcls'}")
        yield pytest.param(pool, layout, include,
                           id=f"{pool or 'none'}-{layout_id}-include{int(include)}")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((2, *IMAGE, 3)).astype(np.float32)


@pytest.mark.parametrize("pool,layout,include", list(_cases()))
def test_timm_pooling_parity(images, pool, layout, include):
    grid = (IMAGE[0] // PATCH, IMAGE[1] // PATCH)
    state = reference.random_state_dict(
        np.random.default_rng(1), embed_dim=EMBED_DIM, depth=DEPTH, patch=PATCH, grid=grid,
        num_classes=CLASSES, global_pool=pool, **layout)
    kwargs = dict(embed_dim=EMBED_DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH,
                  img_size=IMAGE, num_classes=CLASSES, global_pool=pool,
                  pool_include_prefix=include, **layout)
    model, variables = convert.from_timm("vit_base_patch16_224", state, **kwargs)
    assert model.pool_include_prefix == include
    ours = model.apply(variables, images, method="features")["pre_logits"], \
        model.apply(variables, images)
    ref = reference.forward(state, images, num_heads=HEADS, global_pool=pool,
                            pool_include_prefix=include)
    assert_parity(ours[0], ref["pre_logits"], f"pre_logits {pool!r} {layout} include={include}")
    assert_parity(ours[1], ref["logits"], f"logits {pool!r} {layout} include={include}")


def test_prefix_changes_the_result_where_timm_says_it_does(images):
    """The flag matters (so the grid above can tell the two apart) exactly where there are
    prefix tokens and the pooling reads them."""
    grid = (IMAGE[0] // PATCH, IMAGE[1] // PATCH)
    layout = dict(class_token=False, reg_tokens=4, no_embed_class=True)  # vit_*_reg4_map layout
    state = reference.random_state_dict(
        np.random.default_rng(2), embed_dim=EMBED_DIM, depth=DEPTH, patch=PATCH, grid=grid,
        num_classes=CLASSES, global_pool="map", **layout)
    outputs = []
    for include in (False, True):
        model, variables = convert.from_timm(
            "vit_base_patch16_224", state, embed_dim=EMBED_DIM, depth=DEPTH, num_heads=HEADS,
            patch_size=PATCH, img_size=IMAGE, num_classes=CLASSES, global_pool="map",
            pool_include_prefix=include, **layout)
        outputs.append(np.asarray(model.apply(variables, images)))
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2 * np.abs(outputs[0]).max()


@pytest.mark.parametrize("relpath", ["timm/vit_patch16_dynamic.npz",
                                     "timm/flexivit_small_patch_sizes.npz"])
def test_reference_reproduces_timm_fixtures(relpath):
    """The NumPy reference against real timm outputs at the checkpoint's own grid (class token,
    posemb with and without its class entry)."""
    arrays, meta = load_fixture(relpath)
    state = state_dict_of(arrays)
    ref = reference.forward(state, arrays["input/0"], num_heads=meta["kwargs"]["num_heads"],
                            global_pool=meta["kwargs"].get("global_pool", "token"))
    assert_parity(ref["logits"], arrays["output/0"], f"NumPy timm reference on {relpath}")
    model, variables = convert.from_timm(meta["timm_name"], state, **meta["kwargs"])
    assert_parity(jax.jit(model.apply)(variables, arrays["input/0"]), ref["logits"],
                  f"flexvision vs NumPy reference on {relpath}")
