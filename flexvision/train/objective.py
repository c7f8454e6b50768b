"""What a training run optimises and how it is evaluated: the only thing a task changes.

The loop (:func:`flexvision.train.trainer.train_and_evaluate`) is the same for every task; an
:class:`Objective` brings the per-example loss, the optional frozen model whose outputs become
the targets (distillation's teacher), how freshly initialised parameters are rewritten, the
evaluator, and what is printed after the final eval. :func:`classification` is the plain
objective; :func:`flexvision.train.distill.distillation` the distillation one. The entry point
picks one from the config (:func:`flexvision.train.trainer.objective_for`); a
``config.task = "detection"`` run gets :func:`flexvision.train.detection.detection_objective`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flexvision.engine import evaluation, losses
from flexvision.engine.evaluation import Evaluator


@dataclasses.dataclass
class Objective:
    """A task's part of a training run.

    name            'classification', 'distillation', ...: checked against the config (a
                    ``config.distill`` block needs a distillation objective).
    loss_fn         per-example training loss ``(logits [B, K], targets) -> [B]``.
    evaluator       runs the periodic and final evals: ``.run(variables) -> {split: table}``.
    targets_fn      ``(frozen, images, labels) -> targets`` replacing the labels the loss sees
                    (``engine.step.make_train_step``); None: the labels.
    frozen          the first argument of ``targets_fn``, passed to every jitted step.
    params_init_fn  ``(params, image_shape) -> params`` applied to freshly initialised params
                    (not on resume); ``image_shape`` is one training example's (H, W, C).
    report          ``(final table) -> None``, called on process 0 after the final eval.

    Optional fields for tasks whose loss or tables are not classification's (defaults keep
    classification exactly as it is):

    batch_loss      ``engine.step.BatchLoss``: ``(model, variables, batch, rngs, patch_size)
                    -> (loss, metrics, updates)`` computing the whole training loss from the
                    batch (``loss_fn`` is then None); its metrics are logged as train/<name>.
    batch_fn        ``(host batch of NumPy arrays) -> batch``: applied to every training batch
                    before it is placed on the mesh (select/convert the keys the loss reads).
    flat_metrics    ``({split: table}) -> {name: scalar}`` for metrics.jsonl and TensorBoard.
    format_table    ``(table, title) -> str``: the printed table of one split.
    write_final     ``(results, workdir, step) -> final``: writes final_eval.json (and the
                    task's other final files) and returns its dict.
    headline        what the printed final table shows ("Final test <headline> ...").
    """

    name: str
    loss_fn: Callable
    evaluator: Any
    targets_fn: Callable | None = None
    frozen: Any = None
    params_init_fn: Callable[[Any, tuple[int, ...]], Any] | None = None
    report: Callable[[dict], None] | None = None
    batch_loss: Callable | None = None
    batch_fn: Callable[[dict], dict] | None = None
    flat_metrics: Callable[[dict], dict] = evaluation.flat_metrics
    format_table: Callable[..., str] = evaluation.format_table
    write_final: Callable[[dict, str, int], dict] = evaluation.write_final
    headline: str = "accuracy"


def classification(config, model, mesh) -> Objective:
    """Supervised classification: ``config.loss`` with ``config.label_smoothing``, the
    :class:`~flexvision.engine.evaluation.Evaluator` of ``config.eval``."""
    loss_fn = losses.make_loss(config)
    return Objective("classification", loss_fn, Evaluator(model, loss_fn, config, mesh))
