"""A training workdir's guards: one run at a time, no stale orbax leftovers, a config history.

- :class:`WorkdirLock`: ``workdir/lock``, held with ``flock`` for the whole run. The kernel
  drops an flock when its process dies (kill -9, crash, OOM), so a killed run never leaves the
  workdir locked: a lock file whose holder is gone is stale and simply taken over. A second run
  on a live lock stops at once with :class:`WorkdirInUseError` naming the holder (pid, host,
  start time). Multi-host runs: the processes of one run share the workdir by design; process 0
  takes the lock and broadcasts the outcome over JAX's runtime
  (``multihost_utils.broadcast_one_to_all``), so every process of the run stops or goes on
  together, and a second multi-host run is refused by its own process 0.
- :func:`clean_stale_tmp`: removes ``*.orbax-checkpoint-tmp-*`` folders that a crashed run left
  in the checkpoints folder (only under the lock: nobody else can be writing them).
- :func:`check_and_record_config`: ``config.json`` is the config of the latest start and
  ``config_history.jsonl`` keeps every config the workdir was started with (one JSON line per
  change: the step it took effect at, the changed keys, the whole config). Resuming with a
  change to a key that defines the run (seed, batch size, patch sizes, model, data, ...) is
  refused unless explicitly allowed; see :data:`FREE_KEYS` and :data:`TUNABLE_KEYS`.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import socket
from typing import Any

import jax
from absl import logging

LOCK_FILE = "lock"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
TMP_PATTERN = "*.orbax-checkpoint-tmp*"

# Keys that only change how a run is operated, not what it computes: change them freely.
FREE_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "eval", "eval.*",
             "compilation_cache_dir", "input.data_dir", "mesh", "sharding", "sharding.*",
             "distributed", "distributed.*")
# Keys a resumed run may change on purpose (the NaN guard's advice: lower the learning rate,
# longer warmup, gradient clipping; a longer run): allowed with a warning, recorded in history.
TUNABLE_KEYS = ("lr", "schedule.*", "optax.grad_clip_norm", "total_steps")


class WorkdirError(ValueError):
    """A workdir argument or state that cannot be used (the message says why and the fix)."""


class WorkdirInUseError(WorkdirError):
    """Another live run holds the workdir's lock."""


class ConfigChangeError(WorkdirError):
    """Resuming with a config that differs from the one the checkpoints were written with."""


def check_workdir_arg(workdir: Any) -> str:
    """The workdir as an absolute path; WorkdirError for None/empty/blank (an unset shell
    variable in ``--workdir=$DIR``), which would otherwise train into the current directory."""
    if workdir is None or not str(workdir).strip():
        raise WorkdirError(f"--workdir is empty ({workdir!r}): give the directory for "
                           f"checkpoints and logs, e.g. --workdir=workdirs/my_run (an unset "
                           f"shell variable expands to nothing)")
    return os.path.abspath(os.path.expanduser(str(workdir)))


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        return (f"pid {info.get('pid')} on host {info.get('host')}, started "
                f"{info.get('started')}")
    except (OSError, ValueError):
        return "another process"


class WorkdirLock:
    """Exclusive lock on a workdir for the lifetime of a run (see the module docstring)::

        with WorkdirLock(workdir):
            ...train...

    Raises WorkdirInUseError on entry when a live run holds it.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None

    def _try_acquire(self) -> str | None:
        """Takes the lock; returns None, or why it could not."""
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return (f"workdir {self.workdir} is in use by another run ({_holder(self.path)}); "
                        f"wait for it to finish, stop it, or use another --workdir")
            logging.warning("cannot lock %s (%s): this filesystem does not support flock, so a "
                            "second run on the same workdir will not be detected", self.path, err)
            return None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "processes": jax.process_count()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        return None

    def acquire(self) -> "WorkdirLock":
        if jax.process_count() == 1:
            problem = self._try_acquire()
        else:  # one run = all processes of the JAX runtime: process 0 decides for all
            import numpy as np
            from jax.experimental import multihost_utils

            problem = self._try_acquire() if jax.process_index() == 0 else None
            refused = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
            if int(refused) and problem is None:
                problem = (f"workdir {self.workdir} is in use by another run (process 0 found "
                           f"its lock {self.path} held)")
        if problem:
            raise WorkdirInUseError(problem)
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def clean_stale_tmp(checkpoints_dir: str) -> list[str]:
    """Removes ``*.orbax-checkpoint-tmp*`` folders (checkpoints a crashed or killed run did not
    finish; orbax never reads them) from ``checkpoints_dir``. Call it only while holding the
    workdir's lock. Returns the removed paths (process 0 removes; other processes return [])."""
    if jax.process_index() != 0 or not os.path.isdir(checkpoints_dir):
        return []
    removed = []
    for name in sorted(os.listdir(checkpoints_dir)):
        path = os.path.join(checkpoints_dir, name)
        if fnmatch.fnmatch(name, TMP_PATTERN) and os.path.isdir(path):
            try:
                shutil.rmtree(path)
                removed.append(path)
            except OSError as err:  # harmless: orbax never reads them
                logging.warning("could not remove unfinished checkpoint folder %s: %s", path, err)
    if removed:
        logging.warning("removed %d unfinished checkpoint folder(s) left by an earlier run: %s",
                        len(removed), ", ".join(removed))
    return removed


