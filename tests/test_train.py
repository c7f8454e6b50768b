"""End-to-end trainer behaviour on a tiny FlexiViT over the embedded digits (CPU, seconds).

Covers: the same losses on 1 and 8 simulated CPU devices, exact resume after an interruption,
SIGTERM saving a checkpoint, the NaN/Inf guard, final_eval.json/png and the evaluate entry.
The uninterrupted one-device run is the session's ``trained_run`` (tests/conftest.py), shared
by the tests that compare with it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_config_file(config, path):
    with open(path, "w", encoding="utf-8") as f:
        f.write("import json\nimport ml_collections\n\n\ndef get_config(arg=None):\n"
                f"    return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n")
    return path


def _cli(config, workdir, tmp_path, devices=1, **popen):
    """Starts ``python -m flexvision.train`` on ``config`` with ``devices`` CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")  # -O0 from tests/conftest.py
                          + f" --xla_force_host_platform_device_count={devices}"),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    config_file = _write_config_file(config, str(tmp_path / f"config_{devices}.py"))
    return subprocess.Popen([sys.executable, "-m", "flexvision.train", "--config", config_file,
                             "--workdir", str(workdir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _metrics(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: row[key] for row in rows if key in row}


def _restore_params(config, workdir, step):
    from flexvision.engine import optim, sharding, state
    from flexvision.engine.checkpoint import Checkpointer

    mesh = sharding.create_mesh([("data", -1)])
    model = state.build_model(config)
    tx, _ = optim.make_optimizer(config)
    abstract, _ = state.abstract_train_state(model, tx, (16, 16, 3), config, mesh)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    state, meta = checkpointer.restore(step, abstract)
    checkpointer.close()
    return state, meta


def test_one_and_eight_devices_give_the_same_losses(tiny_config, trained_run, tmp_path):
    one_device, final_one = trained_run
    proc = _cli(tiny_config(), tmp_path / "run8", tmp_path, devices=8)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"8 devices failed:\n{err[-3000:]}"
    assert "Final test accuracy" in out
    losses = {1: _metrics(one_device, "train/loss"), 8: _metrics(tmp_path / "run8", "train/loss")}
    assert sorted(losses[1]) == sorted(losses[8]) == [1, 2, 3, 4]
    np.testing.assert_allclose([losses[8][s] for s in (1, 2, 3, 4)],
                               [losses[1][s] for s in (1, 2, 3, 4)], rtol=2e-5)
    final_eight = json.loads((tmp_path / "run8" / "final_eval.json").read_text())
    np.testing.assert_allclose(list(final_eight["loss"].values()),
                               list(final_one["loss"].values()), rtol=2e-5)


def test_resume_after_interruption_matches_uninterrupted_run(tiny_config, trained_run,
                                                             tmp_path):
    from flexvision.train.trainer import train_and_evaluate

    config = tiny_config()
    full, final = trained_run
    resumed = str(tmp_path / "resumed")

    assert set(final["accuracy"]) == {"4", "8"} and final["step"] == 4
    assert all(0 <= a <= 1 for a in final["accuracy"].values())
    assert os.path.getsize(os.path.join(full, "final_eval.png")) > 1000
    assert json.loads(open(os.path.join(full, "config.json")).read())["total_steps"] == 4
    assert os.listdir(os.path.join(full, "tensorboard"))

    # An interrupted run: it got as far as the checkpoint of step 2.
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    os.remove(os.path.join(resumed, "final_eval.json"))
    train_and_evaluate(config, resumed)

    state_full, meta = _restore_params(config, full, 4)
    state_resumed, _ = _restore_params(config, resumed, 4)
    assert meta == {"step": 4, "data_position": 4, "seed": 0}
    for a, b in zip(*(jax_leaves(s) for s in (state_full, state_resumed))):
        np.testing.assert_array_equal(a, b)
    assert _metrics(resumed, "train/loss")[4] == _metrics(full, "train/loss")[4]


def test_evaluate_entry_restores_the_checkpoint(tiny_config, trained_run):
    from flexvision.evaluate import evaluate_checkpoint

    full, final = trained_run
    evaluated = evaluate_checkpoint(tiny_config(), full, patch_sizes=[8, 16],
                                    resolutions=[16, 32])
    table = evaluated["splits"]["test"]
    assert evaluated["step"] == 4 and set(table["by_resolution"]) == {"16", "32"}
    assert table["accuracy"]["8"] == pytest.approx(final["accuracy"]["8"])


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_sigterm_saves_a_checkpoint_and_exits(tiny_config, tmp_path):
    from flexvision.engine.checkpoint import Checkpointer

    config = tiny_config(total_steps=100_000, checkpoint_every=0)
    workdir = tmp_path / "preempted"
    proc = _cli(config, workdir, tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and len(_metrics(workdir, "train/loss")) >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err
    checkpointer = Checkpointer(str(workdir / "checkpoints"))
    step = checkpointer.latest_step()
    checkpointer.close()
    assert step is not None and 2 <= step < 100_000
    assert step >= max(_metrics(workdir, "train/loss"))
    assert not (workdir / "final_eval.json").exists()


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tiny_config, trained_run,
                                                            tmp_path):
    from flexvision.engine.checkpoint import Checkpointer
    from flexvision.train.trainer import train_and_evaluate

    # A run that got as far as the checkpoint of step 2, continued with a NaN learning rate.
    workdir = str(tmp_path / "nan")
    shutil.copytree(trained_run[0], workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    with pytest.raises(FloatingPointError, match=r"NaN/Inf between steps 2 and 3.*last good "
                                                 r"checkpoint is step 2"):
        train_and_evaluate(tiny_config(total_steps=6, lr=float("nan")), workdir)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert checkpointer.all_steps() == [2]
    checkpointer.close()
    state, _ = _restore_params(tiny_config(), workdir, 2)
    assert all(np.isfinite(x).all() for x in jax_leaves(state["params"]))


class _TinyBatchNormNet:
    """A conv + BatchNorm classifier without patch_size: the trainer must thread batch_stats."""

    @staticmethod
    def build(num_classes=10):
        import flax.linen as nn

        from flexvision.models.contract import Backbone

        class TinyBatchNormNet(Backbone):  # the model contract: flex_kwargs, in_chans, ...
            num_classes: int = 10
            in_chans: int = 3

            @nn.compact
            def __call__(self, images, *, train=False):
                x = nn.Conv(8, (3, 3), strides=(2, 2))(images)
                x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
                x = nn.relu(x).mean(axis=(1, 2))
                return nn.Dense(self.num_classes)(x)

        return TinyBatchNormNet(num_classes=num_classes)


def test_batchnorm_model_without_patch_size_trains(tiny_config, tmp_path, monkeypatch):
    from flexvision.train import trainer as trainer_module
    from flexvision.train.trainer import train_and_evaluate

    # Not registered: other test files iterate over every registered model.
    monkeypatch.setattr(trainer_module, "build_model", lambda config: _TinyBatchNormNet.build())
    config = tiny_config(total_steps=2)
    config.model.name = "tiny_batchnorm_net"
    config.model.kwargs = ml_collections.ConfigDict({"num_classes": 10})
    config.eval.patch_sizes = ()
    final = train_and_evaluate(config, str(tmp_path / "bn"))
    assert list(final["accuracy"]) == ["default"]
    from flexvision.engine import optim, sharding, state
    from flexvision.engine.checkpoint import Checkpointer

    model = trainer_module.build_model(config)
    tx, _ = optim.make_optimizer(config)
    abstract, _ = state.abstract_train_state(model, tx, (16, 16, 3), config,
                                             sharding.create_mesh([("data", -1)]))
    checkpointer = Checkpointer(str(tmp_path / "bn" / "checkpoints"))
    state, _ = checkpointer.restore(2, abstract)
    checkpointer.close()
    mean = np.asarray(state["batch_stats"]["BatchNorm_0"]["mean"])
    assert np.abs(mean).max() > 0  # running statistics were updated by the train steps
