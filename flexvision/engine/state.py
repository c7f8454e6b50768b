"""The train state: building it (already sharded), its abstract shape, its eval variables, and
reading a trainer workdir back.

The train state is a plain dict pytree::

    {"step": int32[], "params": ..., "opt_state": ..., ["batch_stats": ...]}

Parameters are created with flax logical-axis boxes (``nn.Partitioned``) so that
:func:`flexvision.engine.sharding.tree_shardings` can place them; the state itself holds plain
arrays (:func:`unbox`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import flexvision
from flexvision.engine import optim, sharding
from flexvision.engine.checkpoint import Checkpointer
from flexvision.engine.sharding import unbox


def build_model(config) -> nn.Module:
    """``flexvision.create_model(config.model.name, **config.model.kwargs)``, or for a detector
    name (``flexvision.detection.maskrcnn.list_detectors()``)
    ``create_detector(config.model.name, **config.model.kwargs)``."""
    from flexvision.detection import maskrcnn

    kwargs = dict(config.model.get("kwargs", {}) or {})
    if config.model.name in maskrcnn.list_detectors():
        return maskrcnn.create_detector(config.model.name, **_plain(kwargs))
    return flexvision.create_model(config.model.name, **kwargs)


def _plain(value):
    """ConfigDicts (nested in model.kwargs, e.g. rpn_overrides) as plain dicts."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def make_init_fn(model: nn.Module, tx, image_shape: tuple[int, ...], seed: int) -> Callable:
    """``() -> boxed train state``: params (with logical axes), optimizer state, step.

    ``image_shape`` is (height, width, channels) of one example; params come from
    ``jax.random.key(seed)``, the init-time dropout key from ``seed + 1``.
    """
    def init():
        rngs = {"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}
        variables = model.init(rngs, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        return train_state(variables, tx)
    return init


def train_state(variables: dict, tx) -> dict:
    """The step-0 train state of model ``variables`` ({"params", ["batch_stats"]}) under the
    optax transformation ``tx`` (its ``init`` on the params)."""
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"]}
    state["opt_state"] = tx.init(state["params"])
    if "batch_stats" in variables:
        state["batch_stats"] = variables["batch_stats"]
    return state


def _shardings(init: Callable, config, mesh) -> tuple[Any, Any]:
    abstract = jax.eval_shape(init)
    return abstract, unbox(sharding.tree_shardings(abstract, mesh, config.get("sharding")))


def create_train_state(model, tx, image_shape, config, mesh) -> tuple[Any, Any]:
    """(state, shardings): the train state initialised directly into its shardings
    (``jit(init, out_shardings)``: no device ever holds the whole state first)."""
    init = make_init_fn(model, tx, tuple(image_shape), int(config.seed))
    _, shardings = _shardings(init, config, mesh)
    state = jax.jit(lambda: unbox(init()), out_shardings=shardings)()
    return state, shardings


def abstract_train_state(model, tx, image_shape, config, mesh) -> tuple[Any, Any]:
    """(ShapeDtypeStructs with shardings, shardings) of the train state, nothing allocated: the
    target to restore a checkpoint into."""
    init = make_init_fn(model, tx, tuple(image_shape), int(config.seed))
    abstract, shardings = _shardings(init, config, mesh)
    structs = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unbox(abstract),
        shardings)
    return structs, shardings


def eval_variables(state: dict) -> dict:
    """The model variables (params and, if any, batch_stats) of a train state."""
    variables = {"params": state["params"]}
    if "batch_stats" in state:
        variables["batch_stats"] = state["batch_stats"]
    return variables


def read_config(workdir: str):
    """The ``config.json`` a trainer wrote into ``workdir``, as a ConfigDict."""
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"workdir {workdir!r} has no config.json; give a directory written by "
                         f"`python -m flexvision.train --config ... --workdir DIR`")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def load_workdir(workdir: str, *, config=None, step: int | None = None, mesh=None,
                 image_shape: tuple[int, int, int] | None = None, sharding_config=None
                 ) -> tuple[Any, nn.Module, dict, int]:
    """(config, model, variables, step) of checkpoint ``step`` (default: the latest) of a
    trainer workdir, restored onto ``mesh`` (default: data parallel over every device).

    ``config`` defaults to the workdir's config.json; ``image_shape`` (H, W, C) of one input
    only fixes shape-dependent parameters such as a ViT's position embedding (default: the
    model's native size, :func:`native_image_shape`); ``sharding_config`` replaces
    ``config.sharding`` for the placement. Nothing is created in ``workdir``. WorkdirError (a
    ValueError) when it has no checkpoint; with ``step`` None a corrupt latest checkpoint is
    skipped for the newest intact one (a warning names it); IncompatibleCheckpointError when the
    checkpoint holds another model/optimizer than ``config``'s (engine/integrity.py).
    """
    from flexvision.engine.workdir import WorkdirError

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise WorkdirError(f"no checkpoint in {workdir}: {directory} does not exist (a mistyped "
                           f"--workdir?); train first with `python -m flexvision.train "
                           f"--config ... --workdir {workdir}`")
    config = read_config(workdir) if config is None else config
    checkpointer = Checkpointer(directory, async_save=False)
    try:
        return _load_checkpoint(checkpointer, workdir, config, step, mesh, image_shape,
                                sharding_config)
    finally:
        checkpointer.close()


def _load_checkpoint(checkpointer, workdir, config, step, mesh, image_shape, sharding_config):
    from flexvision.engine.workdir import WorkdirError

    steps = checkpointer.all_steps()
    if not steps or (step is not None and int(step) not in steps):
        raise WorkdirError(f"no checkpoint {'' if step is None else f'of step {step} '}in "
                           f"{checkpointer.directory} (it holds steps {steps}): train first with "
                           f"`python -m flexvision.train --config ... --workdir {workdir}`")
    mesh = sharding.create_mesh(config.get("mesh") or [("data", -1)]) if mesh is None else mesh
    model = build_model(config)
    tx, _ = optim.make_optimizer(config)
    if sharding_config is not None:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.sharding = sharding_config
    abstract, _ = abstract_train_state(model, tx, image_shape or native_image_shape(model),
                                       config, mesh)
    step, state, _ = checkpointer.restore_newest_good(
        abstract, steps=None if step is None else [int(step)])
    return config, model, eval_variables(state), step


def native_image_shape(model: nn.Module) -> tuple[int, int, int]:
    """(H, W, C) at which every parameter shape of ``model`` is defined: the model contract's
    ``input_shape()`` (posemb grid x patch size for ViTs, 224 x 224 otherwise)."""
    return tuple(model.input_shape())
