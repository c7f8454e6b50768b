"""pytest configuration: CPU only, float32 matmuls at full precision for parity; shared data and
trained workdirs.

Session fixtures that train are built once per test session, also under ``pytest -n N``: the
first xdist worker to need one builds it in the session's shared temporary directory while
holding a file lock, the others wait for it and reuse it. Tests must not write into a shared
workdir; copy it first (``shutil.copytree``).
"""

import json
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# XLA's CPU backend at -O0 (LLVM without optimization passes): XLA compile time dominates these
# tiny-shape tests and -O0 about halves it; the arithmetic is unchanged (test_benchmark's A/B
# checks a relative difference < 1e-5), so no tolerance moves. Subprocesses that set their own
# XLA_FLAGS (simulated device counts) append to this value. An explicit level is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shared_dir(tmp_path_factory, name: str):
    """A directory shared by every xdist worker of this session (the single process's own
    temporary root without xdist), and the lock guarding its construction."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return root / name, FileLock(str(root / f"{name}.lock"))


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
    """The embedded digits dataset prepared once (TFDS format) for every trainer test."""
    from flexvision.data import digits

    path, lock = _shared_dir(tmp_path_factory, "tfds_digits")
    with lock:
        if not (path / "ready").exists():
            digits.prepare(str(path))
            (path / "ready").write_text("")
    return str(path)


@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory) -> str:
    """One persistent compilation cache for the trainer tests of the session."""
    path, _ = _shared_dir(tmp_path_factory, "jax_cache")
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_config(digits_data_dir, jax_cache_dir):
    """``make(**flat_overrides)``: configs/flexivit_digits.py cut down to a 1-block width-16
    FlexiViT on 16 px digits, patch sizes {4, 8}, 4 steps, checkpoints every 2 steps."""
    import ml_collections

    from flexvision.engine.configs import get_config

    def make(**overrides):
        config = get_config(os.path.join(REPO, "configs", "flexivit_digits.py"))
        config.model.kwargs = ml_collections.ConfigDict(
            {"num_classes": 10, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32,
             "dropout": 0.1})
        config.input.data_dir = digits_data_dir
        config.input.pp = ("decode|resize(18)|random_crop(16)|flip_lr|value_range(-1, 1)|"
                           "onehot(10)")
        config.input.batch_size = 16
        config.flexi.patch_sizes = (4, 8)
        config.eval.pp = "decode|resize(16)|value_range(-1, 1)|onehot(10)"
        config.eval.patch_sizes = (4, 8)
        config.eval.batch_size = 160
        config.mixup_alpha = 0.2
        config.label_smoothing = 0.1
        config.total_steps = 4
        config.schedule.warmup_steps = 1
        config.log_every = 1
        config.checkpoint_every = 2
        config.keep_checkpoints = 5
        config.compilation_cache_dir = jax_cache_dir
        config.update_from_flattened_dict(overrides)
        return config

    return make


@pytest.fixture(scope="session")
def trained_run(tiny_config, tmp_path_factory):
    """(workdir, final eval table) of ``tiny_config()`` trained in-process by
    ``train_and_evaluate``: 4 steps, checkpoints at steps 2 and 4. Read-only for tests."""
    path, lock = _shared_dir(tmp_path_factory, "trained_run")
    with lock:
        if not (path / "final_eval.json").exists():
            from flexvision.train.trainer import train_and_evaluate
            train_and_evaluate(tiny_config(), str(path))
    return str(path), json.loads((path / "final_eval.json").read_text())


# Tests of one module share per-process state: module- and session-scoped fixtures, lru_caches,
# compiled functions, trained runs. xdist's default ``--dist load`` spreads a module's tests over
# the workers, and each worker then builds that state again (an 8-device subprocess run, a
# trained workdir, a compiled model). This scheduler sends each module to one worker, the
# modules with the most tests first (xdist's ``loadscope``), except the modules below, whose
# tests share nothing costly: their tests are spread one by one, last, and even out the end of
# the run. (xdist's ``loadgroup`` would do this with marks, but does not work with pytest 9.)
_INDEPENDENT_TESTS = {"test_benchmark.py", "test_colabs.py"}


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "load":  # another --dist given on the command line
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return nodeid if os.path.basename(module) in _INDEPENDENT_TESTS else module

    return ModuleScheduling(config, log)
