"""Sharding changes nothing but memory: 8 simulated CPU devices in one subprocess.

A tiny FlexiViT trains a few SGD-with-momentum steps from the same initialisation and data under
1 device, data=8, data=2 x fsdp=4 and data=2 x fsdp=2 x model=2 (tests/test_sharding_worker.py);
losses and parameters must agree to float32 round-off, parameter bytes per device must fall as
the fsdp tactic says, and a checkpoint written on one mesh must restore on others.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import test_sharding_worker as worker

WORKER = pathlib.Path(__file__).with_name("test_sharding_worker.py")
RTOL = 1e-5  # float32 round-off of a different reduction order, a few steps deep


def assert_float32_close(ours, reference, what: str = "") -> None:
    """max |ours - reference| <= RTOL * max(1, max |reference|): round-off at the tensor's scale."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} != {reference.shape}"
    error = float(np.max(np.abs(ours - reference))) if ours.size else 0.0
    allowed = RTOL * max(1.0, float(np.max(np.abs(reference))) if reference.size else 0.0)
    assert error <= allowed, f"{what}: max |ours - reference| = {error:.3g} > {allowed:.3g}"


def run_worker(*args: str, devices: int, env: dict | None = None) -> subprocess.Popen:
    """Starts the worker in a fresh interpreter with ``devices`` simulated CPU devices."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    environ.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")  # -O0 from tests/conftest.py
                              + f" --xla_force_host_platform_device_count={devices}"),
                   **(env or {}))
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: int = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"worker failed ({process.returncode}):\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding_mesh")
    finish(run_worker("equivalence", str(out), devices=8))
    with np.load(out / "params.npz") as npz:
        params = {k: npz[k] for k in npz.files}
    return json.loads((out / "results.json").read_text()), params


def params_of(params: dict, prefix: str) -> dict:
    return {k.split(":", 1)[1]: v for k, v in params.items() if k.startswith(prefix + ":")}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data8", "data2_fsdp4", "data2_fsdp2_model2"])
def test_every_mesh_trains_like_one_device(results, mesh):
    summary, params = results
    np.testing.assert_allclose(summary["losses"][mesh], summary["losses"]["single"], rtol=RTOL)
    reference, ours = params_of(params, "single"), params_of(params, mesh)
    assert sorted(ours) == sorted(reference) and len(reference) > 15
    for name, value in reference.items():
        assert_float32_close(ours[name], value, f"{mesh}: {name}")
    assert summary["losses"]["single"][-1] < summary["losses"]["single"][0]  # it does learn


@pytest.mark.slow
def test_meshes_use_the_strategies_they_name(results):
    specs = results[0]["specs"]
    qkv = "['params']['blocks_0']['attn']['qkv']['kernel']"
    # The momentum buffer of that kernel, wherever the optimizer chain keeps it (engine/optim.py).
    momentum_suffix = ".trace['blocks_0']['attn']['qkv']['kernel']"
    assert specs["data8"][qkv] == "P()"
    assert specs["data2_fsdp4"][qkv] == "P(None, 'fsdp')"
    assert specs["data2_fsdp2_model2"][qkv] == "P('fsdp', 'model')"
    for mesh in specs:
        (momentum,) = [k for k in specs[mesh]
                       if k.startswith("['opt_state']") and k.endswith(momentum_suffix)]
        assert specs[mesh][momentum] == specs[mesh][qkv]


@pytest.mark.slow
def test_parameter_bytes_per_device_fall_with_fsdp(results):
    """Each tensor of >= FSDP_MIN_SIZE elements with a dimension divisible by k is split k ways."""
    summary, _ = results
    shapes = summary["param_shapes"]
    for k in (1, 2, 4, 8):
        expected = 0
        for shape in shapes.values():
            size = int(np.prod(shape))
            split = size >= worker.FSDP_MIN_SIZE and any(d % k == 0 for d in shape)
            expected += 4 * (size // k if split else size)
        assert summary["planned_bytes"][str(k)] == expected, k
    planned = [summary["planned_bytes"][str(k)] for k in (1, 2, 4, 8)]
    assert planned == sorted(planned, reverse=True) and planned[-1] < planned[0] / 4
    # What the devices really hold after a sharded init: the same on every device, as planned.
    assert summary["live_bytes"]["1"] == [summary["planned_bytes"]["1"]]
    assert summary["live_bytes"]["4"] == [summary["planned_bytes"]["4"]]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["data2_fsdp4", "single"])
def test_checkpoint_restores_on_another_mesh(results, target):
    summary, params = results
    restore = summary["restore"]
    assert restore["latest_step"] == worker.STEPS
    assert restore[target]["step"] == worker.STEPS and restore[target]["same_layout"]
    written = params_of(params, "data2_fsdp2_model2")
    restored = params_of(params, f"restored_{target}")
    for name, value in written.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
    np.testing.assert_allclose(restore[target]["next_loss"], restore["source_next_loss"], rtol=RTOL)
