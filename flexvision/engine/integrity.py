"""Checkpoint integrity: checksums written with every checkpoint, verified before restoring.

Orbax makes a checkpoint appear atomically (it writes ``<step>.orbax-checkpoint-tmp-*`` and
renames it once every host is done), but it stores no checksum of the array data: a truncated
or deleted file ends in tensorstore/pytree errors that name no step, and a changed byte inside
an OCDBT data file restores silently. So each finished checkpoint gets a manifest,
``<step>/flexvision_checksums.json``, holding the size and SHA-256 of every file under it;
:func:`verify` recomputes them. Restoring walks the checkpoints newest first and takes the
newest one that verifies and fits the abstract state (:func:`restore_newest_good`), warning
about every one it skips; when none is usable the error names each step, the bad file and the
fix.

The manifest is written by process 0 after orbax has finalised the step (on a multi-host run
the checkpoint directory is shared, as orbax requires). A checkpoint without a manifest (written
before this module existed, or by a run killed between orbax's rename and the manifest write)
is restored without verification, with a warning; if orbax then fails to read it, it counts as
corrupt like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from typing import Any, Callable

import jax
from absl import logging
from etils import epath

MANIFEST = "flexvision_checksums.json"
_CHUNK = 1 << 22  # 4 MiB reads


class CheckpointCorruptError(RuntimeError):
    """No checkpoint of a workdir can be restored; the message names each step and file."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint holds another train state (model or optimizer) than the one asked for."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (read-only folder, full disk, ...); the run must stop."""


def _digest(path: epath.Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _files(step_dir: epath.Path) -> list[epath.Path]:
    out, stack = [], [step_dir]
    while stack:
        for path in stack.pop().iterdir():
            if path.is_dir():
                stack.append(path)
            elif path.name not in (MANIFEST, MANIFEST + ".tmp"):
                out.append(path)
    return sorted(out)


def write_manifest(step_dir: str | os.PathLike) -> dict[str, dict]:
    """Writes ``step_dir/flexvision_checksums.json``: ``{relative path: {size, sha256}}`` of
    every file in the finished checkpoint ``step_dir``. Returns the entries."""
    step_dir = epath.Path(step_dir)
    entries = {str(p.relative_to(step_dir)): {"size": p.stat().length, "sha256": _digest(p)}
               for p in _files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "files": entries}, indent=1, sort_keys=True))
    tmp.rename(step_dir / MANIFEST)
    return entries


def has_manifest(step_dir: str | os.PathLike) -> bool:
    return (epath.Path(step_dir) / MANIFEST).exists()


def verify(step_dir: str | os.PathLike) -> list[str] | None:
    """Problems found in checkpoint ``step_dir`` against its manifest, one string per bad file
    ("state/d/ab12: missing", "...: truncated (3 of 373 bytes)", "...: contents changed
    (checksum mismatch)"); ``[]`` when every file matches, None when there is no manifest."""
    step_dir = epath.Path(step_dir)
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        entries = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST}: unreadable ({err})"]
    problems = []
    for name, entry in sorted(entries.items()):
        file = step_dir / name
        if not file.exists():
            problems.append(f"{name}: missing")
            continue
        try:
            size = file.stat().length
            if size != entry["size"]:
                problems.append(f"{name}: truncated or extended ({size} of {entry['size']} "
                                f"bytes)")
            elif _digest(file) != entry["sha256"]:
                problems.append(f"{name}: contents changed (checksum mismatch)")
        except OSError as err:
            problems.append(f"{name}: unreadable ({err})")
    return problems


