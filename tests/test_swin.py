"""Swin Transformer: parity with timm (pad-then-roll at padded sizes), windows, masks, any size."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIXTURES, assert_parity, load_fixture, parity_error, state_dict_of

import flexvision
from flexvision import convert
from flexvision.convert.common import abstract_variables
from flexvision.layers import attention, flex, windows
from flexvision.models import swin

FIXTURE = "timm/swin_tiny_window7_dynamic.npz"


def small_swin(**overrides):
    """A narrow Swin-T layout (two blocks per stage, so every stage has a shifted block)."""
    kwargs = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=5)
    return flexvision.create_model("swin_tiny_patch4_window7_224", **{**kwargs, **overrides})


def _features_and_logits(module, images):
    """``features``, then the head on its pre-logits: ``__call__``'s path in one executable."""
    feats = module.features(images)
    return feats, module.head(feats["pre_logits"])


class TracedSwin:
    """The fixture's model and weights behind one jitted function that counts its traces."""

    def __init__(self):
        self.arrays, self.meta = load_fixture(FIXTURE)
        self.model, self.variables = convert.from_timm(
            self.meta["timm_name"], state_dict_of(self.arrays), **self.meta["kwargs"])
        self.traced_shapes = []

        @jax.jit
        def run(variables, images):
            self.traced_shapes.append(images.shape)
            return self.model.apply(variables, images, method=_features_and_logits)

        self._run = run

    def __call__(self, images):
        return self._run(self.variables, images)


@pytest.fixture(scope="module")
def timm_swin():
    return TracedSwin()


def test_parity_with_timm_at_sizes_needing_no_padding(timm_swin):
    arrays = timm_swin.arrays
    for i in timm_swin.meta["plain_inputs"]:
        _, logits = timm_swin(arrays[f"input/{i}"])
        err, allowed = parity_error(logits, arrays[f"output/{i}"])
        print(f"swin plain input/{i} {arrays[f'input/{i}'].shape}: max err {err:.3g} "
              f"(allowed {allowed:.3g})")
        assert_parity(logits, arrays[f"output/{i}"], f"input/{i}")


def test_parity_with_pad_then_roll_reference_at_padded_sizes(timm_swin):
    arrays = timm_swin.arrays
    assert timm_swin.meta["padded_inputs"], "the fixture must hold at least one padded size"
    for i in timm_swin.meta["padded_inputs"]:
        _, logits = timm_swin(arrays[f"input/{i}"])
        err, allowed = parity_error(logits, arrays[f"output_pad_then_roll/{i}"])
        print(f"swin padded input/{i} {arrays[f'input/{i}'].shape}: max err {err:.3g} "
              f"(allowed {allowed:.3g})")
        assert_parity(logits, arrays[f"output_pad_then_roll/{i}"], f"input/{i} (pad, then roll)")
        # timm's roll-then-pad output differs: the fixture really tells the two orders apart.
        roll_err, _ = parity_error(logits, arrays[f"output/{i}"])
        assert roll_err > 10 * allowed


def test_call_returns_the_reference_logits(timm_swin):
    images = timm_swin.arrays["input/0"]
    logits = jax.jit(timm_swin.model.apply)(timm_swin.variables, images)
    assert_parity(logits, timm_swin.arrays["output/0"], "model.apply")


def test_features_are_stage_maps_and_pre_logits(timm_swin):
    feats, _ = timm_swin(timm_swin.arrays["input/0"])
    assert [feats[f"stage{i}"].shape for i in range(1, 5)] == [
        (1, 56, 56, 24), (1, 28, 28, 48), (1, 14, 14, 96), (1, 7, 7, 192)]
    assert feats["pre_logits"].shape == (1, 192)
    head = timm_swin.variables["params"]["head"]
    logits = feats["pre_logits"] @ head["kernel"] + head["bias"]
    assert_parity(logits, timm_swin.arrays["output/0"], "head(pre_logits)")