def check_writable(directory: str) -> None:
    """Writes and removes a probe file in ``directory`` (in its parent while it does not exist
    yet: nothing is created); CheckpointWriteError naming the folder and the OS error when it
    cannot (read-only mount, permissions, full disk), so that the run stops before training
    instead of at its first save."""
    from flexvision.engine.integrity import CheckpointWriteError, os_error_text

    where = directory if os.path.isdir(directory) else os.path.dirname(directory.rstrip("/"))
    probe = os.path.join(where, f".write_probe_{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        error = CheckpointWriteError(
            f"the checkpoint folder {directory} is not writable: {os_error_text(err)}; nothing "
            f"was trained. Fix its permissions or free disk space, or use another --workdir")
        error.errno = err.errno
        raise error from err


# --------------------------------------------------------------------------------------------
# Config history
# --------------------------------------------------------------------------------------------

def config_to_dict(config: Any) -> dict:
    """A JSON round trip of an ml_collections config (what config.json holds)."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config, default=str))
    return json.loads(config.to_json_best_effort())


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def config_changes(previous: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs ('<absent>' if new/gone),
    lists and tuples compared alike (JSON has no tuples)."""
    old, new = _flatten(previous), _flatten(current)
    absent = "<absent>"
    return [(k, old.get(k, absent), new.get(k, absent)) for k in sorted(set(old) | set(new))
            if old.get(k, absent) != new.get(k, absent)]


def read_history(workdir: str) -> list[dict]:
    """The entries of ``config_history.jsonl``; a workdir from before the history existed gets
    its config.json as the only entry."""
    path = os.path.join(workdir, HISTORY_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    legacy = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(legacy):
        with open(legacy, encoding="utf-8") as f:
            return [{"start_step": 0, "changed": [], "config": json.load(f),
                     "note": "from config.json, written before the history existed"}]
    return []


def _replace(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def check_and_record_config(config: Any, workdir: str, resume_step: int | None, *,
                            allow_change: bool = False) -> list[tuple[str, Any, Any]]:
    """Compares ``config`` with the workdir's latest recorded config and records it.

    With ``resume_step`` None (nothing to resume) any change is recorded silently. When resuming:
    changes to :data:`FREE_KEYS` pass, changes to :data:`TUNABLE_KEYS` pass with a warning, and
    any other change raises ConfigChangeError (naming the step, every changed key with its old
    and new value, and the fix) unless ``allow_change``. Every start with a changed config adds
    a line to ``config_history.jsonl``; ``config.json`` is rewritten only then. Returns the
    changes. Process 0 writes; every process checks.
    """
    current = config_to_dict(config)
    history = read_history(workdir)
    previous = history[-1]["config"] if history else None
    changes = config_changes(previous, current) if previous is not None else []
    if previous is not None and not changes:
        return []
    if resume_step is not None and previous is not None:
        refused = [c for c in changes if not _matches(c[0], FREE_KEYS + TUNABLE_KEYS)]
        tuned = [c for c in changes if _matches(c[0], TUNABLE_KEYS)]
        listing = lambda cs: ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in cs)  # noqa: E731
        if refused and not allow_change:
            raise ConfigChangeError(
                f"checkpoint step {resume_step} in {os.path.join(workdir, 'checkpoints')} was "
                f"written with another config: {listing(refused)}. Resuming would silently mix "
                f"two runs; use a new workdir or the same config, or pass --allow_config_change "
                f"to resume anyway (recorded in {os.path.join(workdir, HISTORY_FILE)})")
        if refused:
            logging.warning("resuming step %d with a changed config (--allow_config_change): %s",
                            resume_step, listing(refused))
        if tuned:
            logging.warning("resuming step %d with changed %s", resume_step, listing(tuned))
    if jax.process_index() == 0:
        entry = {"start_step": int(resume_step or 0),
                 "time": datetime.datetime.now().isoformat(timespec="seconds"),
                 "changed": [k for k, _, _ in changes], "config": current}
        # whole-file replacements: other processes of the run may be reading them right now
        _replace(os.path.join(workdir, HISTORY_FILE),
                 "".join(json.dumps(h) + "\n" for h in history + [entry]))
        _replace(os.path.join(workdir, CONFIG_FILE), json.dumps(current, indent=2,
                                                                sort_keys=True))
    return changes
