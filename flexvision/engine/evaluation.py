"""Classification evals: top-1 accuracy and loss per patch size and per resolution.

``config.eval`` keys:
  pp            preprocessing string for eval images (deterministic ops only).
  splits        TFDS splits to evaluate, e.g. ["test"]; the first one is the headline table.
  patch_sizes   patch sizes to evaluate (models that take ``patch_size``), e.g. [4, 8, 12, 16];
                None or [] evaluates the model as built.
  resolutions   square input sizes to resize eval images to; None/[] keeps the pp's size.
  batch_size    global eval batch size (padded; padding is masked out).
  every         run the evals every this many training steps (0: only at the end).

Results: ``{split: {"accuracy": {"<ps>": a}, "loss": {"<ps>": l},
"by_resolution": {"<res>": {"accuracy": ..., "loss": ...}}}}``, where the top-level
accuracy/loss use the first resolution; a patch size that does not tile a resolution gets None.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from flexvision.data import pipeline
from flexvision.engine import sharding
from flexvision.engine.step import make_eval_step

NATIVE = "native"
DEFAULT = "default"


def _key(value) -> str:
    return DEFAULT if value is None else str(value)


def tiles(patch_size: int | None, resolution: int | None) -> bool:
    """Whether square patches of ``patch_size`` tile a ``resolution`` image (unknown: yes)."""
    return patch_size is None or resolution is None or resolution % patch_size == 0


class Evaluator:
    """Runs the configured evals with one cached jitted eval step per (patch size, resolution)."""

    def __init__(self, model, loss_fn, config, mesh, patch_sizes=None, resolutions=None,
                 splits=None):
        self.model, self.loss_fn, self.mesh = model, loss_fn, mesh
        self.input_config, self.eval_config = config.input, config.eval
        chosen = patch_sizes if patch_sizes is not None else self.eval_config.get("patch_sizes")
        self.patch_sizes = [int(p) for p in chosen] if chosen else [None]
        chosen = resolutions if resolutions is not None else self.eval_config.get("resolutions")
        self.resolutions = [int(r) for r in chosen] if chosen else [None]
        self.splits = list(splits or self.eval_config.get("splits") or ["test"])
        self._steps: dict[tuple, Any] = {}

    def _step(self, patch_size, resolution):
        key = (patch_size, resolution)
        if key not in self._steps:
            fn = make_eval_step(self.model, self.loss_fn, patch_size=patch_size,
                                resolution=resolution)
            self._steps[key] = jax.jit(fn, out_shardings=sharding.replicated(self.mesh))
        return self._steps[key]

    def evaluate_split(self, variables, split: str) -> dict:
        """The table of one split, reading its batches once: :meth:`accumulate` collects each
        batch's sums, :meth:`table` turns them into the table (subclasses extend both)."""
        sums = self.empty_sums()
        for batch in pipeline.eval_batches(self.input_config, self.eval_config.pp, split,
                                           self.eval_config.batch_size):
            self.accumulate(sums, variables, sharding.global_batch(batch, self.mesh))
        return self.table(sums)

    def empty_sums(self) -> dict:
        """Per-batch sums of every evaluated (patch size, resolution), still on the devices."""
        return {(p, r): [] for r in self.resolutions for p in self.patch_sizes if tiles(p, r)}

    def accumulate(self, sums: dict, variables, batch: dict) -> None:
        """Runs the eval steps on one global batch and appends their sums."""
        for key in [k for k in sums if isinstance(k, tuple)]:
            sums[key].append(self._step(*key)(variables, batch))

    def table(self, sums: dict) -> dict:
        """The accuracy/loss table from the sums of every batch of a split."""
        table: dict[str, Any] = {"by_resolution": {}}
        for resolution in self.resolutions:
            accuracy, loss = {}, {}
            for patch_size in self.patch_sizes:
                if (patch_size, resolution) not in sums:  # the patch size does not tile it
                    accuracy[_key(patch_size)] = loss[_key(patch_size)] = None
                    continue
                totals = jax.device_get(sums[(patch_size, resolution)])
                correct = sum(float(t["correct"]) for t in totals)
                count = max(sum(float(t["count"]) for t in totals), 1.0)
                accuracy[_key(patch_size)] = correct / count
                loss[_key(patch_size)] = sum(float(t["loss"]) for t in totals) / count
            table["by_resolution"][NATIVE if resolution is None else str(resolution)] = {
                "accuracy": accuracy, "loss": loss}
        first = next(iter(table["by_resolution"].values()))
        return {"accuracy": first["accuracy"], "loss": first["loss"], **table}

    def run(self, variables) -> dict[str, dict]:
        """Tables for every configured split."""
        return {split: self.evaluate_split(variables, split) for split in self.splits}