def test_parameter_counts_match_the_reference_models():
    counts = json.loads((FIXTURES / "param_counts.json").read_text())["counts"]
    names = flexvision.list_models(family="swin")
    checked = [n for n in names if n in counts]
    assert len(checked) >= 3, f"no swin entries of param_counts.json are registered: {names}"
    for name in checked:
        variables = abstract_variables(flexvision.create_model(name), jnp.zeros((1, 32, 32, 3)))
        total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables))
        assert total == counts[name], f"{name}: {total} parameters, reference {counts[name]}"


def _origin_of_padded_rolled_map(height, width, window, shift):
    """Source (row, col) of each position of the padded, rolled map; (-1, -1) for padding."""
    hp, wp = height + (-height % window[0]), width + (-width % window[1])
    rows = np.where(np.arange(hp) < height, np.arange(hp), -1)
    cols = np.where(np.arange(wp) < width, np.arange(wp), -1)
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), -1)
    return np.roll(grid, (-shift[0], -shift[1]), axis=(0, 1)), (hp, wp)


@pytest.mark.parametrize("height,width", [(12, 12), (10, 13), (14, 14), (16, 20)])
def test_mask_forbids_attention_across_the_wraparound_border(height, width):
    window, shift = (7, 7), (3, 3)
    origin, (hp, wp) = _origin_of_padded_rolled_map(height, width, window, shift)
    mask = windows.shifted_window_mask(hp, wp, window, shift)
    win_origin = origin.reshape(hp // 7, 7, wp // 7, 7, 2).transpose(0, 2, 1, 3, 4).reshape(
        -1, 49, 2)
    for w in range(mask.shape[0]):
        rows, cols = win_origin[w, :, 0], win_origin[w, :, 1]
        real = (rows >= 0) & (cols >= 0)
        # Tokens more than a window apart in the original map were brought together by the roll.
        far = ((np.abs(rows[:, None] - rows[None, :]) >= window[0])
               | (np.abs(cols[:, None] - cols[None, :]) >= window[1]))
        pairs = real[:, None] & real[None, :] & far
        assert np.all(mask[w][pairs] == windows.MASKED_LOGIT)
        # Tokens adjacent in the original map and in one window may attend to each other.
        near = real[:, None] & real[None, :] & ~far
        assert np.any(mask[w][near] == 0.0)
    assert mask is windows.shifted_window_mask(hp, wp, window, shift)  # cached constant
    assert not mask.flags.writeable


def test_no_token_sees_the_opposite_border_in_a_shifted_block():
    """Perturbing a top-row token leaves the bottom row unchanged after a shifted block at a size
    needing padding (12 x 12, window 7: timm's roll-then-pad mixes rows 0-1 with rows 10-11)."""
    block = swin.SwinBlock(num_heads=2, window_size=(7, 7), shift_size=(3, 3))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 12, 12, 8))
    variables = jax.jit(block.init)(jax.random.PRNGKey(1), x)
    apply = jax.jit(block.apply)
    base = apply(variables, x)
    # Not a constant vector: LayerNorm would remove that.
    kick = jax.random.normal(jax.random.PRNGKey(2), (8,)) * 3.0
    changed = apply(variables, x.at[0, 0, 5].add(kick)) - base
    assert float(jnp.max(jnp.abs(changed[0, 10:]))) == 0.0  # opposite border: untouched
    assert float(jnp.max(jnp.abs(changed[0, 1, 5]))) > 1e-3  # its own neighbour: reached


