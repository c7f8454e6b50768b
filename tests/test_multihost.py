"""Two processes on this machine, CPU collectives over loopback, no launcher.

Each process (4 simulated CPU devices) calls ``distributed.initialize("127.0.0.1:PORT", 2, i)``;
together they train the tiny FlexiViT on a data=2 x fsdp=2 x model=2 mesh spanning both, each
feeding only its own rows of every global batch, and write a sharded checkpoint. A single
process on a different mesh (data=2 x fsdp=2, 4 devices) resumes from it and must end where the
two processes ended, and where its own uninterrupted run ends.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

import test_sharding_worker as worker
from test_sharding_mesh import RTOL, assert_float32_close, finish, run_worker


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost")
    port = str(free_loopback_port())
    processes = [run_worker("multihost", str(out), str(i), port, devices=4) for i in range(2)]
    try:
        for process in processes:
            finish(process)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    finish(run_worker("resume", str(out), devices=4))
    load = lambda name: dict(np.load(out / name))
    return (json.loads((out / "multihost.json").read_text()),
            json.loads((out / "resume.json").read_text()),
            load("multihost_params.npz"), load("resumed_params.npz"), load("scratch_params.npz"))


@pytest.mark.slow
def test_two_processes_share_one_mesh(runs):
    multihost, resume, *_ = runs
    assert multihost["process_count"] == 2 and multihost["device_count"] == 8
    assert multihost["source"] == "arguments"
    assert multihost["local_rows"] == [0, worker.GLOBAL_BATCH // 2]  # process 0's half
    assert resume["process_count"] == 1 and resume["source"] == "single-process"


@pytest.mark.slow
def test_two_process_training_matches_one_process(runs):
    multihost, resume, params, _, scratch = runs
    total = worker.STEPS + worker.EXTRA_STEPS
    assert len(multihost["losses"]) == len(resume["scratch_losses"]) == total
    np.testing.assert_allclose(multihost["losses"], resume["scratch_losses"], rtol=RTOL)
    for name, value in scratch.items():
        assert_float32_close(params[name], value, name)


@pytest.mark.slow
def test_one_process_resumes_the_two_process_checkpoint(runs):
    multihost, resume, params, resumed, _ = runs
    assert resume["resumed_from"] == worker.STEPS
    np.testing.assert_allclose(resume["resumed_losses"], multihost["losses"][worker.STEPS:],
                               rtol=RTOL)
    assert sorted(resumed) == sorted(params)
    for name, value in params.items():
        assert_float32_close(resumed[name], value, name)
