"""The training loop: ``train_and_evaluate(config, workdir)`` (see configs/*.py for the keys).

Flow: mesh -> model -> objective (classification, distillation for a ``config.distill``
block, Mask R-CNN for ``config.task = "detection"``: :func:`objective_for`) -> optimizer ->
train state created already sharded (eval_shape ->
``sharding.tree_shardings`` -> jit(init, out_shardings)) -> restore the latest checkpoint in
workdir/checkpoints -> input pipeline from that step -> loop (patch size of the step from
(seed, step); one jitted step per patch size, cached in memory and in the persistent
compilation cache) -> logs, periodic evals, periodic async checkpoints -> final checkpoint,
final evals, workdir/final_eval.json + .png.

Guarantees: a rerun of the same command resumes from the latest checkpoint and ends with the
same parameters as an uninterrupted run (data order, patch sizes, dropout and mixup are all
functions of (seed, step)); SIGTERM saves a checkpoint before returning; a non-finite loss or
gradient stops the run with FloatingPointError before anything non-finite is saved.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp

from flexvision.data import pipeline
from flexvision.engine import optim, patch_schedule, sharding
from flexvision.engine import workdir as workdir_lib
from flexvision.engine.cache import enable_compilation_cache
from flexvision.engine.checkpoint import Checkpointer
from flexvision.engine.state import (abstract_train_state, build_model, create_train_state,
                                     eval_variables)
from flexvision.engine.step import accepts_patch_size, make_train_step
from flexvision.train import detection, distill, objective, segmentation, validate
from flexvision.train.metrics import MetricWriter, Progress
from flexvision.train.objective import Objective

ObjectiveFn = Callable[[Any, Any, Any], Objective]
_STEP_METRICS = ("loss", "grad_norm", "param_norm", "finite")  # logged by name in the loop


class Preempted(Exception):
    """Raised by :func:`train_and_evaluate` after saving a checkpoint on SIGTERM."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM at step {step}; a checkpoint of step {step} was "
                         f"saved, rerun the same command to resume")
        self.step = step


def objective_for(config, model, mesh) -> Objective:
    """The objective the config asks for: distillation when it has a ``config.distill`` block,
    Mask R-CNN training for ``config.task = "detection"``, per-pixel segmentation (BPR's
    refiner) for ``"segmentation"``, else classification."""
    task = config.get("task") or "classification"
    if config.get("distill") is not None:
        if task != "classification":
            raise ValueError(f"config.distill is set with config.task={task!r}: distillation "
                             f"trains classifiers only; remove config.distill")
        return distill.distillation(config, model, mesh)
    if task == "detection":
        return detection.detection_objective(config, model, mesh)
    if task == "segmentation":
        return segmentation.segmentation_objective(config, model, mesh)
    return objective.classification(config, model, mesh)


def _task_batches(dataset, task: Objective):
    """NumPy training batches of ``dataset``, through the task's ``batch_fn`` if it has one."""
    batches = dataset.as_numpy_iterator()
    return batches if task.batch_fn is None else map(task.batch_fn, batches)