def _path_str(path: tuple) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def leaf_table(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(path): (tuple(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", "")))
            for path, leaf in leaves}


def saved_state_leaves(step_dir: str | os.PathLike, item: str = "state"
                       ) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"params/.../kernel": (shape, dtype)}`` of item ``item`` of a checkpoint, read from
    orbax's own metadata (no array is read)."""
    import orbax.checkpoint as ocp

    metadata = ocp.StandardCheckpointer().metadata(epath.Path(step_dir) / item)
    tree = getattr(metadata, "item_metadata", metadata)
    return leaf_table(getattr(tree, "tree", tree))


def state_mismatches(saved: dict, abstract: Any, limit: int = 3) -> list[str]:
    """How the saved leaves (:func:`saved_state_leaves`) differ from the abstract train state
    (ShapeDtypeStructs): "params/x/kernel: shape (16, 32) vs (24, 32)" (checkpoint vs this
    config), "params/y: only in this config", "opt_state/1/mu/z: only in the checkpoint".
    At most ``limit`` of each kind (params first), then a count."""
    wanted = leaf_table(abstract)
    order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params/"), k))  # noqa: E731
    shapes = [f"{k}: shape {saved[k][0]} vs {wanted[k][0]}" for k in order(saved)
              if k in wanted and saved[k][0] != wanted[k][0]]
    missing = [f"{k}: only in this config" for k in order(set(wanted) - set(saved))]
    extra = [f"{k}: only in the checkpoint" for k in order(set(saved) - set(wanted))]
    out = []
    for kind in (shapes, missing, extra):
        out += kind[:limit] + ([f"... {len(kind) - limit} more like it"] if len(kind) > limit
                               else [])
    return out


def quarantine(step_dir: str | os.PathLike, workdir: str | os.PathLike) -> str:
    """Moves a bad checkpoint out of the checkpoints folder, to
    ``workdir/corrupt_checkpoints/<step>-<unix time>``, so that the step can be written again.
    Returns the new path."""
    step_dir = epath.Path(step_dir)
    target = epath.Path(workdir) / "corrupt_checkpoints" / f"{step_dir.name}-{int(time.time())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(os.fspath(step_dir), os.fspath(target))
    return os.fspath(target)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def restore_newest_good(steps: list[int], step_dir: Callable[[int], str],
                        restore: Callable[[int], Any], abstract: Any, *, directory: str,
                        on_bad: Callable[[int, str], None] | None = None) -> tuple[int, Any]:
    """Restores the newest checkpoint of ``steps`` that verifies and fits ``abstract``.

    ``step_dir(step)`` is a checkpoint's folder, ``restore(step)`` reads it (orbax), ``abstract``
    the train state's ShapeDtypeStructs. A checkpoint whose files fail :func:`verify`, or that
    orbax cannot read, is skipped with a warning naming it (and passed to ``on_bad(step,
    reason)``, e.g. to move it aside). Returns (step, what ``restore`` returned).

    Raises IncompatibleCheckpointError, naming the step, the folder and the first differing
    leaves, when the newest intact checkpoint holds another model/optimizer state (falling back
    would only hide a config mistake), and CheckpointCorruptError when no checkpoint is usable.
    """
    bad: list[str] = []
    for step in sorted(steps, reverse=True):
        folder = step_dir(step)
        problems = verify(folder)
        reason = None
        if problems:
            reason = "; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3
                                                else "")
        else:
            if problems is None:
                logging.warning("checkpoint step %d in %s has no %s (written before checksums "
                                "existed, or interrupted right after orbax's rename); restoring "
                                "it unverified", step, directory, MANIFEST)
            try:
                saved = saved_state_leaves(folder)
            except Exception as err:  # noqa: BLE001 -- any unreadable metadata is corruption
                saved, reason = None, f"state/_METADATA unreadable ({_first_line(err)})"
            if saved is not None:
                mismatches = state_mismatches(saved, abstract)
                if mismatches:
                    raise IncompatibleCheckpointError(
                        f"checkpoint step {step} in {directory} was written for another "
                        f"model/optimizer: {'; '.join(mismatches)} (checkpoint vs this config); "
                        f"use a new workdir or the same config")
                try:
                    return step, restore(step)
                except Exception as err:  # noqa: BLE001 -- orbax/tensorstore raise many kinds
                    reason = f"orbax could not read it ({_first_line(err)})"
        bad.append(f"step {step}: {reason}")
        logging.warning("checkpoint step %d in %s is corrupt: %s; falling back to an older "
                        "checkpoint", step, directory, reason)
        if on_bad is not None:
            on_bad(step, reason)
    raise CheckpointCorruptError(
        f"no usable checkpoint in {directory}: {' | '.join(bad)}. Fix: restore these files from "
        f"a backup, or move {directory} away to train from scratch")


_OS_ERROR = re.compile(r"os_error_code='?(\d+)")
_FAILED_PATH = re.compile(r'(?:Failed writing|writing)[^"]*"([^"]+)"')  # tensorstore's wording


def os_error_text(err: BaseException) -> str:
    """"[Errno 28] No space left on device (FILE)" from an OSError or from the text of an
    orbax/tensorstore error that carries os_error_code; else the error's first line."""
    text = str(err)
    errno_value = getattr(err, "errno", None)
    match = _OS_ERROR.search(text)
    if errno_value is None and match:
        errno_value = int(match.group(1))
    path = getattr(err, "filename", None)
    if path is None:
        found = _FAILED_PATH.findall(text)
        path = found[-1] if found else None
    out = f"[Errno {errno_value}] {os.strerror(errno_value)}" if errno_value else _first_line(err)
    return out + (f" ({path})" if path else "")


def write_error(err: BaseException, directory: str, step: int | None) -> CheckpointWriteError:
    """The CheckpointWriteError for a failed write of checkpoint ``step`` into ``directory``:
    one line with the step, the folder, the OS error (errno, text) and the file."""
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    error = CheckpointWriteError(
        f"saving {what} to {directory} failed: {os_error_text(err)}; the run stopped. Earlier "
        f"checkpoints are intact: free disk space or fix the folder's permissions, then rerun "
        f"the same command to resume")
    match = _OS_ERROR.search(str(err))
    error.errno = getattr(err, "errno", None) or (int(match.group(1)) if match else None)
    return error
