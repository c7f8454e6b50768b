"""Timing on an asynchronous runtime: warm-up, back-to-back calls ended by
``block_until_ready``, medians with their spread, interleaved comparisons, compile-time splits,
the machine's matmul FLOP/s as a reference, and persistent-cache event counts."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexvision.benchmark.analysis import xla_flops
from flexvision.benchmark.flops import choose_flops, lowered_flops


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: the median of the timed runs and its spread (min, max)."""

    median_s: float
    min_s: float
    max_s: float
    calls_per_run: int
    runs: int
    run_s: tuple[float, ...] = ()  # seconds per call of each timed run, in timing order

    def per_second(self, items_per_call: float) -> dict[str, float]:
        """Throughput at the median run, with the slowest and fastest run as the range."""
        return {"median": items_per_call / self.median_s,
                "min": items_per_call / self.max_s,
                "max": items_per_call / self.min_s}


def time_calls(call: Callable[[], Any], *, warmup: int = 2, repeats: int = 5,
               min_time: float = 0.2) -> Timing:
    """Times ``call`` (which must return something to block on) after ``warmup`` calls.

    Each of the ``repeats`` runs makes enough back-to-back calls to last about ``min_time``
    seconds (the count is fixed from the warm-up) and ends with ``jax.block_until_ready``, so the
    time covers the device work, not just the asynchronous dispatch.
    """
    return time_interleaved([call], warmup=warmup, repeats=repeats, min_time=min_time)[0]


def time_interleaved(calls: Sequence[Callable[[], Any]], *, warmup: int = 2, repeats: int = 5,
                     min_time: float = 0.2) -> list[Timing]:
    """Times several calls in alternation (run 1 of each, run 2 of each, ...), so that a change
    in machine load between runs hits every call alike; for comparisons of a few percent."""
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup and repeats must be >= 1, got warmup={warmup}, repeats={repeats}")
    per_call = []
    for call in calls:
        start = time.perf_counter()
        for _ in range(warmup):
            jax.block_until_ready(call())
        per_call.append((time.perf_counter() - start) / warmup)
    counts = [max(1, int(np.ceil(min_time / max(t, 1e-9)))) for t in per_call]
    runs: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for index, (call, count) in enumerate(zip(calls, counts)):
            start = time.perf_counter()
            out = None
            for _ in range(count):
                out = call()
            jax.block_until_ready(out)
            runs[index].append((time.perf_counter() - start) / count)
    return [Timing(statistics.median(r), min(r), max(r), c, repeats, tuple(r))
            for r, c in zip(runs, counts)]



def device_peak_bytes() -> int | None:
    """The device allocator's peak bytes in use (GPU/TPU); None where it keeps no statistics."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))


def compile_timed(jitted, *args, compiler_options: dict | None = None
                  ) -> tuple[Any, dict[str, float]]:
    """Lowers and compiles ``jitted`` for ``args`` (with XLA ``compiler_options``, e.g.
    ``{"xla_cpu_prefer_vector_width": 512}``); returns the executable and a dict with the seconds
    spent and ``lowered_flops``, the contraction FLOPs of the lowered program
    (``flops.lowered_flops``, counted outside the timed intervals)."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile(compiler_options or None)
    done = time.perf_counter()
    return compiled, {"lower_s": traced - start, "xla_compile_s": done - traced,
                      "compile_s": done - start, "lowered_flops": lowered_flops(lowered).flops}


def matmul_reference(size: int = 2048, dtype=jnp.float32) -> tuple[Callable[[], Any], float]:
    """A compiled (size, size) @ (size, size) ``jnp.dot`` as a call, and its FLOP count
    (``flops.choose_flops``: XLA's, unless it is missing or absurd as on GPU, where the cuBLAS
    custom call reads -1; then the lowered program's 2 * size**3)."""
    keys = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(keys[0], (size, size), dtype)
    b = jax.random.normal(keys[1], (size, size), dtype)
    lowered = jax.jit(jnp.dot).lower(a, b)
    compiled = lowered.compile()
    flops, _ = choose_flops(xla_flops(compiled), lowered_flops(lowered).flops)
    return (lambda: compiled(a, b)), flops


def matmul_flops_per_second(size: int = 2048, dtype=jnp.float32, *, warmup: int = 2,
                            repeats: int = 5, min_time: float = 0.3) -> dict[str, Any]:
    """The machine's matmul throughput: a (size, size) @ (size, size) ``jnp.dot`` timed as the
    models are. The FLOP count is 2 * size**3 (see :func:`matmul_reference`)."""
    call, flops = matmul_reference(size, dtype)
    timing = time_calls(call, warmup=warmup, repeats=repeats, min_time=min_time)
    return {"size": size, "dtype": jnp.dtype(dtype).name, "flops": flops,
            "flops_per_s": timing.per_second(flops), "seconds": dataclasses.asdict(timing)}


class CompileEvents:
    """Counts JAX's persistent-cache events (hits, misses) while active."""

    NAMES = {"/jax/compilation_cache/cache_hits": "cache_hits",
             "/jax/compilation_cache/cache_misses": "cache_misses",
             "/jax/compilation_cache/compile_requests_use_cache": "cache_requests"}

    def __init__(self):
        self.counts = {v: 0 for v in self.NAMES.values()}

    def _listener(self, event: str, **_):
        if event in self.NAMES:
            self.counts[self.NAMES[event]] += 1

    def __enter__(self):
        jax.monitoring.register_event_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_listener(self._listener)


def enable_persistent_cache(cache_dir: str) -> None:
    """Every executable goes to (and comes from) ``cache_dir``, however fast or small."""
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