class _SigtermFlag:
    """Sets ``.raised`` on SIGTERM while active (main thread only; restores the old handler)."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _non_finite_error(step_range: tuple[int, int], last_good: int | None, directory: str):
    where = (f"the last good checkpoint is step {last_good} in {directory}" if last_good is not None
             else "no checkpoint was saved before it")
    return FloatingPointError(
        f"loss or gradient became NaN/Inf between steps {step_range[0]} and {step_range[1]}; "
        f"stopped without saving the bad state ({where}). Lower config.lr, raise "
        f"config.schedule.warmup_steps or set config.optax.grad_clip_norm (e.g. "
        f"--config.optax.grad_clip_norm=1.0), then rerun to resume from it.")


def train_and_evaluate(config, workdir: str, *, objective_fn: ObjectiveFn | None = None,
                       allow_config_change: bool = False) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the final
    eval table (also written to workdir/final_eval.json). Raises :class:`Preempted` after
    saving on SIGTERM and FloatingPointError on a non-finite loss.

    ``objective_fn(config, model, mesh) -> Objective`` chooses the task (default
    :func:`objective_for`: distillation for a ``config.distill`` block, detection for
    ``config.task = "detection"``, else classification).
    A config with ``config.distill`` trained with an objective that is not a distillation one
    is a ValueError, never a run that silently skips the teacher.

    Before training: every config value is checked (ConfigError naming the key), the workdir is
    locked against a second run (WorkdirInUseError), unfinished orbax folders of a crashed run
    are removed and the checkpoint folder must be writable (CheckpointWriteError). Resuming
    restores the newest checkpoint that verifies (engine/integrity.py), refuses another
    model/optimizer (IncompatibleCheckpointError) and run-defining config changes unless
    ``allow_config_change`` (ConfigChangeError); configs are kept in config_history.jsonl."""
    workdir = workdir_lib.check_workdir_arg(workdir)
    validate.validate_config(config, build_model=build_model)
    os.makedirs(workdir, exist_ok=True)
    enable_compilation_cache(config.get("compilation_cache_dir"))
    with workdir_lib.WorkdirLock(workdir):
        workdir_lib.check_writable(os.path.join(workdir, "checkpoints"))
        workdir_lib.clean_stale_tmp(os.path.join(workdir, "checkpoints"))
        mesh = sharding.create_mesh(config.get("mesh") or [("data", -1)])
        with sharding.activation_rules(mesh, config.get("sharding")):
            model = build_model(config)
            task = (objective_fn or objective_for)(config, model, mesh)
            if config.get("distill") is not None and task.name != "distillation":
                raise ValueError(f"config.distill is set but the objective is {task.name!r}: "
                                 f"the teacher would be ignored. Remove config.distill, or "
                                 f"build the objective with "
                                 f"flexvision.train.distill.distillation")
            return _train_on_mesh(config, workdir, mesh, model, task, allow_config_change)


def _train_on_mesh(config, workdir: str, mesh, model, task: Objective,
                   allow_config_change: bool = False) -> dict:
    """The body of :func:`train_and_evaluate`, inside the mesh's activation-sharding rules."""
    seed, total_steps = int(config.seed), int(config.total_steps)
    tx, schedule = optim.make_optimizer(config)
    flexible = accepts_patch_size(model) and config.get("flexi") is not None and bool(
        config.flexi.get("patch_sizes"))

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                keep=int(config.get("keep_checkpoints", 3)))
    start_step = checkpointer.latest_step() or 0
    batches = _task_batches(pipeline.train_dataset(config.input, seed, start_step), task)
    first_batch = next(batches)
    image_shape = first_batch["image"].shape[1:]

    if checkpointer.latest_step() is not None:
        abstract, shardings = abstract_train_state(model, tx, image_shape, config, mesh)
        restored_step, state, meta = checkpointer.restore_newest_good(abstract,
                                                                      quarantine_to=workdir)
        workdir_lib.check_and_record_config(config, workdir, restored_step,
                                            allow_change=allow_config_change)
        if restored_step != start_step:  # fell back past a corrupt checkpoint
            start_step = restored_step
            batches = _task_batches(pipeline.train_dataset(config.input, seed, start_step),
                                    task)
            first_batch = next(batches)
        if int(meta.get("data_position", start_step)) != start_step:
            raise ValueError(f"checkpoint {start_step} records data position "
                             f"{meta['data_position']}; it was not written by this trainer")
    else:
        workdir_lib.check_and_record_config(config, workdir, None)
        state, shardings = create_train_state(model, tx, image_shape, config, mesh)
        if task.params_init_fn is not None:
            params = task.params_init_fn(state["params"], tuple(image_shape))
            state = jax.jit(lambda s, p: dict(s, params=p, opt_state=tx.init(p)),
                            out_shardings=shardings, donate_argnums=0)(state, params)

    step_fns: dict[int | None, Callable] = {}

    def train_step_for(patch_size):
        if patch_size not in step_fns:
            fn = make_train_step(model, tx, task.loss_fn, seed=seed, patch_size=patch_size,
                                 mixup_alpha=float(config.get("mixup_alpha", 0.0) or 0.0),
                                 targets_fn=task.targets_fn, batch_loss=task.batch_loss)
            step_fns[patch_size] = jax.jit(
                fn, out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
        return step_fns[patch_size]

    evaluator, frozen = task.evaluator, task.frozen
    writer = MetricWriter(workdir)
    progress = Progress(start_step, total_steps, int(config.input.batch_size))
    log_every = int(config.get("log_every", 50))
    checkpoint_every = int(config.get("checkpoint_every", 500))
    eval_every = int(config.eval.get("every", 0) or 0)
    last_good = checkpointer.latest_step()
    checked_step = start_step  # everything up to here is known to be finite
    finite = jnp.array(True)

    def ensure_finite(step):
        nonlocal checked_step
        if not bool(jax.device_get(finite)):
            checkpointer.close()
            writer.close()
            progress.close()
            raise _non_finite_error((checked_step, step), last_good, checkpointer.directory)
        checked_step = step

    def save(step):
        nonlocal last_good
        ensure_finite(step)
        checkpointer.save(step, state, {"step": step, "data_position": step, "seed": seed})
        last_good = step

    step = start_step
    with _SigtermFlag() as sigterm:
        while step < total_steps:
            batch = first_batch if step == start_step else next(batches)
            patch_size = (patch_schedule.patch_size_for_step(config.flexi, seed, step)
                          if flexible else None)
            state, metrics = train_step_for(patch_size)(state, sharding.global_batch(batch, mesh),
                                                        frozen)
            finite = finite & metrics["finite"]
            step += 1
            checkpointer.check()  # a failed background save stops the run here, not later
            progress.advance(step)
            if step % log_every == 0 or step == total_steps:
                ensure_finite(step)
                values = jax.device_get(metrics)
                rate = progress.log(step, loss=f"{values['loss']:.4f}", ps=patch_size)
                writer.write(step, {"train/loss": values["loss"],
                                    "train/grad_norm": values["grad_norm"],
                                    "train/param_norm": values["param_norm"],
                                    "train/lr": float(schedule(step - 1)),
                                    "train/images_per_second": rate,
                                    **{f"train/{k}": v for k, v in values.items()
                                       if k not in _STEP_METRICS}})
            if eval_every and step % eval_every == 0 and step < total_steps:
                ensure_finite(step)
                results = evaluator.run(eval_variables(state))
                writer.write(step, task.flat_metrics(results))
                split = next(iter(results))
                progress.write(task.format_table(results[split], f"[step {step}] {split}"))
                progress.reset_clock(step)
            if sigterm.raised:
                save(step)
                checkpointer.close()
                writer.close()
                progress.close()
                raise Preempted(step)
            if checkpoint_every and step % checkpoint_every == 0 and step < total_steps:
                save(step)
    progress.close()
    if last_good != step:
        save(step)
    checkpointer.wait()

    results = evaluator.run(eval_variables(state))
    writer.write(step, task.flat_metrics(results))
    writer.close()
    checkpointer.close()
    final = task.write_final(results, workdir, step)
    if jax.process_index() == 0:
        print(task.format_table(results[final["split"]],
                                f"Final {final['split']} {task.headline} ({config.model.name}, "
                                f"step {step}):"), flush=True)
        if task.report is not None:
            task.report(final)
    return final


def load_final_eval(workdir: str) -> dict:
    """The final_eval.json written by :func:`train_and_evaluate`."""
    with open(os.path.join(workdir, "final_eval.json"), encoding="utf-8") as f:
        return json.load(f)


__all__ = ["train_and_evaluate", "objective_for", "Preempted", "load_final_eval"]
