r"""Command line: ``python -m flexvision.train --config configs/NAME.py[:arg] --workdir DIR``.

Overrides: ``--config.total_steps=300 --config.input.batch_size=32``, any model constructor
argument ``--config.model.kwargs.num_reg_tokens=4``, tuples ``--config.flexi.probs=(1,1,2,2,1,1)``.
Rerunning the same command on the same workdir resumes from its latest checkpoint; resuming
with changed run-defining keys (seed, batch size, patch sizes, model, ...) needs
``--allow_config_change`` (every config is kept in DIR/config_history.jsonl). Mistakes in flags,
config values or the workdir end with one ``error: ...`` line and exit status 2.

Multi-host: start one process per host with the same flags;
:func:`flexvision.engine.distributed.initialize` connects them from ``config.distributed``, the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables, or an
auto-detected cluster (TPU pod, SLURM, Open MPI); docs/sharding.md. The processes of one run
share its workdir (process 0 holds the lock for all).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file "
                                          "(optionally :arg).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume even though run-defining config keys (seed, batch "
    "size, patch sizes, model, data, ...) differ from the checkpoints' config.")
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator("workdir", lambda value: value is None or bool(value.strip()),
                         "must not be empty (an unset shell variable?): give the directory for "
                         "checkpoints and logs, e.g. --workdir=workdirs/my_run")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax/tfds INFO chatter off the console
    from flexvision.engine import distributed

    distributed.initialize(config=_CONFIG.value)
    from flexvision.engine.integrity import (CheckpointCorruptError, CheckpointWriteError,
                                             IncompatibleCheckpointError)
    from flexvision.engine.workdir import WorkdirError
    from flexvision.train.trainer import Preempted, train_and_evaluate
    from flexvision.train.validate import ConfigError

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                           allow_config_change=_ALLOW_CHANGE.value)
    except (ConfigError, WorkdirError, CheckpointWriteError, CheckpointCorruptError,
            IncompatibleCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Preempted as err:
        print(err, file=sys.stderr, flush=True)
        sys.exit(143)
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(3)


def run() -> None:
    """Console-script entry point ``flexvision-train``."""
    from flexvision.engine.overrides import parse_flags

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
