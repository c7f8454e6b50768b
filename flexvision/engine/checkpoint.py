"""Orbax checkpoints of the train state plus a small JSON record (step, data position).

Saves are asynchronous: ``save`` returns once the arrays are copied off the devices and the
write continues in the background. Orbax writes each step into a temporary directory and
renames it when complete, so a run killed mid-write leaves nothing that ``latest_step`` would
pick up. Only the last ``keep`` checkpoints are kept (``keep=0``: all of them). Each finished
checkpoint gets a checksum manifest (flexvision.engine.integrity); a failed background write
is raised by the next :meth:`Checkpointer.check` (call it every step) as CheckpointWriteError.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from flexvision.engine import integrity


class Checkpointer:
    """``ocp.CheckpointManager`` over ``directory`` holding items 'state' and 'meta'."""

    def __init__(self, directory: str, keep: int | None = 3, async_save: bool = True):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"keep (config.keep_checkpoints) must be an integer >= 0, the number "
                             f"of newest checkpoints kept (0 keeps all of them), got {keep!r}")
        self.directory = os.path.abspath(directory)
        self._pending: list[int] = []  # saved steps not yet confirmed on disk
        self._failed = False
        options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest fully written checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Starts saving ``state`` and ``meta`` (JSON-able) as checkpoint ``step``."""
        self.wait()  # orbax would wait for the previous save anyway; this reports its failure
        try:
            started = self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as err:  # noqa: BLE001 -- orbax/tensorstore wrap OS errors variously
            raise integrity.write_error(err, self.directory, step) from err
        self._pending.append(int(step))
        return started

    def check(self) -> None:
        """Raises CheckpointWriteError (path, OS error) if a background save has failed; cheap
        while a save is still running: call it every step."""
        if self._pending and not self._manager.is_saving_in_progress():
            self.wait()

    def restore_newest_good(self, abstract_state: Any, quarantine_to: str | None = None,
                            steps: list[int] | None = None) -> tuple[int, Any, dict]:
        """(step, state, meta) of the newest checkpoint (of ``steps``, default all) that
        verifies and fits ``abstract_state``, skipping corrupt ones with a warning
        (integrity.restore_newest_good); with ``quarantine_to`` (the workdir) they are moved to
        its corrupt_checkpoints/ so that training can write those steps again."""
        def on_bad(step, reason):
            del reason
            if quarantine_to is not None and jax.process_index() == 0:
                moved = integrity.quarantine(self.step_dir(step), quarantine_to)
                logging.warning("moved corrupt checkpoint step %d to %s", step, moved)

        try:
            step, (state, meta) = integrity.restore_newest_good(
                self.all_steps() if steps is None else steps, self.step_dir,
                lambda s: self.restore(s, abstract_state),
                abstract_state, directory=self.directory, on_bad=on_bad)
        finally:
            if quarantine_to is not None:
                self._manager.reload()
        return step, state, meta

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores checkpoint ``step`` into the shapes/shardings of ``abstract_state``."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        """Blocks until pending async saves are on disk and checksummed; CheckpointWriteError
        (naming the step, folder and OS error) if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 -- orbax re-raises the writer thread's error
            step = self._pending[-1] if self._pending else None
            self._pending, self._failed = [], True
            try:
                self._manager.close()  # nothing left to finish; no half-open manager at exit
            except Exception:  # noqa: BLE001
                pass
            raise integrity.write_error(err, self.directory, step) from err
        pending, self._pending = self._pending, []
        if jax.process_index() == 0:
            for step in pending:
                if os.path.isdir(self.step_dir(step)):  # not already rotated out by max_to_keep
                    try:
                        integrity.write_manifest(self.step_dir(step))
                    except OSError as err:  # e.g. the disk filled up right after orbax's write
                        self._failed = True
                        self._manager.close()
                        raise integrity.write_error(err, self.directory, step) from err

    def close(self) -> None:
        if self._failed:
            return
        try:
            self.wait()
        finally:
            self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a concrete tree of arrays, for restoring into."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
