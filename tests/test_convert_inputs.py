"""What the importers say about bad checkpoints and misuse (issue 20, items 11 and 12).

Truncated or corrupted .safetensors / .npz files, state dicts wrapped the way training scripts
save them, a timm model built for another image size than its checkpoint, a traced patch size
under jax.jit, and timm's dynamic_img_pad.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from flexvision import convert
from tests import timm_vit_reference as reference
from tests.helpers import assert_parity

EMBED_DIM, DEPTH, HEADS, PATCH, IMAGE = 48, 1, 3, 8, (32, 48)
GRID = (IMAGE[0] // PATCH, IMAGE[1] // PATCH)
TIMM_KWARGS = dict(embed_dim=EMBED_DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH,
                   img_size=IMAGE, num_classes=4)


@pytest.fixture(scope="module")
def timm_state():
    return reference.random_state_dict(np.random.default_rng(0), embed_dim=EMBED_DIM, depth=DEPTH,
                                       patch=PATCH, grid=GRID, num_classes=4)


def _truncate(path, size):
    data = path.read_bytes()
    path.write_bytes(data[:size] if size >= 0 else data[:len(data) + size])
    return str(path)


IMPORTERS = {
    "timm": lambda path: convert.from_timm("vit_base_patch16_224", path, **TIMM_KWARGS),
    "big_vision": convert.from_big_vision,
    "official": lambda path: convert.from_official("cyclemlp", path),
}


@pytest.mark.parametrize("importer", sorted(IMPORTERS))
@pytest.mark.parametrize("cut,message", [
    (5, r"shorter than the 8-byte header length"),
    (40, r"its header should be \d+ bytes long but only 32 bytes follow"),
    (-100, r"the header describes 2 tensors in \d+ bytes but the file has \d+; tensor 'b'"),
])
def test_truncated_safetensors_names_the_file_and_the_fault(tmp_path, importer, cut, message):
    path = tmp_path / "weights.safetensors"
    save_file({"a": np.ones((4, 4), np.float32), "b": np.arange(64, dtype=np.float32)}, str(path))
    path = _truncate(path, cut)
    with pytest.raises(ValueError, match=re.escape(repr(path)) + r" \(\d+ bytes\) is truncated "
                       r"or corrupted: " + message):
        IMPORTERS[importer](path)


@pytest.mark.parametrize("importer", sorted(IMPORTERS))
def test_truncated_npz_names_the_file_and_the_fault(tmp_path, importer):
    path = tmp_path / "weights.npz"
    np.savez(path, a=np.ones((64, 64), np.float32), b=np.zeros(3, np.float32))
    path = _truncate(path, -200)  # the zip directory at the end is gone
    with pytest.raises(ValueError, match=re.escape(repr(path)) + r" \(\d+ bytes\) is truncated "
                       r"or corrupted: not a readable \.npz \(zip\) archive \(BadZipFile"):
        IMPORTERS[importer](path)


def test_corrupted_npz_member_names_the_array(tmp_path):
    path = tmp_path / "weights.npz"
    np.savez(path, a=np.ones((64, 64), np.float32), b=np.zeros(3, np.float32))
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF  # inside the data of 'a'; the zip's CRC-32 catches it
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"is truncated or corrupted: array 'a' cannot be read "
                       r"\(BadZipFile: Bad CRC-32"):
        convert.load_state_dict(str(path))


def test_pytorch_pickles_are_named_with_the_way_out(tmp_path):
    path = tmp_path / "deit.pth"
    path.write_bytes(b"\x80\x02")
    with pytest.raises(ValueError, match=r"is a PyTorch pickle.*safetensors\.torch\.save_file"):
        convert.from_timm("vit_base_patch16_224", str(path))


@pytest.mark.parametrize("wrap", [
    lambda sd: {"model": sd, "optimizer": {"state": {}}, "epoch": 300},  # official DeiT .pth
    lambda sd: {"state_dict": sd, "arch": "vit"},
    lambda sd: {"model_ema": sd},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel
], ids=["model", "state_dict", "model_ema", "module-prefix"])
def test_wrapped_state_dicts_are_unwrapped(timm_state, wrap):
    _, plain = convert.from_timm("vit_base_patch16_224", timm_state, **TIMM_KWARGS)
    _, wrapped = convert.from_timm("vit_base_patch16_224", wrap(timm_state), **TIMM_KWARGS)
    jax.tree_util.tree_map(np.testing.assert_array_equal, wrapped, plain)


def test_plain_weights_are_preferred_to_ema_and_the_other_copy_is_named(timm_state):
    ema = {k: v + 1 for k, v in timm_state.items()}
    with pytest.warns(UserWarning, match=r"holds state dicts under \['model', 'model_ema'\]; "
                      r"loading 'model' \(pass checkpoint\['model_ema'\]"):
        _, variables = convert.from_timm("vit_base_patch16_224",
                                         {"model_ema": ema, "model": timm_state}, **TIMM_KWARGS)
    np.testing.assert_array_equal(variables["params"]["cls_token"], timm_state["cls_token"])


def test_non_array_entries_are_named(timm_state):
    with pytest.raises(ValueError, match=r"entry 'epoch' is a int, not an array.*'model'"):
        convert.from_timm("vit_base_patch16_224", {**timm_state, "epoch": 300}, **TIMM_KWARGS)


def test_img_size_other_than_the_checkpoints_says_to_load_at_its_size(timm_state):
    kwargs = {**TIMM_KWARGS, "img_size": 64}
    with pytest.raises(ValueError, match=re.escape(
            "the checkpoint's pos_embed covers 24 patch positions, not the 64 of a 8x8 grid, but "
            "the model was built for a 8x8 grid (img_size=64). flexvision resamples the position "
            "embedding to every input at run time, so load the checkpoint at the size it was "
            "trained at (img_size=(H, W) with (H / 8) * (W / 8) = 24)")):
        convert.from_timm("vit_base_patch16_224", timm_state, **kwargs)
    with pytest.raises(ValueError, match=re.escape(  # a 224 checkpoint built for 384
            "timm vit_tiny_patch16_384: the checkpoint's pos_embed covers a 14x14 grid of 16x16 "
            "patches, but the model was built for a 24x24 grid (img_size=(384, 384)). flexvision "
            "resamples the position embedding to every input at run time, so load the checkpoint "
            "at the size it was trained at (img_size=224)")):
        convert.from_timm("vit_tiny_patch16_384", {
            "pos_embed": np.zeros((1, 197, 192), np.float32)})


@pytest.fixture(scope="module")
def micro():
    model, variables = convert.from_timm("vit_base_patch16_224",
                                         reference.random_state_dict(
                                             np.random.default_rng(0), embed_dim=EMBED_DIM,
                                             depth=DEPTH, patch=PATCH, grid=GRID, num_classes=4),
                                         **TIMM_KWARGS)
    return model, variables


def test_traced_patch_size_suggests_static_argnames(micro):
    model, variables = micro
    images = jnp.zeros((1, *IMAGE, 3))
    with pytest.raises(ValueError, match=r"patch_size is a traced value .*"
                       r"static_argnames=\('patch_size',\)"):
        jax.jit(model.apply)(variables, images, patch_size=8)
    static = jax.jit(model.apply, static_argnames=("patch_size",))
    assert static(variables, images, patch_size=8).shape == (1, 4)


def test_dynamic_img_pad_matches_timm(timm_state):
    model, variables = convert.from_timm("vit_base_patch16_224", timm_state,
                                         dynamic_img_size=True, dynamic_img_pad=True,
                                         **TIMM_KWARGS)
    assert model.dynamic_img_pad
    images = np.random.default_rng(3).standard_normal((2, IMAGE[0] - 5, IMAGE[1] - 7, 3))
    images = images.astype(np.float32)  # padded to IMAGE: the posemb grid needs no resampling
    ref = reference.forward(timm_state, images, num_heads=HEADS, dynamic_img_pad=True)
    assert_parity(jax.jit(model.apply)(variables, images), ref["logits"], "dynamic_img_pad")
    unpadded, _ = convert.from_timm("vit_base_patch16_224", timm_state, **TIMM_KWARGS)
    with pytest.raises(ValueError, match=r"does not tile a 27x41 image.*dynamic_img_pad=True"):
        unpadded.apply(variables, images)


def test_nested_flax_variables_are_flattened():
    """big_vision params as a flax tree ({'params': {'embedding': {'kernel': ...}}}) load like
    the flat .npz names."""
    from flax import traverse_util

    from tests.helpers import load_fixture

    arrays, _ = load_fixture("big_vision/bigvision_flexivit_tok.npz")
    flat = {k: v for k, v in arrays.items() if k.startswith("params/")}
    _, expected = convert.from_big_vision(flat)
    _, nested = convert.from_big_vision(traverse_util.unflatten_dict(flat, sep="/"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, nested, expected)
