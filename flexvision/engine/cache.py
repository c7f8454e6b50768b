"""JAX's persistent compilation cache: restarts, resumed runs and benchmark processes reuse
compiled executables instead of compiling them again."""

from __future__ import annotations

import os

import jax

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "flexvision",
                                 "jax_compilation_cache")


def enable_compilation_cache(cache_dir: str | None = None,
                             min_compile_time_secs: float = 0.5) -> str:
    """Turns on the persistent cache in ``cache_dir`` (default :data:`DEFAULT_CACHE_DIR`) for
    every executable that took at least ``min_compile_time_secs`` to compile, whatever its
    size (0 caches everything); returns the directory."""
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir
