"""Distillation mode of the trainer: any frozen teacher into a (Flexi)ViT student.

FlexiViT's best models are distilled (Beyer et al. 2023, arXiv 2212.08013, sec. 3.4 and
big_vision configs/proj/flexivit): the teacher runs at its own resolution and patch size on the
same augmented crop as the student, and the student minimises
``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al. 2015), optionally
mixed with the label loss. Chosen by config: for a ``config.distill`` block the trainer's
entry point builds :func:`distillation`, an :class:`~flexvision.train.objective.Objective`
(loss, teacher targets, student init, evaluator, report) that the ordinary loop runs; nothing
else of the loop changes.

``config.distill`` keys:
  teacher.source       'workdir' (a flexvision trainer workdir: its config.json names the
                       model, its latest checkpoint holds the weights), 'timm' or 'big_vision'
                       (imported with flexvision.convert).
  teacher.workdir      for 'workdir'.
  teacher.name         timm model name for 'timm'; teacher.weights: .safetensors/.npz path.
  teacher.kwargs       constructor kwargs for the importer (timm) or overrides (big_vision).
  teacher.patch_size   patch size the teacher runs at (FlexiViT-style teachers); None: as built.
  teacher.resolution   square input size of the teacher (the crop is resized to it inside the
                       step, bilinear); None: the student's crop size.
  temperature          T of the softened softmaxes (big_vision's FlexiViT recipe: 1).
  label_weight         w: loss = (1 - w) * distillation + w * label loss (config.loss).
  init_from_teacher    initialise the student from the teacher's weights (see
                       :func:`init_student_from_teacher`).

The teacher is frozen: its variables are not in the train state or the optimizer, and its
outputs pass through ``stop_gradient``. They are placed with the same sharding rules as the
student (``sharding.tree_shardings`` with ``config.sharding``). Teacher images are resized to
its resolution with ``flex.resize_images``; the student init solves for its stored patch kernel
and position embedding with ``flex.least_squares_source``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexvision.engine import sharding
from flexvision.engine.evaluation import Evaluator
from flexvision.engine.losses import distillation_kl, make_distill_loss, make_loss
from flexvision.engine.state import load_workdir, native_image_shape, unbox
from flexvision.engine.step import model_kwargs
from flexvision.layers import flex
from flexvision.train.objective import Objective

TEACHER_SOURCES = ("workdir", "timm", "big_vision")


@dataclass(frozen=True)
class Teacher:
    """A frozen model: module, variables (placed), patch size and resolution it runs at."""
    model: nn.Module
    variables: Any
    patch_size: int | None = None
    resolution: int | None = None

    def logits(self, variables, images: jax.Array) -> jax.Array:
        """The teacher's eval-mode logits on ``images`` resized to its resolution."""
        images = flex.resize_images(images, self.resolution)
        logits = self.model.apply(variables, images, train=False,
                                  **model_kwargs(self.model, self.patch_size))
        return jax.lax.stop_gradient(logits.astype(jnp.float32))


def make_teacher_targets(teacher: Teacher) -> Callable:
    """``targets_fn(teacher_variables, images, labels)`` for ``step.make_train_step``: the
    teacher's logits on the same (augmented) images, concatenated with the labels. The
    variables arrive as the step's ``frozen`` argument (``teacher.variables``), not as
    constants of the compiled step."""

    def targets_fn(variables, images, labels):
        return jnp.concatenate([teacher.logits(variables, images), labels.astype(jnp.float32)],
                               axis=-1)

    return targets_fn


def _place_like_student(model, variables, mesh, sharding_config):
    """Puts imported teacher variables onto the mesh with the student's sharding rules."""
    shape = native_image_shape(model)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)),
                                                 train=False))
    shardings = unbox(sharding.tree_shardings(abstract, mesh, sharding_config))
    return jax.device_put(variables, {k: shardings[k] for k in variables})


def load_teacher(teacher_config, mesh, sharding_config=None) -> Teacher:
    """The frozen teacher described by ``config.distill.teacher`` (see the module docstring)."""
    source = teacher_config.get("source", "workdir")
    kwargs = dict(teacher_config.get("kwargs", None) or {})
    if source == "workdir":
        _, model, variables, _ = load_workdir(teacher_config.workdir, mesh=mesh,
                                              sharding_config=sharding_config or {})
    elif source in ("timm", "big_vision"):
        from flexvision import convert
        if source == "timm":
            model, variables = convert.from_timm(teacher_config.name, teacher_config.weights,
                                                 **kwargs)
        else:
            model, variables = convert.from_big_vision(teacher_config.weights, **kwargs)
        variables = _place_like_student(model, dict(variables), mesh, sharding_config)
    else:
        raise ValueError(f"config.distill.teacher.source={source!r} is unknown; accepted: "
                         f"{TEACHER_SOURCES}")
    patch_size = teacher_config.get("patch_size", None)
    resolution = teacher_config.get("resolution", None)
    return Teacher(model, variables, None if patch_size is None else int(patch_size),
                   None if resolution is None else int(resolution))


def _has_prefix_posemb(model) -> bool:
    return bool(getattr(model, "posemb_prefix", False)) and model.num_prefix_tokens > 0


def _prefix_entry(model, prefix_posemb: jax.Array, key: str) -> jax.Array:
    """The position-embedding rows of the prefix token table ``key`` (cls, dist, registers)."""
    start = 0
    for name, count in (("cls_token", int(model.class_token)),
                        ("dist_token", int(model.dist_token)),
                        ("reg_token", model.num_reg_tokens)):
        if key.endswith(f"['{name}']"):
            return prefix_posemb[:, start:start + count]
        start += count
    return jnp.zeros((), prefix_posemb.dtype)


def _student_posemb(posemb: jax.Array, teacher_model, student, token_grid) -> jax.Array:
    """The student's stored posemb whose resampling to ``token_grid`` gives the teacher's posemb
    at that grid (least squares where the student's grid is smaller). Prefix entries the
    student has no room for are folded into its prefix tokens by the caller."""
    teacher_prefix = teacher_model.num_prefix_tokens if _has_prefix_posemb(teacher_model) else 0
    student_prefix = student.num_prefix_tokens if _has_prefix_posemb(student) else 0
    grid = posemb[:, teacher_prefix:]
    side = int(round(grid.shape[1] ** 0.5))
    if side * side != grid.shape[1]:
        raise ValueError(f"teacher position embedding of shape {posemb.shape} is not a square "
                         f"grid after {teacher_prefix} prefix entries")
    grid = flex.resample_posemb(grid, (side, side), token_grid, 0, student.resize)
    student_grid = flex.to_pair(student.posemb_grid)
    matrix = flex.posemb_resize_matrix(student_grid, token_grid, student.resize)
    stored = jnp.moveaxis(flex.least_squares_source(matrix, jnp.moveaxis(grid, 1, 0)), 0, 1)
    if student_prefix and student_prefix != teacher_prefix:
        return posemb[:, :0]  # shapes cannot match: the student keeps its own init
    return jnp.concatenate([posemb[:, :student_prefix], stored], axis=1)


def init_student_from_teacher(student: nn.Module, student_params: Any, teacher: Teacher,
                              teacher_params: Any, image_size: int) -> Any:
    """Student params with every same-named teacher parameter copied in.

    Where the stored sizes differ, the student's patch-embedding kernel and position embedding
    are chosen so that the student's own flexible resizing (``flex.pi_resize_kernel`` to the
    teacher's patch size, ``flex.resample_posemb`` to the teacher's token grid at
    ``image_size``) reproduces the teacher's: the solve uses flex.py's PI-resize and posemb
    matrices. When the student's base patch size and posemb grid are at least the teacher's,
    this is exact, so the student at the teacher's patch size returns the teacher's logits;
    otherwise it is the least-squares fit. Parameters the teacher lacks, or whose shapes still
    differ, keep the student's initialisation (ValueError if nothing matches).
    """
    teacher_patch = flex.to_pair(teacher.patch_size or teacher.model.patch_size)
    student_base = flex.to_pair(student.patch_size)
    token_grid = (image_size // teacher_patch[0], image_size // teacher_patch[1])
    teacher_flat = {jax.tree_util.keystr(p): v for p, v in
                    jax.tree_util.tree_leaves_with_path(teacher_params)}
    teacher_prefix_posemb = None
    if _has_prefix_posemb(teacher.model) and "['pos_embed']" in teacher_flat:
        teacher_prefix_posemb = teacher_flat["['pos_embed']"][:, :teacher.model.num_prefix_tokens]
    copied = []

    def pick(path, value):
        key = jax.tree_util.keystr(path)
        source = teacher_flat.get(key)
        if source is None:
            return value
        if key.endswith("['patch_embed']['kernel']") and source.shape[:2] != value.shape[:2]:
            matrix = flex.pi_resize_matrix(student_base, tuple(source.shape[:2]), student.resize)
            source = flex.least_squares_source(matrix, source.reshape(-1, *source.shape[2:])
                                 ).reshape(value.shape)
        elif key.endswith("['pos_embed']"):
            source = _student_posemb(source, teacher.model, student, token_grid)
        elif key.endswith("_token']") and teacher_prefix_posemb is not None and (
                not _has_prefix_posemb(student)):
            source = source + _prefix_entry(teacher.model, teacher_prefix_posemb, key)
        if source.shape != value.shape:
            return value
        copied.append(key)
        return jnp.asarray(source, value.dtype)

    params = jax.tree_util.tree_map_with_path(pick, student_params)
    if not copied:
        raise ValueError("init_from_teacher: no teacher parameter matches the student's names; "
                         "use a teacher of the same family or set "
                         "config.distill.init_from_teacher=False")
    return params


class DistillEvaluator(Evaluator):
    """The usual per-patch-size student tables plus, per split, the comparison with the teacher:
    ``teacher_accuracy`` and, per student patch size, ``agreement`` (top-1 agreement with the
    teacher) and ``kl`` (mean KL(teacher || student) at temperature 1)."""

    def __init__(self, model, loss_fn, config, mesh, teacher: Teacher, **kwargs):
        super().__init__(model, loss_fn, config, mesh, **kwargs)
        self.teacher = teacher
        self._teacher_logits = jax.jit(teacher.logits, out_shardings=sharding.replicated(mesh))
        self._compare: dict[Any, Callable] = {}

    def _compare_step(self, patch_size):
        if patch_size not in self._compare:
            kwargs = model_kwargs(self.model, patch_size)

            def compare(variables, images, teacher_logits, mask):
                logits = self.model.apply(variables, images, train=False, **kwargs)
                agree = jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)
                kl = distillation_kl(logits, teacher_logits, 1.0)
                return {"agree": jnp.sum(agree * mask), "kl": jnp.sum(kl * mask)}

            self._compare[patch_size] = jax.jit(compare,
                                                out_shardings=sharding.replicated(self.mesh))
        return self._compare[patch_size]

    def empty_sums(self) -> dict:
        sums = super().empty_sums()
        # the student patch sizes of the headline table (those that tile the first resolution)
        students = [p for p in self.patch_sizes if (p, self.resolutions[0]) in sums]
        sums.update(teacher_correct=[], count=[], compare={p: [] for p in students})
        return sums

    def accumulate(self, sums: dict, variables, batch: dict) -> None:
        """The student's eval steps and, on the same batch, the teacher comparison."""
        super().accumulate(sums, variables, batch)
        teacher_logits = self._teacher_logits(self.teacher.variables, batch["image"])
        mask = batch["_mask"]
        sums["teacher_correct"].append(jnp.sum(
            (jnp.argmax(teacher_logits, -1) == jnp.argmax(batch["labels"], -1)) * mask))
        sums["count"].append(jnp.sum(mask))
        for p, compared in sums["compare"].items():
            compared.append(self._compare_step(p)(variables, batch["image"], teacher_logits,
                                                  mask))

    def table(self, sums: dict) -> dict:
        table = super().table(sums)
        total = max(float(sum(jax.device_get(sums["count"]))), 1.0)
        table["teacher_accuracy"] = float(sum(jax.device_get(sums["teacher_correct"]))) / total
        table["agreement"], table["kl"] = {}, {}
        for p in self.patch_sizes:
            key = str(p) if p else "default"
            compared = sums["compare"].get(p)
            values = jax.device_get(compared) if compared is not None else None
            table["agreement"][key] = (sum(float(v["agree"]) for v in values) / total
                                       if values is not None else None)
            table["kl"][key] = (sum(float(v["kl"]) for v in values) / total
                                if values is not None else None)
        return table


def format_comparison(table: dict, title: str = "") -> str:
    """Student accuracy, agreement@1 and KL per patch size next to the teacher's accuracy."""
    lines = [title] if title else []
    lines.append(f"teacher accuracy: {100 * table['teacher_accuracy']:.2f}%")
    lines.append(f"{'patch size':>10}  {'student acc':>11}  {'agreement@1':>11}  {'KL':>8}")
    for key, acc in table["accuracy"].items():
        if acc is None:
            continue
        lines.append(f"{key:>10}  {100 * acc:>10.2f}%  {100 * table['agreement'][key]:>10.2f}%"
                     f"  {table['kl'][key]:>8.4f}")
    return "\n".join(lines)


def distillation(config, student: nn.Module, mesh) -> Objective:
    """The distillation objective of ``config.distill`` (see the module docstring) for
    ``student`` on ``mesh``: the teacher is loaded and placed once, here."""
    distill = config.distill
    teacher = load_teacher(distill.teacher, mesh, config.get("sharding"))
    label_loss = make_loss(config)
    loss_fn = make_distill_loss(float(distill.get("temperature", 1.0)),
                                float(distill.get("label_weight", 0.0) or 0.0), label_loss)

    def init_from_teacher(student_params, image_shape):
        image_size = int(distill.teacher.get("resolution", None) or
                         config.get("distill_image_size", 0) or image_shape[0])
        return init_student_from_teacher(student, student_params, teacher,
                                         teacher.variables["params"], image_size)

    def report(final):
        print(format_comparison(final, f"Distillation vs teacher ({final['split']}):"),
              flush=True)

    return Objective("distillation", loss_fn,
                     DistillEvaluator(student, label_loss, config, mesh, teacher),
                     targets_fn=make_teacher_targets(teacher), frozen=teacher.variables,
                     params_init_fn=(init_from_teacher if distill.get("init_from_teacher", False)
                                     else None),
                     report=report)


__all__ = ["make_teacher_targets", "Teacher", "load_teacher", "init_student_from_teacher",
           "DistillEvaluator", "distillation", "format_comparison"]
