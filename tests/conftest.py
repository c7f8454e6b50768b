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


def _prepared_once(tmp_path_factory, name: str, prepare) -> str:
    """The shared directory ``name`` after ``prepare(path)`` ran in it once per session (a
    TFDS dataset built locally): the first worker builds it under the lock, the others reuse it."""
    path, lock = _shared_dir(tmp_path_factory, name)
    with lock:
        if not (path / "ready").exists():
            prepare(str(path))
            (path / "ready").write_text("")
    return str(path)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
    """The embedded digits dataset prepared once (TFDS format) for every trainer test."""
    from flexvision.data import digits

    return _prepared_once(tmp_path_factory, "tfds_digits", digits.prepare)


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


@pytest.fixture(scope="session")
def bpr_patches_data_dir(tmp_path_factory) -> str:
    """The ``flexvision_bpr_patches`` dataset (detection/bpr_data.py, config nuclei) built once."""
    from flexvision.detection import bpr_data

    return _prepared_once(tmp_path_factory, "tfds_bpr_patches", bpr_data.prepare)


@pytest.fixture(scope="session")
def nuclei_data_dir(tmp_path_factory) -> str:
    """The nuclei instance dataset (flexvision/data/instances.py) prepared once (TFDS)."""
    from flexvision.data import instances

    return _prepared_once(tmp_path_factory, "tfds_nuclei", instances.prepare)


@pytest.fixture(scope="session")
def bpr_trained_run(bpr_patches_data_dir, jax_cache_dir, tmp_path_factory):
    """(workdir, final eval table) of configs/bpr_hrnet18s_nuclei.py cut to two HRNet stages
    (4 and 8 wide) and 12 steps of batch 16 at lr 0.1 (loss logged every step), trained by
    ``train_and_evaluate`` in-process. Read-only."""
    path, lock = _shared_dir(tmp_path_factory, "bpr_trained_run")
    with lock:
        if not (path / "final_eval.json").exists():
            from flexvision.engine.configs import get_config
            from flexvision.train.trainer import train_and_evaluate

            config = get_config(os.path.join(REPO, "configs", "bpr_hrnet18s_nuclei.py"))
            config.model.kwargs.stages = [[1, "bottleneck", [1], [4]],
                                          [1, "basic", [1, 1], [4, 8]]]
            config.input.data_dir = bpr_patches_data_dir
            config.input.batch_size = 16
            config.lr = 0.1
            config.total_steps = 12
            config.log_every = 1
            config.checkpoint_every = 0
            config.compilation_cache_dir = jax_cache_dir
            train_and_evaluate(config, str(path))
    return str(path), json.loads((path / "final_eval.json").read_text())


@pytest.fixture(scope="session")
def tiny_detection_config(nuclei_data_dir, jax_cache_dir):
    """``make(**flat_overrides)``: configs/maskrcnn_flexivit_nuclei.py cut down to the tiny
    ``maskrcnn_flexivit_micro`` (1-block width-16 FlexiViT, the registered tiny heads) on
    64 x 64 training tiles, patch sizes {8, 16} drawn per step, 6 steps, checkpoints every 3
    steps, evaluated on the held-out region resized to 32 x 128 at patch sizes 8 and 16."""
    import ml_collections

    from flexvision.engine.configs import get_config

    def make(**overrides):
        config = get_config(os.path.join(REPO, "configs", "maskrcnn_flexivit_nuclei.py"))
        config.model.kwargs = ml_collections.ConfigDict(
            {"num_classes": 2, "backbone_overrides": {
                "in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}})
        config.input.data_dir = nuclei_data_dir
        config.input.pp = ("decode(1)|det_instances|det_flip_lr|det_resize(64)|"
                           "det_pad(64, 16)|value_range(-1, 1)")
        config.input.batch_size = 4
        config.flexi.patch_sizes = (8, 16)
        config.eval.pp = ("decode(1)|det_instances|det_resize((32, 128))|det_pad((32, 128), 40)|"
                          "value_range(-1, 1)")
        config.eval.patch_sizes = (8, 16)
        config.eval.timing_repeats = 1
        config.lr = 3e-3
        config.total_steps = 6
        config.schedule.warmup_steps = 1
        config.log_every = 1
        config.checkpoint_every = 3
        config.keep_checkpoints = 5
        config.compilation_cache_dir = jax_cache_dir
        config.update_from_flattened_dict(overrides)
        return config

    return make


@pytest.fixture(scope="session")
def detection_run(tiny_detection_config, tmp_path_factory):
    """(workdir, final eval table, patch_size the detector's train forward got in each trace) of
    ``tiny_detection_config()`` trained in-process by ``train_and_evaluate``: 6 steps,
    checkpoints at steps 3 and 6. Read-only for tests."""
    path, lock = _shared_dir(tmp_path_factory, "detection_run")
    traced_file = path.parent / "detection_run_traced.json"
    with lock:
        if not (path / "final_eval.json").exists():
            import dataclasses

            from flexvision.train.trainer import objective_for, train_and_evaluate

            traced = []

            class RecordingModel:
                """The detector, recording the patch_size each traced train forward gets."""

                def __init__(self, model):
                    self._model = model

                def __getattr__(self, name):
                    return getattr(self._model, name)

                def apply(self, *args, **kwargs):
                    traced.append(kwargs.get("patch_size"))  # once per jit trace
                    return self._model.apply(*args, **kwargs)

            def recording_objective(config, model, mesh):
                task = objective_for(config, model, mesh)

                def batch_loss(model, variables, batch, rngs, patch_size):
                    return task.batch_loss(RecordingModel(model), variables, batch, rngs,
                                           patch_size)
                return dataclasses.replace(task, batch_loss=batch_loss)

            train_and_evaluate(tiny_detection_config(), str(path),
                               objective_fn=recording_objective)
            traced_file.write_text(json.dumps(traced))
    return (str(path), json.loads((path / "final_eval.json").read_text()),
            json.loads(traced_file.read_text()))


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
