"""Subprocess entry point for the sharding and multi-host tests (it holds no tests itself).

The device count of a JAX process is fixed when its backend starts, so every run that needs
simulated CPU devices (``--xla_force_host_platform_device_count``) or a second process runs this
file in a fresh interpreter:

    python tests/test_sharding_worker.py equivalence OUT        # 8 devices, one process
    python tests/test_sharding_worker.py multihost OUT ID PORT  # process ID of 2, 4 devices each
    python tests/test_sharding_worker.py resume OUT             # one process, 4 devices
    python tests/test_sharding_worker.py trainer OUT [ID PORT]  # the real trainer, 2 or 1 process

Each mode writes NumPy/JSON results under OUT for the tests to compare. The experiment is a
real registry model (a tiny FlexiViT) trained by the trainer's own step and optimizer factory
(``flexvision.engine``: SGD + momentum) on a fixed synthetic stream whose batch at step ``s``
depends only on (seed, s), so every mesh sees the same data; checkpoints go through the
trainer's checkpoint API (``engine.checkpoint.Checkpointer``).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEED = 0
GLOBAL_BATCH = 16
IMAGE = 16
PATCH = 4
STEPS = 3
EXTRA_STEPS = 2
FSDP_MIN_SIZE = 1024
MODEL = dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=10, patch_size=(PATCH, PATCH),
             posemb_grid=(IMAGE // PATCH, IMAGE // PATCH))

MESHES = {  # name -> mesh axes; "single" runs on the first device only
    "single": [("data", 1)],
    "data8": [("data", 8)],
    "data2_fsdp4": [("data", 2), ("fsdp", 4)],
    "data2_fsdp2_model2": [("data", 2), ("fsdp", 2), ("model", 2)],
}
FSDP_MESHES = {1: [("data", 8)], 2: [("data", 4), ("fsdp", 2)], 4: [("data", 2), ("fsdp", 4)],
               8: [("fsdp", 8)]}


def synthetic_batch(step: int, rows: slice | None = None) -> dict:
    """The global batch of ``step`` (a function of (SEED, step) only), or its ``rows``."""
    rng = np.random.default_rng((SEED, step))
    labels = rng.integers(0, MODEL["num_classes"], GLOBAL_BATCH)
    batch = {"image": rng.normal(size=(GLOBAL_BATCH, IMAGE, IMAGE, 3)).astype(np.float32),
             "labels": np.eye(MODEL["num_classes"], dtype=np.float32)[labels]}
    return batch if rows is None else {k: v[rows] for k, v in batch.items()}


class Experiment:
    """Sharded train state and jitted train step of the tiny FlexiViT on one mesh."""

    def __init__(self, mesh_axes, devices=None, sharding_config=None):
        import jax
        import jax.numpy as jnp
        import ml_collections

        import flexvision
        from flexvision.engine import optim, sharding
        from flexvision.engine.losses import softmax_xent
        from flexvision.engine.state import train_state
        from flexvision.engine.step import make_train_step

        self.sharding_config = sharding_config or {"fsdp_min_size": FSDP_MIN_SIZE}
        self.mesh = sharding.create_mesh(mesh_axes, devices)
        self.model = flexvision.create_model("flexivit_micro", **MODEL)
        self.tx, _ = optim.make_optimizer(ml_collections.ConfigDict({
            "lr": 0.03, "total_steps": STEPS + EXTRA_STEPS,
            "schedule": {"decay_type": "constant"},
            "optax": {"name": "sgd", "kwargs": {"momentum": 0.9}}}))
        dummy = jnp.zeros((2, IMAGE, IMAGE, 3), jnp.float32)

        def init_state(rng):
            variables = sharding.unbox(self.model.init(rng, dummy, patch_size=PATCH))
            return train_state(variables, self.tx)

        train_step = make_train_step(self.model, self.tx, softmax_xent, seed=SEED,
                                     patch_size=PATCH)

        boxed = jax.eval_shape(lambda: self.model.init(jax.random.key(0), dummy, patch_size=PATCH))
        self.abstract_state = jax.eval_shape(init_state, jax.random.key(0))
        self.shardings = sharding.tree_shardings(self.abstract_state, self.mesh,
                                                 self.sharding_config, reference=boxed)
        batch_shardings = {"image": sharding.batch_sharding(self.mesh, 4),
                           "labels": sharding.batch_sharding(self.mesh, 2)}
        self.init_state = init_state
        self._init = jax.jit(init_state, out_shardings=self.shardings)
        self._step = jax.jit(train_step, in_shardings=(self.shardings, batch_shardings),
                             out_shardings=(self.shardings, sharding.replicated(self.mesh)))

    def rules(self):
        from flexvision.engine import sharding
        return sharding.activation_rules(self.mesh, self.sharding_config)

    def init(self, sharded_init: bool = False):
        """The initial state on this mesh: initialised in place (``jit`` with ``out_shardings``,
        as the trainer does) or, cheaper to compile, the one-device init laid out on the mesh."""
        import jax
        if sharded_init:
            with self.rules():
                return self._init(jax.random.key(SEED))
        host = host_initial_state(self)
        return jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
            host, self.shardings)

    def train(self, state, steps: int):
        """Runs ``steps`` steps from ``state``; returns (state, losses)."""
        from flexvision.engine import distributed, sharding
        losses = []
        with self.rules():
            for _ in range(steps):
                step = int(state["step"])
                local = synthetic_batch(step, distributed.process_rows(GLOBAL_BATCH))
                state, metrics = self._step(state, sharding.global_batch(local, self.mesh))
                losses.append(float(metrics["loss"]))
        return state, losses


_HOST_STATE = {}


def host_initial_state(exp: Experiment):
    """The initial train state as NumPy arrays, computed once per process on one device."""
    if "state" not in _HOST_STATE:
        import jax
        with jax.default_device(jax.local_devices()[0]):
            state = jax.jit(exp.init_state)(jax.random.key(SEED))
        _HOST_STATE["state"] = jax.tree_util.tree_map(np.asarray, state)
    return _HOST_STATE["state"]


def flat_params(state) -> dict:
    """Full NumPy copies of the parameters, keyed by their '/'-joined path."""
    import jax

    from flexvision.engine import distributed
    params = distributed.gather_to_host(state["params"])
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def specs(shardings) -> dict:
    import jax
    return {jax.tree_util.keystr(p): str(s.spec)
            for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


def save(directory: str, state) -> None:
    """Checkpoints ``state`` at its step through the trainer's checkpoint API (every process)."""
    from flexvision.engine.checkpoint import Checkpointer
    checkpointer = Checkpointer(directory, async_save=False)
    step = int(state["step"])
    checkpointer.save(step, state, {"step": step, "data_position": step})
    checkpointer.close()


