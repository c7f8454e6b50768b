r"""Command line: ``python -m flexvision.train --config configs/NAME.py[:arg] --workdir DIR``.

Overrides: ``--config.total_steps=300 --config.input.batch_size=32``. Rerunning the same
command on the same workdir resumes from its latest checkpoint. Multi-host: start one process
per host with the same flags; :func:`flexvision.engine.distributed.initialize` connects them
from ``config.distributed``, the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
environment variables, or an auto-detected cluster (TPU pod, SLURM, Open MPI); docs/sharding.md.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file "
                                          "(optionally :arg).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax/tfds INFO chatter off the console
    from flexvision.engine import distributed

    distributed.initialize(config=_CONFIG.value)
    from flexvision.train.trainer import Preempted, train_and_evaluate

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except Preempted as err:
        print(err, file=sys.stderr, flush=True)
        sys.exit(143)
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(3)


def run() -> None:
    """Console-script entry point ``flexvision-train``."""
    app.run(main)


if __name__ == "__main__":
    run()
