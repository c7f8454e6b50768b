"""Faults and mistakes (issue 20, items 1-10): a workdir is never lost or corrupted, and every
mistake ends in one clear message.

One tiny run (a 1-block micro FlexiViT on 16 px digits, 4 steps, a checkpoint every step) is
trained once per session; each test works on its own copy. Kills, concurrent runs, read-only
and full disks run in subprocesses (the full disk is a small tmpfs mounted in a private mount
namespace with ``unshare``; the test is skipped where user namespaces are not available).
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from flexvision.data import digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import flexivit_digits  # noqa: E402  (the real demo config, shrunk below)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("faults_tfds"))
    digits.prepare(path)
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("faults_jax_cache"))


def tiny_config(data_dir, cache_dir, **overrides):
    """The demo config shrunk to seconds: one block (micro width), MLP 32, 16 px, patch 8."""
    config = flexivit_digits.get_config()
    config.model.kwargs = ml_collections.ConfigDict(
        {"num_classes": 10, "depth": 1, "num_heads": 2, "mlp_dim": 32})
    config.input.data_dir = data_dir
    config.input.pp = "decode|resize(16)|value_range(-1, 1)|onehot(10)"
    config.input.batch_size = 16
    config.flexi.patch_sizes = (8,)  # one compiled step: the draws themselves are tested elsewhere
    config.eval.pp = "decode|resize(16)|value_range(-1, 1)|onehot(10)"
    config.eval.patch_sizes = (8,)
    config.eval.batch_size = 304  # every test example in one batch, divisible by 8 devices
    config.optax.grad_clip_norm = None  # item 7 switches it on when resuming
    config.total_steps = 4
    config.schedule.warmup_steps = 1
    config.schedule.decay_type = "constant"  # the step's HLO does not depend on total_steps:
    # runs of any length share one compiled step through the persistent compilation cache
    config.log_every = 1
    config.checkpoint_every = 1
    config.keep_checkpoints = 0  # item 5: keep every checkpoint
    config.compilation_cache_dir = cache_dir
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="session")
def trained(data_dir, cache_dir, tmp_path_factory):
    """(config, workdir) of a finished 4-step run with checkpoints 1..4."""
    from flexvision.train.trainer import train_and_evaluate

    config = tiny_config(data_dir, cache_dir)
    workdir = str(tmp_path_factory.mktemp("faults_run") / "run")
    train_and_evaluate(config, workdir)
    return config, workdir


def _copy(trained, tmp_path, name="w"):
    target = str(tmp_path / name)
    shutil.copytree(trained[1], target)
    return target


def _abstract(config):
    from flexvision.engine import optim, sharding
    from flexvision.engine.state import abstract_train_state, build_model

    tx, _ = optim.make_optimizer(config)
    abstract, _ = abstract_train_state(build_model(config), tx, (16, 16, 3), config,
                                       sharding.create_mesh([("data", -1)]))
    return abstract


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _data_file(step_dir):
    """The largest array data file of a checkpoint (OCDBT's d/ folder)."""
    files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, "state"))
             for f in names if os.sep + "d" in root]
    return max(files, key=os.path.getsize)


def _env(devices=1):
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")  # -O0 from tests/conftest.py
                           + f" --xla_force_host_platform_device_count={devices}"),
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _config_file(config, path):
    with open(path, "w", encoding="utf-8") as f:
        f.write("import json\nimport ml_collections\n\n\ndef get_config(arg=None):\n"
                f"    return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n")
    return str(path)


def _last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------------------------
# 1. Corrupt checkpoints
# --------------------------------------------------------------------------------------------

