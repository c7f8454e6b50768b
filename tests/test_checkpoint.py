"""Orbax checkpointing: keep-last-N, exact restore, half-written checkpoints never picked up."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from flexvision.engine.checkpoint import Checkpointer, abstract_like


def _state(value):
    return {"step": jnp.asarray(value, jnp.int32),
            "params": {"w": jnp.full((3, 4), value, jnp.float32), "b": jnp.arange(4.0) + value}}


def test_keep_last_n_and_exact_restore(tmp_path):
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    for step in (1, 2, 3, 4):
        checkpointer.save(step, _state(step), {"step": step, "data_position": step})
    checkpointer.wait()
    assert checkpointer.all_steps() == [3, 4] and checkpointer.latest_step() == 4
    state, meta = checkpointer.restore(4, abstract_like(_state(0)))
    checkpointer.close()
    assert meta == {"step": 4, "data_position": 4}
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(_state(4))):
        np.testing.assert_array_equal(a, b)


def test_half_written_checkpoint_is_ignored(tmp_path):
    directory = tmp_path / "ckpt"
    checkpointer = Checkpointer(str(directory), keep=3)
    checkpointer.save(5, _state(5), {"step": 5, "data_position": 5})
    checkpointer.close()
    # What a process killed in the middle of writing step 9 leaves behind: orbax writes into a
    # temporary directory and renames it only once everything is on disk.
    partial = directory / "9.orbax-checkpoint-tmp-1234"
    os.makedirs(partial / "state")
    (partial / "state" / "junk").write_bytes(b"\0" * 16)
    reopened = Checkpointer(str(directory), keep=3)
    assert reopened.latest_step() == 5 and reopened.all_steps() == [5]
    state, _ = reopened.restore(5, abstract_like(_state(0)))
    reopened.close()
    np.testing.assert_array_equal(state["params"]["w"], np.full((3, 4), 5, np.float32))
