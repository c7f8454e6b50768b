"""Metric logging for people and tools: tqdm progress, JSON lines and TensorBoard events.

Only process 0 writes; other processes get a writer whose methods do nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import tensorflow as tf
from tqdm.auto import tqdm


class MetricWriter:
    """Appends ``{"step": s, ...}`` lines to workdir/metrics.jsonl and writes tf.summary scalars."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        with self._tb.as_default():
            for name, value in scalars.items():
                tf.summary.scalar(name, value, step=int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


class Progress:
    """A tqdm bar over training steps showing loss, patch size, images/s and the ETA."""

    def __init__(self, start: int, total: int, batch_size: int):
        self.batch_size = batch_size
        self._bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                         disable=jax.process_index() != 0, file=sys.stdout, mininterval=1.0)
        self._last_step, self._last_time = start, time.perf_counter()

    def advance(self, step: int) -> None:
        """Moves the bar to ``step`` (host-side only, no device sync)."""
        self._bar.update(step - self._bar.n)

    def log(self, step: int, **postfix) -> float:
        """Shows ``postfix`` and images/s since the previous log; returns images/s."""
        now = time.perf_counter()
        rate = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
        self.advance(step)
        self._bar.set_postfix(**postfix, img_s=f"{rate:.0f}")
        self._last_step, self._last_time = step, now
        return rate

    def reset_clock(self, step: int) -> None:
        """Restarts the images/s clock at ``step`` (after evals, which are not training)."""
        self._last_step, self._last_time = step, time.perf_counter()

    def write(self, message: str) -> None:
        if jax.process_index() == 0:
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