def test_window_and_shift_at_maps_smaller_than_the_window():
    # Design (timm's _calc_window_shift): stage 4 of a 224 model is 7 x 7 -> one window, no shift.
    assert swin.design_window_and_shift((7, 7), (7, 7), True) == ((7, 7), (0, 0))
    assert swin.design_window_and_shift((56, 56), (7, 7), True) == ((7, 7), (3, 3))
    assert swin.design_window_and_shift((56, 56), (7, 7), False) == ((7, 7), (0, 0))
    # Run time: an axis no longer than the window is one window of its length, not shifted.
    assert swin.window_and_shift(4, 5, (7, 7), (3, 3)) == ((4, 5), (0, 0))
    assert swin.window_and_shift(7, 30, (7, 7), (3, 3)) == ((7, 7), (0, 3))
    assert swin.window_and_shift(8, 10, (7, 7), (3, 3)) == ((7, 7), (3, 3))


def test_a_map_within_one_window_is_not_shifted():
    """Documented small-map rule: on a 4 x 5 map (window 7) a shifted block computes exactly what
    its unshifted twin computes (one 4 x 5 window, no padding); on a 12 x 12 map they differ."""
    shifted = swin.SwinBlock(num_heads=2, window_size=(7, 7), shift_size=(3, 3))
    plain = swin.SwinBlock(num_heads=2, window_size=(7, 7), shift_size=(0, 0))
    small = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 5, 8))
    variables = jax.jit(shifted.init)(jax.random.PRNGKey(1), small)
    run_shifted, run_plain = jax.jit(shifted.apply), jax.jit(plain.apply)
    np.testing.assert_array_equal(run_shifted(variables, small), run_plain(variables, small))
    large = jax.random.normal(jax.random.PRNGKey(2), (1, 12, 12, 8))
    assert not np.allclose(run_shifted(variables, large), run_plain(variables, large))


def test_smaller_window_reads_the_centre_of_the_bias_table():
    table = jax.random.normal(jax.random.PRNGKey(0), (13 * 13, 3))
    full = attention.relative_position_bias(table, (7, 7), (7, 7))  # (3, 49, 49)
    small = attention.relative_position_bias(table, (4, 5), (7, 7))  # (3, 20, 20)
    tokens = [r * 7 + c for r in range(4) for c in range(5)]  # top-left 4 x 5 of the 7 x 7 window
    np.testing.assert_array_equal(small, full[:, tokens][:, :, tokens])