def latest_step(directory: str) -> int | None:
    from flexvision.engine.checkpoint import Checkpointer
    checkpointer = Checkpointer(directory, async_save=False)
    step = checkpointer.latest_step()
    checkpointer.close()
    return step


def restore(directory: str, exp: "Experiment"):
    """The latest checkpoint in ``directory`` read straight into ``exp``'s shardings (whatever
    mesh wrote it), through the trainer's checkpoint API."""
    from flexvision.engine import sharding
    from flexvision.engine.checkpoint import Checkpointer
    checkpointer = Checkpointer(directory, async_save=False)
    state, _ = checkpointer.restore(checkpointer.latest_step(),
                                    sharding.sharded_abstract(exp.abstract_state, exp.shardings))
    checkpointer.close()
    return state


def run_equivalence(out: str) -> None:
    """Same training under every mesh in MESHES; memory per device under FSDP; resharded restore."""
    import jax

    from flexvision.engine import sharding
    results = {"losses": {}, "live_bytes": {}, "planned_bytes": {}, "specs": {}}
    arrays = {}
    states = {}
    for name, axes in MESHES.items():
        exp = Experiment(axes, jax.devices()[:1] if name == "single" else None)
        state, losses = exp.train(exp.init(), STEPS)
        results["losses"][name] = losses
        results["specs"][name] = specs(exp.shardings)
        arrays.update({f"{name}:{k}": v for k, v in flat_params(state).items()})
        states[name] = (exp, state)

    for fsdp, axes in FSDP_MESHES.items():  # planned from shapes alone
        plan = Experiment(axes)  # jit compiles lazily: building it traces shapes only
        results["planned_bytes"][str(fsdp)] = sharding.per_device_bytes(
            plan.abstract_state["params"], plan.shardings["params"])
    for fsdp, name in ((1, "data8"), (4, "data2_fsdp4")):  # measured on the live arrays
        live = sharding.live_bytes_per_device(states[name][1]["params"])
        results["live_bytes"][str(fsdp)] = sorted(set(live.values()))
    results["param_shapes"] = {k.split(":", 1)[1]: list(v.shape) for k, v in arrays.items()
                               if k.startswith("single:")}

    # Checkpoint under data=2 x fsdp=2 x model=2; restore under data=2 x fsdp=4 and on one device.
    source, state = states["data2_fsdp2_model2"]
    ckpt = os.path.join(out, "ckpt")
    save(ckpt, state)
    _, continued = source.train(state, 1)
    results["restore"] = {"source_next_loss": continued[0], "latest_step": latest_step(ckpt)}
    for name in ("data2_fsdp4", "single"):
        target = states[name][0]
        restored = restore(ckpt, target)
        same_layout = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
            jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(target.shardings)))
        _, after = target.train(restored, 1)
        results["restore"][name] = {"step": int(restored["step"]), "same_layout": bool(same_layout),
                                    "next_loss": after[0]}
        arrays.update({f"restored_{name}:{k}": v for k, v in flat_params(restored).items()})
    np.savez(os.path.join(out, "params.npz"), **arrays)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)