def flat_metrics(results: dict[str, dict]) -> dict[str, float]:
    """Scalars for logging, e.g. ``test/accuracy/ps8`` or ``test/accuracy/ps8@res64``."""
    flat = {}
    for split, table in results.items():
        for res, sub in table["by_resolution"].items():
            suffix = "" if res == NATIVE else f"@res{res}"
            for metric in ("accuracy", "loss"):
                for ps, value in sub[metric].items():
                    if value is None:
                        continue
                    flat[f"{split}/{metric}/ps{ps}{suffix}"] = value
    return flat


def format_table(table: dict, title: str = "") -> str:
    """The accuracy/loss table as aligned text: one row per patch size, a column per resolution."""
    by_res = table["by_resolution"]
    resolutions = list(by_res)
    header = ["patch size"] + [f"acc@{r}" for r in resolutions] + [f"loss@{r}" for r in resolutions]
    rows = [header]
    for ps in by_res[resolutions[0]]["accuracy"]:
        accs = [by_res[r]["accuracy"][ps] for r in resolutions]
        losses = [by_res[r]["loss"][ps] for r in resolutions]
        rows.append([ps] + ["-" if a is None else f"{100 * a:.2f}%" for a in accs]
                    + ["-" if l is None else f"{l:.4f}" for l in losses])
    return aligned_text(rows, title)


def aligned_text(rows: list, title: str = "") -> str:
    """Rows of str cells as right-aligned columns two spaces apart, under ``title`` if given:
    the printed tables of every task (classification, detection, segmentation)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [title] if title else []
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def flat_by_patch_size(results: dict[str, dict]) -> dict[str, float]:
    """Scalars for logging of tables shaped ``{metric: {patch size: value}}`` (detection,
    segmentation), e.g. ``test/mask_AP50/ps16``; entries that are not such dicts and None values
    are left out."""
    return {f"{split}/{metric}/ps{ps}": value for split, table in results.items()
            for metric, by_ps in table.items() if isinstance(by_ps, dict)
            for ps, value in by_ps.items() if value is not None}


def write_final(results: dict[str, dict], workdir: str, step: int, plot=None) -> dict:
    """Writes workdir/final_eval.json and final_eval.png (accuracy vs patch size); returns the
    JSON table: the first split's table at top level plus every split under 'splits'.

    ``plot(first split's table, path, title)`` draws final_eval.png (default
    :func:`plot_accuracy`; a task with other tables gives its own)."""
    first_split = next(iter(results))
    final = {"step": int(step), "split": first_split, **results[first_split], "splits": results}
    if jax.process_index() != 0:
        return final
    with open(os.path.join(workdir, "final_eval.json"), "w", encoding="utf-8") as f:
        json.dump(final, f, indent=2)
    path = os.path.join(workdir, "final_eval.png")
    if plot is None:
        plot_accuracy(results[first_split], path, title=f"{first_split} accuracy after {step} steps")
    else:
        plot(results[first_split], path, title=f"{first_split} after {step} steps")
    return final


def plot_accuracy(table: dict, path: str, title: str = "") -> None:
    """Accuracy vs patch size, one line per resolution, saved to ``path``.

    Drawn on a bare ``matplotlib.figure.Figure`` (no pyplot): the caller's backend, e.g. a
    notebook's inline plots, is left as it is.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.subplots()
    for res, sub in table["by_resolution"].items():
        labels = [l for l, a in sub["accuracy"].items() if a is not None]
        numeric = all(l.isdigit() for l in labels)
        xs = [int(l) for l in labels] if numeric else np.arange(len(labels))
        ax.plot(xs, [100 * sub["accuracy"][l] for l in labels], marker="o",
                label=f"resolution {res}")
        if numeric:
            ax.set_xticks(xs)
        else:
            ax.set_xticks(xs, labels)
    ax.set_xlabel("patch size")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