def test_corrupt_checkpoints_are_detected_skipped_and_named(trained, tmp_path, caplog):
    from flexvision.engine.checkpoint import Checkpointer
    from flexvision.engine.integrity import CheckpointCorruptError

    config, _ = trained
    workdir = _copy(trained, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    abstract = _abstract(config)
    step_dir = lambda s: os.path.join(directory, str(s))  # noqa: E731

    # one byte changed inside an array file: orbax alone restores this silently
    path = _data_file(step_dir(4))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    # a truncated file in step 3, a deleted one in step 2
    truncated = _data_file(step_dir(3))
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    deleted = os.path.join(step_dir(2), "state", "_METADATA")
    os.remove(deleted)

    checkpointer = Checkpointer(directory)
    with caplog.at_level(logging.WARNING):
        step, state, meta = checkpointer.restore_newest_good(abstract)
    assert step == 1 and meta["step"] == 1
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    rel = os.path.relpath(path, step_dir(4))
    assert f"checkpoint step 4 in {directory} is corrupt: {rel}: contents changed" in warnings
    assert "checkpoint step 3" in warnings and "truncated" in warnings
    assert "checkpoint step 2" in warnings and "state/_METADATA: missing" in warnings
    reference = Checkpointer(os.path.join(trained[1], "checkpoints"))
    _, good, _ = reference.restore_newest_good(abstract, steps=[1])
    reference.close()
    for a, b in zip(_leaves(state), _leaves(good)):
        np.testing.assert_array_equal(a, b)

    # none left: one error naming every step, the bad file and the fix
    os.remove(os.path.join(step_dir(1), "meta", "metadata"))
    with pytest.raises(CheckpointCorruptError) as err:
        checkpointer.restore_newest_good(abstract)
    checkpointer.close()
    message = str(err.value)
    assert message.startswith(f"no usable checkpoint in {directory}: step 4: {rel}: contents "
                              f"changed")
    assert "step 1: meta/metadata: missing" in message and "Fix: restore these files" in message


def test_trainer_resumes_from_the_newest_good_checkpoint(trained, tmp_path, caplog):
    """The latest checkpoint is corrupt and a crash left an unfinished orbax folder: the trainer
    moves the bad one aside, removes the leftover, resumes from the one before and ends with the
    same parameters as the uninterrupted run (bit-identical resume still holds)."""
    from flexvision.engine.checkpoint import Checkpointer
    from flexvision.train.trainer import train_and_evaluate

    config, _ = trained
    workdir = _copy(trained, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    os.truncate(_data_file(os.path.join(directory, "4")), 10)
    shutil.rmtree(os.path.join(directory, "3"))
    leftover = os.path.join(directory, "5.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(leftover, "state"))
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(config, workdir)
    assert "checkpoint step 4 in" in "\n".join(r.getMessage() for r in caplog.records)
    assert not os.path.exists(leftover)
    assert [p.split("-")[0] for p in os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
            ] == ["4"]
    abstract = _abstract(config)
    resumed, original = Checkpointer(directory), Checkpointer(os.path.join(trained[1],
                                                                           "checkpoints"))
    assert resumed.all_steps() == [1, 2, 3, 4]
    (_, a, _), (_, b, _) = (c.restore_newest_good(abstract, steps=[4])
                            for c in (resumed, original))
    resumed.close()
    original.close()
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------
# 2. Two runs on one workdir
# --------------------------------------------------------------------------------------------

def test_second_run_is_refused_and_a_killed_run_leaves_no_stale_lock(data_dir, cache_dir,
                                                                     tmp_path):
    """The first run is a process holding the workdir's lock the way the trainer does (the
    trainer's own start-up imports would only make the test slower); the second is the trainer."""
    from flexvision.engine.workdir import WorkdirInUseError, WorkdirLock
    from flexvision.train.trainer import train_and_evaluate

    config = tiny_config(data_dir, cache_dir, total_steps=100_000)
    workdir = tmp_path / "shared"
    hold = ("import sys, time; from flexvision.engine.workdir import WorkdirLock; "
            "WorkdirLock(sys.argv[1]).acquire(); time.sleep(600)")
    first = subprocess.Popen([sys.executable, "-c", hold, str(workdir)], cwd=REPO, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            if (workdir / "lock").exists() and (workdir / "lock").read_text().strip():
                break
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()[-3000:]
        with pytest.raises(WorkdirInUseError) as err:
            train_and_evaluate(config, str(workdir))
        assert str(err.value).startswith(
            f"workdir {workdir} is in use by another run (pid {first.pid} on host ")
        first.send_signal(signal.SIGKILL)  # no chance to clean up
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    with WorkdirLock(str(workdir)):  # the dead run's lock is stale: taken over at once
        info = json.loads((workdir / "lock").read_text())
        assert info["pid"] == os.getpid()


# --------------------------------------------------------------------------------------------
# 3. Full disk, read-only checkpoint folder
# --------------------------------------------------------------------------------------------

def _private_mounts_work():
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _private_mounts_work(), reason="needs `unshare -rm` (user + mount "
                    "namespaces) to mount a small tmpfs without touching the host")
def test_full_disk_and_read_only_folder_stop_the_run_at_once(trained, tmp_path):
    config, _ = trained
    # tmpfs space a checkpoint takes (whole pages per file)
    pages = sum(-(-os.path.getsize(os.path.join(root, f)) // 4096) for root, _, files in
                os.walk(os.path.join(trained[1], "checkpoints", "1")) for f in files)
    # room for ~1.5 checkpoints: the first save succeeds, the second hits ENOSPC
    size_kib = int(1.5 * pages * 4)
    config = tiny_config(config.input.data_dir, config.compilation_cache_dir, total_steps=50)
    workdir = tmp_path / "disk"
    ckpt = workdir / "checkpoints"
    os.makedirs(ckpt)
    train = (f"{sys.executable} -m flexvision.train --config "
             f"{_config_file(config, tmp_path / 'c.py')} --workdir {workdir}")
    script = (f"mount -t tmpfs -o size={size_kib}k tmpfs {ckpt} && "
              f"{{ {train}; echo rc=$?; }} && "
              f"cp -r {ckpt} {tmp_path}/after_full && "
              f"mount -o remount,ro {ckpt} && {{ {train}; echo rc=$?; }}")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.stdout.count("rc=2") == 2, out.stdout + out.stderr[-3000:]
    assert len(errors) == 2, out.stderr[-3000:]
    assert errors[0].startswith(f"error: saving checkpoint step 2 to {ckpt} failed: [Errno 28] "
                                f"No space left on device (")
    assert errors[0].endswith("then rerun the same command to resume")
    assert errors[1].startswith(f"error: the checkpoint folder {ckpt} is not writable: "
                                f"[Errno 30] Read-only file system")
    assert "TimeoutError" not in out.stderr
    # stopped at once: a step or two after the failed save, not at the end of the run
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert max(steps) <= 4
    # the earlier checkpoint is intact (checksums verify) and restores
    from flexvision.engine.checkpoint import Checkpointer
    from flexvision.engine.integrity import verify

    after = str(tmp_path / "after_full")
    checkpointer = Checkpointer(after)
    assert checkpointer.all_steps() == [1] and verify(os.path.join(after, "1")) == []
    step, _, _ = checkpointer.restore_newest_good(_abstract(config))
    checkpointer.close()
    assert step == 1


# --------------------------------------------------------------------------------------------
# 4. --workdir= (an unset shell variable)
# --------------------------------------------------------------------------------------------

def test_empty_workdir_is_a_flag_error_and_creates_nothing(trained, tmp_path):
    from flexvision.engine.workdir import WorkdirError
    from flexvision.train.trainer import train_and_evaluate

    config, _ = trained
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = subprocess.run([sys.executable, "-m", "flexvision.train", "--config",
                          _config_file(config, tmp_path / "c.py"), "--workdir="],
                         cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert _last_line(out.stderr).startswith("error: flag --workdir=: must not be empty")
    assert os.listdir(cwd) == []
    with pytest.raises(WorkdirError, match=r"^--workdir is empty \(''\)"):
        train_and_evaluate(config, "")


# --------------------------------------------------------------------------------------------
# 5. keep_checkpoints=0
# --------------------------------------------------------------------------------------------

def test_keep_checkpoints_zero_keeps_every_checkpoint(trained, tmp_path):
    from flexvision.engine.checkpoint import Checkpointer
    from flexvision.train.validate import ConfigError, validate_config

    config, workdir = trained
    assert config.keep_checkpoints == 0
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert checkpointer.all_steps() == [1, 2, 3, 4]  # keep 3 would have deleted step 1
    checkpointer.close()
    with pytest.raises(ValueError, match=r"config.keep_checkpoints\) must be an integer >= 0"):
        Checkpointer(str(tmp_path / "c"), keep=-1)
    bad = tiny_config(config.input.data_dir, config.compilation_cache_dir, keep_checkpoints=-1)
    with pytest.raises(ConfigError, match=r"config.keep_checkpoints=-1: must be an integer >= 0"
                                          r" \(0 keeps every checkpoint\)"):
        validate_config(bad)


# --------------------------------------------------------------------------------------------
# 6. Resuming with another config
# --------------------------------------------------------------------------------------------

def test_resume_with_another_model_or_optimizer_names_the_leaves(trained, tmp_path):
    from flexvision.engine.integrity import IncompatibleCheckpointError
    from flexvision.train.trainer import train_and_evaluate

    config, _ = trained
    workdir = _copy(trained, tmp_path)
    before = open(os.path.join(workdir, "config.json")).read()
    directory = os.path.join(workdir, "checkpoints")
    wider = tiny_config(config.input.data_dir, config.compilation_cache_dir)
    wider.model.kwargs.mlp_dim = 48
    with pytest.raises(IncompatibleCheckpointError) as err:
        train_and_evaluate(wider, workdir)
    assert str(err.value).startswith(f"checkpoint step 4 in {directory} was written for another "
                                     f"model/optimizer: params/")
    assert re.search(r"params/\S+: shape \(([0-9]+, )?32,?\) vs \(([0-9]+, )?48,?\)",
                     str(err.value)), str(err.value)
    assert str(err.value).endswith("use a new workdir or the same config")
    sgd = tiny_config(config.input.data_dir, config.compilation_cache_dir)
    sgd.optax.name, sgd.optax.kwargs = "sgd", ml_collections.ConfigDict({"momentum": 0.9})
    with pytest.raises(IncompatibleCheckpointError, match=r"another model/optimizer: "
                                                          r".*opt_state/1/mu/.*only in"):
        train_and_evaluate(sgd, workdir)
    assert open(os.path.join(workdir, "config.json")).read() == before


def test_resume_with_another_seed_batch_or_patch_sizes_needs_the_flag(trained, tmp_path):
    from flexvision.engine.workdir import ConfigChangeError, read_history
    from flexvision.train.trainer import train_and_evaluate

    config, _ = trained
    workdir = _copy(trained, tmp_path)
    before = open(os.path.join(workdir, "config.json")).read()
    changed = tiny_config(config.input.data_dir, config.compilation_cache_dir, seed=1,
                          **{"input.batch_size": 32, "flexi.patch_sizes": (8, 16)})
    with pytest.raises(ConfigChangeError) as err:
        train_and_evaluate(changed, workdir)
    message = str(err.value)
    assert message.startswith(f"checkpoint step 4 in {workdir}/checkpoints was written with "
                              f"another config: flexi.patch_sizes [8] -> [8, 16], "
                              f"input.batch_size 16 -> 32, seed 0 -> 1.")
    assert "--allow_config_change" in message
    assert open(os.path.join(workdir, "config.json")).read() == before  # not overwritten

    # explicitly allowed (total_steps 4: nothing left to train, only the final eval)
    train_and_evaluate(changed, workdir, allow_config_change=True)
    history = read_history(workdir)
    assert [h["start_step"] for h in history] == [0, 4]
    assert history[0]["config"]["seed"] == 0 and history[1]["config"]["seed"] == 1
    assert history[1]["changed"] == ["flexi.patch_sizes", "input.batch_size", "seed"]
    assert json.load(open(os.path.join(workdir, "config.json")))["seed"] == 1


# --------------------------------------------------------------------------------------------
# 7. The NaN guard's advice can be followed
# --------------------------------------------------------------------------------------------

def test_nan_guard_advice_adding_clipping_resumes(trained, tmp_path):
    from flexvision.engine.workdir import read_history
    from flexvision.train.trainer import train_and_evaluate

    config, _ = trained
    workdir = _copy(trained, tmp_path)
    data, cache = config.input.data_dir, config.compilation_cache_dir
    with pytest.raises(FloatingPointError) as err:
        train_and_evaluate(tiny_config(data, cache, total_steps=6, lr=float("nan")), workdir)
    assert "last good checkpoint is step 4" in str(err.value)
    assert "--config.optax.grad_clip_norm=1.0), then rerun to resume from it" in str(err.value)
    # the advice: clipping on (and a sane lr); the optimizer state keeps its structure
    final = train_and_evaluate(
        tiny_config(data, cache, total_steps=6, **{"optax.grad_clip_norm": 1.0}), workdir)
    assert final["step"] == 6
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
    assert steps[-2:] == [5, 6]
    history = read_history(workdir)  # the NaN run and the run that followed the advice
    assert [h["start_step"] for h in history] == [0, 4, 4]
    assert history[-1]["changed"] == ["lr", "optax.grad_clip_norm"]


def test_clipping_and_weight_decay_do_not_change_the_optimizer_state_structure(trained):
    from flexvision.engine.integrity import leaf_table, state_mismatches

    config, _ = trained
    base = _abstract(config)
    saved = leaf_table(base)
    for overrides in ({"optax.grad_clip_norm": 1.0}, {"optax.weight_decay": 0.0},
                      {"optax.grad_clip_norm": 0.5, "optax.weight_decay": 0.0}):
        other = tiny_config(config.input.data_dir, config.compilation_cache_dir, **overrides)
        assert state_mismatches(saved, _abstract(other)) == []


# --------------------------------------------------------------------------------------------
# 8. python -m flexvision.evaluate on a wrong workdir
# --------------------------------------------------------------------------------------------

def test_evaluate_on_a_mistyped_or_foreign_workdir(trained, tmp_path):
    from flexvision.engine.workdir import WorkdirError
    from flexvision.evaluate import evaluate_checkpoint

    config, workdir = trained
    typo = tmp_path / "typo"
    with pytest.raises(WorkdirError, match=rf"^no checkpoint in {typo}: {typo}/checkpoints does "
                                           rf"not exist \(a mistyped --workdir\?\)"):
        evaluate_checkpoint(config, str(typo))
    assert not typo.exists()

    # another model's config on this workdir (one register token: a parameter the checkpoint
    # lacks), given with the README's override form for a key the config does not list
    out = subprocess.run(
        [sys.executable, "-m", "flexvision.evaluate", "--config",
         _config_file(config, tmp_path / "c.py"), "--workdir", workdir,
         "--config.model.kwargs.num_reg_tokens=1"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: checkpoint step 4 in {workdir}/checkpoints was written for another "
        f"model/optimizer: params/")
    assert "params/reg_token: only in this config" in errors[0]
    assert errors[0].endswith("use a new workdir or the same config")
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr
    assert not any(name.startswith("eval_step") for name in os.listdir(workdir))


# --------------------------------------------------------------------------------------------
# 9. Command-line overrides
# --------------------------------------------------------------------------------------------

def _parse(argv, config_path):
    from absl import flags
    from ml_collections import config_flags

    from flexvision.engine.overrides import parse_flags

    values = flags.FlagValues()
    flag = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                           lock_config=True)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    parse_flags(["prog", f"--config={config_path}", "--workdir=w", *argv], flag_values=values)
    return flag.value


def test_documented_override_forms_work(trained, tmp_path):
    import flexvision
    from flexvision.train.validate import validate_config

    config, _ = trained
    path = _config_file(config, tmp_path / "c.py")
    parsed = _parse(["--config.model.kwargs.num_reg_tokens=2", "--config.model.kwargs.mlp_dim=64",
                     "--config.flexi.probs=(3,)", "--config.total_steps=7"], path)
    validate_config(parsed)
    assert parsed.model.kwargs.num_reg_tokens == 2 and parsed.model.kwargs.mlp_dim == 64
    assert tuple(parsed.flexi.probs) == (3,) and parsed.total_steps == 7
    model = flexvision.create_model(parsed.model.name, **parsed.model.kwargs)
    assert model.num_reg_tokens == 2 and model.mlp_dim == 64


@pytest.mark.parametrize("arg,first_line", [
    ("--config.totl_steps=5", "error: --config.totl_steps=5: config has no key 'totl_steps' "
                              "(did you mean 'total_steps'?); its keys are: checkpoint_every, "),
    ("--config.flexi.probz=(1,1)", "error: --config.flexi.probz=(1,1): config.flexi has no key "
                                   "'probz' (did you mean 'probs'?); its keys are: patch_sizes, "
                                   "probs"),
    ("--config.total_steps=many", "error: flag --config.total_steps=many: "),
])
def test_override_mistakes_give_one_line(trained, tmp_path, capsys, arg, first_line):
    path = _config_file(trained[0], tmp_path / "c.py")
    with pytest.raises(SystemExit) as exit_:
        _parse([arg], path)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(first_line), err


# --------------------------------------------------------------------------------------------
# 10. Every config value is checked at start-up, naming the key
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,devices,message", [
    ({"eval.batch_size": 30}, 8, "config.eval.batch_size=30: must be divisible by the 8 devices"
                                 " (every device gets the same number of rows); use 32"),
    ({"input.batch_size": 12}, 8, "config.input.batch_size=12: must be divisible by the 8 "
                                  "devices"),
    ({"log_every": 0}, 1, "config.log_every=0: must be an integer >= 1"),
    ({"flexi.probs": (1, 2, 3)}, 1, "config.flexi.probs=(1, 2, 3): config.flexi.probs must be "
                                    "'uniform' or 1 non-negative weights"),
    ({"eval.splits": ()}, 1, "config.eval.splits=(): must be a non-empty list of split names"),
    ({"optax.name": "adamw"}, 1, "config.optax="),
    ({"schedule.warmup_steps": 9}, 1, "config.schedule="),
    ({"input.pp": "decode|rezise(16)"}, 1, "config.input.pp='decode|rezise(16)': "),
])
def test_bad_config_values_are_named_at_start_up(trained, tmp_path, overrides, devices,
                                                  message):
    from flexvision.train.validate import ConfigError, validate_config

    config = tiny_config(trained[0].input.data_dir, trained[0].compilation_cache_dir)
    with config.ignore_type():
        config.update_from_flattened_dict(overrides)
    with pytest.raises(ConfigError) as err:
        validate_config(config, device_count=devices)
    assert str(err.value).startswith("invalid config (1 problem): " + message), str(err.value)


def test_trainer_checks_the_config_before_touching_the_workdir(trained, tmp_path):
    from flexvision.train.trainer import train_and_evaluate
    from flexvision.train.validate import ConfigError

    config = tiny_config(trained[0].input.data_dir, trained[0].compilation_cache_dir,
                         **{"eval.batch_size": 0, "log_every": 0})
    with pytest.raises(ConfigError, match=r"^invalid config \(2 problems\): config.log_every=0: "
                                          r".*; config.eval.batch_size=0: must be a positive"):
        train_and_evaluate(config, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