def run_multihost(out: str, process_id: int, port: int) -> None:
    """Process ``process_id`` of 2: train STEPS, checkpoint, train EXTRA_STEPS more."""

    from flexvision.engine import distributed
    info = distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
    exp = Experiment([("data", 2), ("fsdp", 2), ("model", 2)])
    state, losses = exp.train(exp.init(sharded_init=True), STEPS)
    save(os.path.join(out, "ckpt"), state)
    state, more = exp.train(state, EXTRA_STEPS)
    params = flat_params(state)
    if distributed.is_main_process():
        np.savez(os.path.join(out, "multihost_params.npz"), **params)
        with open(os.path.join(out, "multihost.json"), "w") as f:
            json.dump({"losses": losses + more, "process_count": info.process_count,
                       "device_count": info.device_count, "source": info.source,
                       "local_rows": [distributed.process_rows(GLOBAL_BATCH).start,
                                      distributed.process_rows(GLOBAL_BATCH).stop]}, f)
    distributed.sync("multihost_done")


def run_resume(out: str) -> None:
    """One process (4 devices, data=2 x fsdp=2): resume the 2-process checkpoint, and from scratch."""

    from flexvision.engine import distributed
    info = distributed.initialize()
    exp = Experiment([("data", 2), ("fsdp", 2)])
    restored = restore(os.path.join(out, "ckpt"), exp)
    resumed, resumed_losses = exp.train(restored, EXTRA_STEPS)
    scratch, scratch_losses = exp.train(exp.init(), STEPS + EXTRA_STEPS)
    np.savez(os.path.join(out, "resumed_params.npz"), **flat_params(resumed))
    np.savez(os.path.join(out, "scratch_params.npz"), **flat_params(scratch))
    with open(os.path.join(out, "resume.json"), "w") as f:
        json.dump({"resumed_from": int(restored["step"]), "resumed_losses": resumed_losses,
                   "scratch_losses": scratch_losses, "process_count": info.process_count,
                   "source": info.source}, f)


def trainer_config(workdir_root: str):
    """configs/flexivit_digits.py cut down to a few steps of a one-block model on a 3-D mesh."""
    from flexvision.engine import sharding
    from flexvision.engine.configs import get_config
    config = get_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "configs", "flexivit_digits.py"))
    config.model.kwargs.update({"embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64})
    config.input.data_dir = os.path.join(workdir_root, "tfds")
    config.input.batch_size = 16
    config.input.shuffle_buffer = 64
    config.flexi.patch_sizes = (8, 12)
    config.eval.patch_sizes = (12,)
    config.eval.batch_size = 64
    config.total_steps = 4
    config.log_every = 2
    config.checkpoint_every = 0
    config.schedule.warmup_steps = 2
    config.mesh = (("data", 2), ("fsdp", 2), ("model", 2))
    config.sharding = sharding.default_config()
    config.sharding.fsdp_min_size = 1024
    config.compilation_cache_dir = os.path.join(workdir_root, "jax_cache")
    return config


def run_trainer(out: str, process_id: int | None, port: int | None) -> None:
    """The real trainer: 2 processes (data=2 x fsdp=2 x model=2), or 1 process resuming on 4."""
    from flexvision.engine import distributed
    if process_id is not None:
        distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
    from flexvision.data import pipeline
    from flexvision.train import trainer
    config = trainer_config(out)
    if distributed.is_main_process():  # build the embedded dataset once, before the others read it
        pipeline.get_builder(config.input.name, config.input.data_dir)
    distributed.sync("dataset_ready")
    if process_id is None:
        config.mesh = (("data", 2), ("fsdp", 2))
    final = trainer.train_and_evaluate(config, os.path.join(out, "workdir"))
    name = "trainer_final_2proc.json" if process_id is not None else "trainer_final_1proc.json"
    if distributed.is_main_process():
        with open(os.path.join(out, name), "w") as f:
            json.dump(final, f)
    distributed.sync("trainer_done")


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode == "equivalence":
        run_equivalence(out_dir)
    elif mode == "multihost":
        run_multihost(out_dir, int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "resume":
        run_resume(out_dir)
    elif mode == "trainer":
        run_trainer(out_dir, *(int(a) for a in sys.argv[3:5])) if len(sys.argv) > 3 else \
            run_trainer(out_dir, None, None)
    else:
        raise SystemExit(f"unknown mode {mode!r}; modes: equivalence, multihost, resume, trainer")
