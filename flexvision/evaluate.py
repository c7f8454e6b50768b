r"""Evaluate the latest checkpoint of a training workdir at any patch sizes / resolutions.

    python -m flexvision.evaluate --config configs/flexivit_digits.py --workdir DIR \
        --patch_sizes=4,8,16 --resolutions=48,64 [--split=test] [--step=N]

Uses the config's eval pp / splits / patch sizes / resolutions unless given on the command
line; prints one table per split and writes DIR/eval_step<N>.json.
"""

from __future__ import annotations

import json
import os

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

    Returns ``{"step": N, "splits": {split: table}}`` (tables as in train.evaluator).
    """
    import numpy as np

    from flexvision.data import pipeline
    from flexvision.train import optim, sharding, trainer
    from flexvision.train.checkpoint import Checkpointer
    from flexvision.train.evaluator import Evaluator

    trainer.enable_compilation_cache(config)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first "
                         f"with python -m flexvision.train --config ... --workdir {workdir}")
    mesh = sharding.create_mesh(config.get("mesh") or [("data", -1)])
    model = trainer.build_model(config)
    tx, _ = optim.make_optimizer(config)
    sample = next(pipeline.eval_batches(config.input, config.eval.pp,
                                        (splits or config.eval.splits)[0], config.eval.batch_size))
    abstract, _ = trainer.abstract_train_state(model, tx, np.shape(sample["image"])[1:], config,
                                               mesh)
    state, _ = checkpointer.restore(step, abstract)
    checkpointer.close()
    evaluator = Evaluator(model, trainer.make_loss(config), config, mesh,
                          patch_sizes=patch_sizes, resolutions=resolutions, splits=splits)
    return {"step": int(step), "splits": evaluator.run(trainer.eval_variables(state))}


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax/tfds INFO chatter off the console
    import jax

    from flexvision.train.evaluator import format_table

    results = evaluate_checkpoint(
        _CONFIG.value, _WORKDIR.value,
        patch_sizes=[int(p) for p in _PATCH_SIZES.value] if _PATCH_SIZES.value else None,
        resolutions=[int(r) for r in _RESOLUTIONS.value] if _RESOLUTIONS.value else None,
        splits=_SPLITS.value, step=_STEP.value)
    if jax.process_index() == 0:
        for split, table in results["splits"].items():
            print(format_table(table, f"{split} (checkpoint step {results['step']}):"))
        path = os.path.join(_WORKDIR.value, f"eval_step{results['step']}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {path}")


def run() -> None:
    """Console-script entry point ``flexvision-evaluate``."""
    app.run(main)


if __name__ == "__main__":
    run()