def test_relative_position_index_is_the_official_table():
    index = attention.relative_position_index((2, 2))
    # Official: (dy + 1) * 3 + (dx + 1), query minus key, tokens row-major.
    expected = np.array([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    np.testing.assert_array_equal(index, expected)


def test_window_partition_order_and_inverse():
    x = jnp.arange(4 * 6, dtype=jnp.float32).reshape(1, 4, 6, 1)
    parts = windows.window_partition(x, (2, 3))
    assert parts.shape == (1, 4, 6, 1)
    np.testing.assert_array_equal(parts[0, 1, :, 0], [3, 4, 5, 9, 10, 11])  # row-major windows
    np.testing.assert_array_equal(windows.window_reverse(parts, (2, 3), 4, 6), x)


def test_patch_merging_order_and_odd_sizes():
    merge = swin.PatchMerging(out_dim=2)
    x = jnp.arange(3 * 3, dtype=jnp.float32).reshape(1, 3, 3, 1)
    variables = nn.unbox(merge.init(jax.random.PRNGKey(0), x))
    assert merge.apply(variables, x).shape == (1, 2, 2, 2)
    # x0..x3 = [0::2, 0::2], [1::2, 0::2], [0::2, 1::2], [1::2, 1::2]; odd sizes zero-padded.
    padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    concat = jnp.concatenate([padded[:, 0::2, 0::2], padded[:, 1::2, 0::2], padded[:, 0::2, 1::2],
                              padded[:, 1::2, 1::2]], -1)
    np.testing.assert_array_equal(concat[0, 0, 0], [0, 3, 1, 4])
    ln = nn.LayerNorm(epsilon=swin.LAYER_NORM_EPS)
    expected = ln.apply({"params": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}, concat) @ \
        variables["params"]["reduction"]["kernel"]
    np.testing.assert_allclose(merge.apply(variables, x), expected, rtol=1e-6, atol=1e-6)


def test_any_size_runs_and_jit_compiles_each_shape_once(timm_swin):
    """224, 256 x 320, 97 x 131 and 1024 x 1024 on the fixture's reduced-width (24) model."""
    sizes = [(1, 224, 224), (1, 256, 320), (2, 97, 131), (1, 1024, 1024)]
    for _ in range(2):
        for batch, height, width in sizes:
            images = jax.random.normal(jax.random.PRNGKey(height), (batch, height, width, 3))
            feats, logits = timm_swin(images)
            grid = (-(-height // 4), -(-width // 4))
            for s in range(4):
                assert feats[f"stage{s + 1}"].shape[:3] == (batch,) + grid, (height, width, s)
                grid = (-(-grid[0] // 2), -(-grid[1] // 2))
            assert logits.shape == (batch, 10) and np.all(np.isfinite(np.asarray(logits)))
    shapes = [(b, h, w, 3) for b, h, w in sizes]
    traced = [shape for shape in timm_swin.traced_shapes if shape in shapes]
    assert sorted(traced) == sorted(shapes), f"traced {traced} for {len(sizes)} shapes"


def test_train_mode_uses_dropout_rng(timm_swin):
    model = timm_swin.model.clone(drop_path_rate=0.5)
    x = timm_swin.arrays["input/0"][:, :64, :64]
    train_step = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key}))
    a = train_step(timm_swin.variables, x, jax.random.PRNGKey(2))
    b = train_step(timm_swin.variables, x, jax.random.PRNGKey(3))
    assert a.shape == (1, 10) and not np.allclose(a, b)


def test_bicubic_resize_is_torchs():
    # torch.nn.functional.interpolate([0, 1], size=4, mode="bicubic", align_corners=False):
    # source coordinates -0.25, 0.25, 0.75, 1.25 with Keys' a = -0.75 and clamped taps.
    matrix = flex.resize_matrix_1d(2, 4, "torch_bicubic")
    np.testing.assert_allclose(matrix @ np.array([0.0, 1.0]),
                               [-0.10546875, 0.2265625, 0.7734375, 1.10546875], atol=1e-7)
    np.testing.assert_allclose(flex.resize_matrix_1d(13, 13, "torch_bicubic"), np.eye(13), atol=1e-12)
    np.testing.assert_allclose(flex.resize_matrix_1d(13, 23, "torch_bicubic").sum(1), 1.0, atol=1e-12)


def test_import_resizes_bias_tables_to_another_window(timm_swin):
    arrays, meta = timm_swin.arrays, timm_swin.meta
    kwargs = {**meta["kwargs"], "window_size": 8}
    model, variables = convert.from_timm(meta["timm_name"], state_dict_of(arrays), **kwargs)
    table = variables["params"]["layers_0"]["blocks_0"]["attn"]["relative_position_bias_table"]
    assert table.shape == (15 * 15, 1)
    source = state_dict_of(arrays)["layers.0.blocks.0.attn.relative_position_bias_table"]
    expected = flex.resize_relative_position_bias_table(source, (8, 8))
    np.testing.assert_allclose(table, expected)


def test_importer_rejects_unknown_kwargs_and_reads_old_layout(timm_swin):
    arrays, meta, variables = timm_swin.arrays, timm_swin.meta, timm_swin.variables
    with pytest.raises(ValueError, match="always_partition.*supported"):
        convert.from_timm(meta["timm_name"], state_dict_of(arrays), always_partition=True,
                          **meta["kwargs"])
    # Old timm / official layout: downsample at the end of stages 1-3, head without '.fc'.
    old = {}
    for key, value in state_dict_of(arrays).items():
        if ".downsample." in key:
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.", f"layers.{stage - 1}.")
        old[key.replace("head.fc.", "head.")] = value
    _, old_variables = convert.from_timm(meta["timm_name"], old, **meta["kwargs"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, old_variables, variables)
