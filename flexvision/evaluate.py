r"""Evaluate the latest checkpoint of a training workdir at any patch sizes / resolutions.

    python -m flexvision.evaluate --config configs/flexivit_digits.py --workdir DIR \
        --patch_sizes=4,8,16 --resolutions=48,64 [--split=test] [--step=N]

Uses the config's eval pp / splits / patch sizes / resolutions unless given on the command
line; prints one table per split and writes DIR/eval_step<N>.json. A detection run
(``config.task = "detection"``) gets COCO box/mask AP and images/s per patch size
(engine/detection.py; no resolutions: resize in the eval pp).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training run's config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_PATCH_SIZES = flags.DEFINE_list("patch_sizes", None, "Patch sizes to evaluate, e.g. 4,8,16.")
_RESOLUTIONS = flags.DEFINE_list("resolutions", None, "Square input sizes, e.g. 48,64.")
_SPLITS = flags.DEFINE_list("split", None, "TFDS splits to evaluate (default: config.eval).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["config", "workdir"])


def evaluate_checkpoint(config, workdir: str, patch_sizes=None, resolutions=None, splits=None,
                        step: int | None = None) -> dict:
    """Restores checkpoint ``step`` (default latest) of ``workdir`` and evaluates it.

    Returns ``{"step": N, "splits": {split: table}}`` (tables as in engine.evaluation, or
    engine.detection for ``config.task = "detection"``).
    """
    import numpy as np

    from flexvision.data import pipeline
    from flexvision.engine.cache import enable_compilation_cache
    from flexvision.engine.evaluation import Evaluator
    from flexvision.engine.losses import make_loss
    from flexvision.engine.sharding import create_mesh
    from flexvision.engine.state import load_workdir

    if config.get("task") == "detection" and resolutions:
        raise ValueError(f"resolutions={resolutions}: detection evals run at the eval pp's "
                         f"size; resize in config.eval.pp (det_resize) instead")
    enable_compilation_cache(config.get("compilation_cache_dir"))
    sample = next(pipeline.eval_batches(config.input, config.eval.pp,
                                        (splits or config.eval.splits)[0], config.eval.batch_size))
    mesh = create_mesh(config.get("mesh") or [("data", -1)])
    _, model, variables, step = load_workdir(workdir, config=config, step=step, mesh=mesh,
                                             image_shape=np.shape(sample["image"])[1:])
    if config.get("task") == "detection":
        from flexvision.engine.detection import DetectionEvaluator

        evaluator = DetectionEvaluator(model, config, mesh, patch_sizes=patch_sizes,
                                       splits=splits)
    else:
        evaluator = Evaluator(model, make_loss(config), config, mesh,
                              patch_sizes=patch_sizes, resolutions=resolutions, splits=splits)
    return {"step": int(step), "splits": evaluator.run(variables)}


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax/tfds INFO chatter off the console
    import jax

    from flexvision.engine import detection, evaluation

    from flexvision.engine.integrity import CheckpointCorruptError, IncompatibleCheckpointError
    from flexvision.engine.workdir import WorkdirError

    try:
        results = evaluate_checkpoint(
            _CONFIG.value, _WORKDIR.value,
            patch_sizes=[int(p) for p in _PATCH_SIZES.value] if _PATCH_SIZES.value else None,
            resolutions=[int(r) for r in _RESOLUTIONS.value] if _RESOLUTIONS.value else None,
            splits=_SPLITS.value, step=_STEP.value)
    except (WorkdirError, IncompatibleCheckpointError, CheckpointCorruptError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    format_table = (detection.format_table if _CONFIG.value.get("task") == "detection"
                    else evaluation.format_table)
    if jax.process_index() == 0:
        for split, table in results["splits"].items():
            print(format_table(table, f"{split} (checkpoint step {results['step']}):"))
        path = os.path.join(_WORKDIR.value, f"eval_step{results['step']}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {path}")


def run() -> None:
    """Console-script entry point ``flexvision-evaluate``."""
    from flexvision.engine.overrides import parse_flags

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
