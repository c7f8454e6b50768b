"""The registry and the convert dispatch: names, errors, discovery."""

import numpy as np
import pytest

import flexvision
from flexvision.convert import common


def test_unknown_model_name_says_what_is_accepted():
    with pytest.raises(ValueError, match=r"unknown model name 'not_a_model'.*list_models"):
        flexvision.create_model("not_a_model")


def test_load_state_dict_rejects_unknown_file_type(tmp_path):
    path = tmp_path / "weights.msgpack"  # (.pt/.pth/.bin get the PyTorch-pickle message)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"unsupported file type.*safetensors.*npz"):
        common.load_state_dict(str(path))


def test_load_state_dict_reads_npz_and_safetensors(tmp_path):
    from safetensors.numpy import save_file

    arrays = {"a.weight": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.ones(2, np.int64)}
    np.savez(tmp_path / "w.npz", **arrays)
    save_file(arrays, str(tmp_path / "w.safetensors"))
    for name in ("w.npz", "w.safetensors"):
        loaded = common.load_state_dict(str(tmp_path / name))
        assert loaded["a.weight"].dtype == np.float32
        np.testing.assert_array_equal(loaded["a.weight"], arrays["a.weight"].astype(np.float32))
        assert loaded["b"].dtype == np.int64


def test_fit_to_template_lists_every_problem():
    template = {"params": {"dense": {"kernel": np.zeros((3, 4)), "bias": np.zeros(4)}}}
    converted = {"params/dense/kernel": np.zeros((3, 5)), "params/extra": np.zeros(1)}
    with pytest.raises(ValueError) as err:
        common.fit_to_template(template, converted, source="test")
    message = str(err.value)
    assert "missing params/dense/bias" in message
    assert "unexpected params/extra" in message
    assert "checkpoint gives shape (3, 5), model expects (3, 4)" in message
