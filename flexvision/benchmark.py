"""Speed benchmark for every registered model: compile time, images/s, FLOPs, utilization, memory.

For each configuration (model x resolution x patch size) it measures, in one process:

* compile seconds (trace + lowering, and XLA compilation, reported separately and summed);
* steady inference and train-step throughput in images/s: after warm-up, ``repeats`` timed runs,
  each of enough back-to-back calls to last ``min_time`` seconds, every run ended with
  ``block_until_ready``; the median run is reported with the min and max (the spread);
* the FLOPs of one call from XLA's own cost analysis (``compiled.cost_analysis()["flops"]``) and
  the FLOP/s achieved at the median speed;
* peak memory: the executable's live buffers from ``compiled.memory_analysis()`` (arguments +
  outputs + temporaries - donated aliases) and, where the device reports it, its peak bytes in use;
* the machine's own matmul FLOP/s (a large ``jnp.dot``, same timing method) in float32 and in the
  chosen dtype, and each model's utilization of it.

A train step is what the trainer runs: forward in train mode, softmax cross-entropy, backward,
an optax update (adamw or sgd), with the state donated; BatchNorm models update ``batch_stats``.

The random-patch-size benchmark (``--random_patch_steps N``) times N FlexiViT training steps whose
patch size is drawn per step from ``np.random.default_rng((seed, step))`` as in training, split into
compile and run time, in separate fresh processes that share a persistent compilation cache: the
first process fills it, the second compiles nothing (its cache hits are counted and shown).

Examples::

    python -m flexvision.benchmark --models vit_small_patch16_224 --batch_size 32 --resolutions 224
    python -m flexvision.benchmark --models 'flexivit_*' --patch_sizes 8,16,32 --json out.json
    python -m flexvision.benchmark --random_patch_steps 20 --random_patch_model flexivit_small
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import importlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flexvision
from flexvision import registry

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FLEXIVIT_PATCH_SIZES = (8, 10, 12, 15, 16, 20, 24, 30, 40, 48)
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


# ----------------------------------------------------------------------------------------------
# Timing and XLA analysis


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: the median of the timed runs and its spread (min, max)."""

    median_s: float
    min_s: float
    max_s: float
    calls_per_run: int
    runs: int

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
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup and repeats must be >= 1, got warmup={warmup}, repeats={repeats}")
    start = time.perf_counter()
    for _ in range(warmup):
        jax.block_until_ready(call())
    per_call = (time.perf_counter() - start) / warmup
    calls = max(1, int(np.ceil(min_time / max(per_call, 1e-9))))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - start) / calls)
    return Timing(statistics.median(runs), min(runs), max(runs), calls, repeats)


def time_interleaved(calls: Sequence[Callable[[], Any]], *, warmup: int = 2, repeats: int = 5,
                     min_time: float = 0.2) -> list[Timing]:
    """Times several calls in alternation (run 1 of each, run 2 of each, ...), so that a change
    in machine load between runs hits every call alike; for comparisons of a few percent."""
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
    return [Timing(statistics.median(r), min(r), max(r), c, repeats) for r, c in zip(runs, counts)]


def xla_flops(compiled) -> float | None:
    """FLOPs of one execution according to XLA's cost analysis (None if the backend has none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per partition
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def memory_summary(compiled) -> dict[str, int | None]:
    """The executable's buffer sizes from ``compiled.memory_analysis()``.

    ``peak_bytes`` = arguments + outputs + temporaries - donated aliases: every buffer the
    executable holds live at once in the worst case (XLA's own accounting of its allocations).
    """
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        stats = None
    if stats is None:
        return {"peak_bytes": None}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    out = {name.replace("_size_in_bytes", "_bytes"): int(getattr(stats, name, 0) or 0)
           for name in fields}
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                         - out["alias_bytes"])
    return out


def device_peak_bytes() -> int | None:
    """The device allocator's peak bytes in use (GPU/TPU); None where it keeps no statistics."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))


def compile_timed(jitted, *args, compiler_options: dict | None = None
                  ) -> tuple[Any, dict[str, float]]:
    """Lowers and compiles ``jitted`` for ``args`` (with XLA ``compiler_options``, e.g.
    ``{"xla_cpu_prefer_vector_width": 512}``); returns the executable and the seconds spent."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile(compiler_options or None)
    done = time.perf_counter()
    return compiled, {"lower_s": traced - start, "xla_compile_s": done - traced,
                      "compile_s": done - start}


def matmul_reference(size: int = 2048, dtype=jnp.float32) -> tuple[Callable[[], Any], float]:
    """A compiled (size, size) @ (size, size) ``jnp.dot`` as a call, and its XLA FLOP count."""
    keys = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(keys[0], (size, size), dtype)
    b = jax.random.normal(keys[1], (size, size), dtype)
    compiled = jax.jit(jnp.dot).lower(a, b).compile()
    return (lambda: compiled(a, b)), (xla_flops(compiled) or 2.0 * size ** 3)


def matmul_flops_per_second(size: int = 2048, dtype=jnp.float32, *, warmup: int = 2,
                            repeats: int = 5, min_time: float = 0.3) -> dict[str, Any]:
    """The machine's matmul throughput: a (size, size) @ (size, size) ``jnp.dot`` timed as the
    models are. The FLOP count is XLA's (equal to 2 * size**3)."""
    keys = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(keys[0], (size, size), dtype)
    b = jax.random.normal(keys[1], (size, size), dtype)
    compiled = jax.jit(jnp.dot).lower(a, b).compile()
    flops = xla_flops(compiled) or 2.0 * size ** 3
    timing = time_calls(lambda: compiled(a, b), warmup=warmup, repeats=repeats, min_time=min_time)
    return {"size": size, "dtype": jnp.dtype(dtype).name, "flops": flops,
            "flops_per_s": timing.per_second(flops), "seconds": dataclasses.asdict(timing)}


_REPEATED_BLOCK = re.compile(r"_\d+(?=/)")  # blocks_7/ -> blocks_*/ (same layer, every block)
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_HLO_OP_NAME = re.compile(r"op_name=\"([^\"]+)\"")
_HLO_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_HLO_MATMUL = re.compile(r" (?:dot|convolution)\(")


def hlo_instructions(compiled) -> dict[str, dict[str, Any]]:
    """Instruction name -> {'op_name': the JAX op that produced it (HLO metadata), 'matmul':
    whether it is or fuses a dot/convolution} in the optimized HLO of ``compiled``: the names
    the profiler's per-instruction events carry."""
    computation_has_matmul: dict[str, bool] = {}
    lines, current = [], None
    for line in compiled.as_text().splitlines():
        header = _HLO_COMPUTATION.match(line)
        if header:
            current = header.group(1)
            computation_has_matmul[current] = False
            continue
        instruction = _HLO_INSTRUCTION.match(line)
        if instruction and current is not None:
            if _HLO_MATMUL.search(line):
                computation_has_matmul[current] = True
            lines.append(line)
    table = {}
    for line in lines:
        name = _HLO_INSTRUCTION.match(line).group(1)
        op_name = _HLO_OP_NAME.search(line)
        called = _HLO_CALLS.findall(line)
        table[name] = {"op_name": op_name.group(1) if op_name else name,
                       "matmul": bool(_HLO_MATMUL.search(line))
                       or any(computation_has_matmul.get(c, False) for c in called)}
    return table


def op_kind(entry: dict[str, Any]) -> str:
    """Coarse class of an instruction: 'matmul' (dot/conv, fused or not), else the primitive that
    names it (its fusion's root op: 'mul', 'reduce_sum', 'transpose', ...)."""
    if entry["matmul"]:
        return "matmul"
    return entry["op_name"].rstrip("/").split("/")[-1].split("[")[0] or "other"


def profile_calls(compiled, call: Callable[[], Any], *, calls: int = 3,
                  logdir: str | None = None, top: int = 12) -> dict[str, Any]:
    """Runs ``call`` ``calls`` times under ``jax.profiler`` and sums the device time of each HLO
    instruction (the events XLA's runtime records, e.g. one per fusion), per call.

    Returns the instructions that took longest with their JAX op names, and the time per kind of
    op ('matmul' for dot_general/conv fusions, else the primitive that names the fusion): what
    bounds a model's speed, read off the executable that was timed.
    """
    logdir = logdir or tempfile.mkdtemp(prefix="flexvision_profile_")
    jax.block_until_ready(call())
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(call())
    traces = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True),
                    key=os.path.getmtime)
    if not traces:
        return {"logdir": logdir, "error": "the profiler wrote no trace"}
    with gzip.open(traces[-1], "rt", encoding="utf-8") as f:
        events = json.load(f).get("traceEvents", [])
    names = hlo_instructions(compiled)
    per_instruction: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            per_instruction[event["name"]] += event.get("dur", 0) / 1e6 / calls
    total = sum(per_instruction.values())
    per_kind: dict[str, float] = collections.defaultdict(float)
    for instruction, seconds in per_instruction.items():
        per_kind[op_kind(names[instruction])] += seconds
    per_layer: dict[tuple[str, str], float] = collections.defaultdict(float)
    for instruction, seconds in per_instruction.items():
        per_layer[(op_kind(names[instruction]),
                   _REPEATED_BLOCK.sub("_*", names[instruction]["op_name"]))] += seconds
    ranked = sorted(per_instruction.items(), key=lambda item: -item[1])
    return {"logdir": logdir, "instruction_seconds_per_call": total,
            "by_kind": {k: {"seconds": v, "fraction": v / total if total else 0.0}
                        for k, v in sorted(per_kind.items(), key=lambda item: -item[1])},
            "by_op_summed_over_blocks": [
                {"kind": kind, "op_name": op, "seconds": t, "fraction": t / total if total else 0.0}
                for (kind, op), t in sorted(per_layer.items(), key=lambda item: -item[1])[:top]],
            "top": [{"instruction": i, "op_name": names[i]["op_name"], "seconds": t,
                     "kind": op_kind(names[i]),
                     "fraction": t / total if total else 0.0} for i, t in ranked[:top]]}


def _short_op(op_name: str) -> str:
    """An op path without the repeated wrapper names linen adds (jit(...)/Module/Module._method)."""
    parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "jvp(", "transpose("))
             and "._" not in p]
    return "/".join(parts)[-90:]


def format_profile(title: str, profile: dict) -> str:
    if "error" in profile:
        return f"profile {title}: {profile['error']}"
    lines = [f"profile {title}: {1e3 * profile['instruction_seconds_per_call']:.1f} ms of HLO "
             f"instructions per call (trace in {profile['logdir']})",
             "  by kind: " + ", ".join(f"{k} {100 * v['fraction']:.0f}%"
                                       for k, v in list(profile["by_kind"].items())[:8])]
    lines.append("  ops summed over repeated blocks (blocks_* = every block):")
    for entry in profile["by_op_summed_over_blocks"]:
        lines.append(f"  {1e3 * entry['seconds']:8.2f} ms {100 * entry['fraction']:5.1f}%  "
                     f"{entry['kind']:<10} {_short_op(entry['op_name'])}")
    lines.append("  longest single instructions:")
    for entry in profile["top"][:5]:
        lines.append(f"  {1e3 * entry['seconds']:8.2f} ms {100 * entry['fraction']:5.1f}%  "
                     f"{entry['kind']:<10} {_short_op(entry['op_name'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Models


def takes_patch_size(model) -> bool:
    """Whether the model accepts ``patch_size=`` (the flexible-patch ViT family): the model
    contract's ``flex_kwargs``."""
    return "patch_size" in model.flex_kwargs


def parse_resolution(text: str | int | Sequence[int]) -> tuple[int, int]:
    """``224`` -> (224, 224); ``"160x256"`` -> (160, 256) as (height, width)."""
    if isinstance(text, int):
        return (text, text)
    if not isinstance(text, str):
        height, width = text
        return (int(height), int(width))
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes, default=0) <= 0:
        raise ValueError(f"resolution {text!r} is not understood: give one positive integer "
                         f"(224) or HEIGHTxWIDTH (160x256)")
    return (sizes[0], sizes[-1])


def cross_entropy_loss(outputs, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; models with several heads (DeiT-distilled) average them."""
    heads = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    losses = [optax.softmax_cross_entropy_with_integer_labels(h.astype(jnp.float32), labels).mean()
              for h in heads]
    return sum(losses) / len(losses)


def make_optimizer(name: str, learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """The optimizers the trainer uses: adamw (with weight decay) or sgd with momentum."""
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=0.05)
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=0.9)
    raise ValueError(f"optimizer {name!r} is not supported: use 'adamw' or 'sgd'")


@dataclasses.dataclass
class Workload:
    """One model and its variables, with the jittable inference and train-step functions."""

    name: str
    model: Any
    variables: dict
    patch_kwargs: dict
    has_batch_stats: bool
    optimizer: optax.GradientTransformation

    def infer(self, variables, images):
        return self.model.apply(variables, images, train=False, **self.patch_kwargs)

    def init_train_state(self):
        params = self.variables["params"]
        extra = {k: v for k, v in self.variables.items() if k != "params"}
        return {"params": params, "opt_state": self.optimizer.init(params), "extra": extra}

    def train_step(self, state, images, labels, rng):
        """Forward (train mode) + backward + optax update, as one jitted trainer step."""
        mutable = ["batch_stats"] if self.has_batch_stats else False

        def loss_fn(params):
            variables = {"params": params, **state["extra"]}
            out = self.model.apply(variables, images, train=True, rngs={"dropout": rng},
                                   mutable=mutable, **self.patch_kwargs)
            logits, updates = out if mutable else (out, {})
            return cross_entropy_loss(logits, labels), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        changes, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], changes)
        extra = {**state["extra"], **updates}
        return {"params": params, "opt_state": opt_state, "extra": extra}, loss


def build_workload(name: str, *, resolution: tuple[int, int], patch_size: int | None,
                   dtype: str, optimizer: str, overrides: dict | None = None,
                   seed: int = 0) -> Workload:
    """Creates registered model ``name`` and its float32 variables for one input size;
    ``overrides`` may come from JSON (``create_model`` puts them in the fields' types)."""
    model = flexvision.create_model(name, dtype=DTYPES[dtype], **(overrides or {}))
    patch_kwargs = {}
    if takes_patch_size(model) and patch_size is not None:
        patch_kwargs = {"patch_size": int(patch_size)}
    images = jnp.zeros((1, *resolution, 3), jnp.float32)
    init = jax.jit(functools.partial(model.init, train=False, **patch_kwargs))
    # The initializer runs once and is not timed: XLA's -O0 compiles its hundreds of per-parameter
    # RNG draws several times faster (22 s -> 4 s for a small HRNet on 2 cores).
    init = init.lower(jax.random.PRNGKey(seed), images).compile(INIT_COMPILER_OPTIONS)
    variables = _unbox(dict(init(jax.random.PRNGKey(seed), images)))
    return Workload(name, model, variables, patch_kwargs, "batch_stats" in variables,
                    make_optimizer(optimizer))


def _unbox(tree):
    """Strips flax's logical-partitioning boxes: the benchmark runs unsharded."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    return nn.meta.unbox(tree)


def count_parameters(variables) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables.get("params", {}))))


def benchmark_config(name: str, *, batch_size: int, resolution: tuple[int, int],
                     patch_size: int | None, dtype: str = "float32", optimizer: str = "adamw",
                     overrides: dict | None = None, inference: bool = True, train: bool = True,
                     warmup: int = 2, repeats: int = 5, min_time: float = 0.2,
                     seed: int = 0, profile: bool = False,
                     reference: tuple[Callable[[], Any], float] | None = None,
                     compiler_options: dict | None = None) -> dict[str, Any]:
    """Measures one (model, batch, resolution, patch size, dtype) configuration; with
    ``profile`` also the per-instruction time breakdown of each phase (:func:`profile_calls`).

    With ``reference`` (a matmul call and its FLOPs, :func:`matmul_reference`) each phase is
    timed interleaved with the matmul, so that ``utilization_interleaved`` compares the two under
    the same machine load (the honest figure on a shared machine). ``compiler_options`` go to
    XLA for both measured executables (e.g. to compare XLA CPU options in one process)."""
    work = build_workload(name, resolution=resolution, patch_size=patch_size, dtype=dtype,
                          optimizer=optimizer, overrides=overrides, seed=seed)
    key = jax.random.PRNGKey(seed)
    images = jax.random.normal(key, (batch_size, *resolution, 3), jnp.float32)
    labels = jax.random.randint(key, (batch_size,), 0, 2)
    result: dict[str, Any] = {
        "model": name, "family": registry.model_family(name), "batch_size": batch_size,
        "resolution": list(resolution), "patch_size": work.patch_kwargs.get("patch_size"),
        "dtype": dtype, "optimizer": optimizer, "overrides": overrides or {},
        "compiler_options": compiler_options or {},
        "parameters": count_parameters(work.variables), "has_batch_stats": work.has_batch_stats,
    }
    if inference:
        compiled, seconds = compile_timed(jax.jit(work.infer), work.variables, images,
                                          compiler_options=compiler_options)
        timing, ref_timing = _timed(lambda: compiled(work.variables, images), reference,
                                    warmup=warmup, repeats=repeats, min_time=min_time)
        result["inference"] = _phase_report(compiled, seconds, timing, batch_size, reference,
                                            ref_timing)
        if profile:
            result["inference"]["profile"] = profile_calls(
                compiled, lambda: compiled(work.variables, images))
    if train:
        state = work.init_train_state()
        step = jax.jit(work.train_step, donate_argnums=0)
        compiled, seconds = compile_timed(step, state, images, labels, key,
                                          compiler_options=compiler_options)
        holder = {"state": state}

        def call():
            holder["state"], loss = compiled(holder["state"], images, labels, key)
            return loss

        timing, ref_timing = _timed(call, reference, warmup=warmup, repeats=repeats,
                                    min_time=min_time)
        result["train"] = _phase_report(compiled, seconds, timing, batch_size, reference,
                                        ref_timing)
        if profile:
            result["train"]["profile"] = profile_calls(compiled, call)
    result["device_peak_bytes"] = device_peak_bytes()
    return result


def flexi_overhead(name: str, *, batch_size: int, resolution: tuple[int, int], patch_size: int,
                   dtype: str = "float32", overrides: dict | None = None, warmup: int = 2,
                   repeats: int = 7, min_time: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """Cost of a flexible-patch forward at ``patch_size`` over the same model built natively at
    that patch size (kernel stored at P x P, position grid at the token grid: no PI-resize, no
    posemb resampling, which is also what caching the resized parameters for inference gives).

    Both are timed interleaved; the FLOP overhead comes from XLA's cost analysis (noise-free).
    """
    flexible = build_workload(name, resolution=resolution, patch_size=patch_size, dtype=dtype,
                              optimizer="sgd", overrides=overrides, seed=seed)
    if not flexible.patch_kwargs:
        raise ValueError(f"{name} does not take patch_size=: the comparison needs a flexible-patch "
                         f"model, e.g. {registry.list_models('flexivit*')[:3]}")
    grid = (resolution[0] // patch_size, resolution[1] // patch_size)
    native_overrides = {**(overrides or {}), "patch_size": (patch_size, patch_size),
                        "posemb_grid": grid}
    native = build_workload(name, resolution=resolution, patch_size=None, dtype=dtype,
                            optimizer="sgd", overrides=native_overrides, seed=seed)
    images = jax.random.normal(jax.random.PRNGKey(seed), (batch_size, *resolution, 3))
    compiled = [jax.jit(w.infer).lower(w.variables, images).compile() for w in (flexible, native)]
    calls = [functools.partial(c, w.variables, images) for c, w in zip(compiled, (flexible, native))]
    flex_time, native_time = time_interleaved(calls, warmup=warmup, repeats=repeats,
                                              min_time=min_time)
    flops = [xla_flops(c) for c in compiled]
    return {"model": name, "patch_size": patch_size, "resolution": list(resolution),
            "batch_size": batch_size, "dtype": dtype, "native_overrides": native_overrides,
            "flexible_images_per_s": flex_time.per_second(batch_size),
            "native_images_per_s": native_time.per_second(batch_size),
            "time_overhead": flex_time.median_s / native_time.median_s - 1.0,
            "flexible_flops": flops[0], "native_flops": flops[1],
            "flop_overhead": flops[0] / flops[1] - 1.0 if all(flops) else None}


def compare_compiler_options(name: str, option_sets: Sequence[dict], *, batch_size: int,
                             resolution: tuple[int, int], patch_size: int | None = None,
                             phase: str = "inference", dtype: str = "float32",
                             optimizer: str = "adamw", overrides: dict | None = None,
                             warmup: int = 1, repeats: int = 5, min_time: float = 0.2,
                             seed: int = 0, matmul_size: int = 2048) -> dict[str, Any]:
    """A/B of XLA compile options (e.g. ``[{}, {"xla_cpu_prefer_vector_width": 512}]``) on one
    model in one process: one executable per option set, all timed interleaved with each other
    and with the matmul reference, so that every variant sees the same machine load.

    Each variant's output (logits, or the first step's loss) is compared with the first one's:
    ``relative_difference`` = max |out - out_0| / max(1, max |out_0|), to tell a pure scheduling
    change (0) from one that changes the arithmetic (library GEMMs, fusion order)."""
    if phase not in ("inference", "train"):
        raise ValueError(f"phase must be 'inference' or 'train', got {phase!r}")
    work = build_workload(name, resolution=resolution, patch_size=patch_size, dtype=dtype,
                          optimizer=optimizer, overrides=overrides, seed=seed)
    key = jax.random.PRNGKey(seed)
    images = jax.random.normal(key, (batch_size, *resolution, 3), jnp.float32)
    labels = jax.random.randint(key, (batch_size,), 0, 2)
    calls, compiled_all, outputs, seconds_all = [], [], [], []
    for options in option_sets:
        if phase == "inference":
            compiled, seconds = compile_timed(jax.jit(work.infer), work.variables, images,
                                              compiler_options=options)
            call = functools.partial(compiled, work.variables, images)
        else:
            state = jax.tree.map(jnp.copy, work.init_train_state())  # each variant donates its own
            compiled, seconds = compile_timed(jax.jit(work.train_step, donate_argnums=0), state,
                                              images, labels, key, compiler_options=options)
            holder = {"state": state}

            def call(compiled=compiled, holder=holder):
                holder["state"], loss = compiled(holder["state"], images, labels, key)
                return loss
        outputs.append(np.asarray(call(), np.float32))
        calls.append(call)
        compiled_all.append(compiled)
        seconds_all.append(seconds)
    reference_call, reference_flops = matmul_reference(matmul_size, DTYPES[dtype])
    *timings, reference_timing = time_interleaved(calls + [reference_call], warmup=warmup,
                                                  repeats=repeats, min_time=min_time)
    reference_rate = reference_timing.per_second(reference_flops)
    scale = max(1.0, float(np.abs(outputs[0]).max()))
    variants = []
    for options, compiled, seconds, timing, out in zip(option_sets, compiled_all, seconds_all,
                                                       timings, outputs):
        flops = xla_flops(compiled)
        variants.append({
            "compiler_options": dict(options), **seconds,
            "images_per_s": timing.per_second(batch_size),
            "speedup": timings[0].median_s / timing.median_s,
            "utilization_interleaved": (flops / timing.median_s / reference_rate["median"]
                                        if flops else None),
            "relative_difference": float(np.abs(out - outputs[0]).max()) / scale})
    return {"model": name, "phase": phase, "batch_size": batch_size,
            "resolution": list(resolution), "dtype": dtype, "variants": variants,
            "reference_matmul_flops_per_s": reference_rate}


def format_compiler_options(c: dict) -> str:
    lines = [f"compiler options, {c['model']} {c['phase']} batch {c['batch_size']} (timed "
             f"interleaved; matmul {_fmt_rate(c['reference_matmul_flops_per_s'], 1e9)} GFLOP/s):"]
    for v in c["variants"]:
        lines.append(f"  {json.dumps(v['compiler_options']):<70} {_fmt_rate(v['images_per_s'])} "
                     f"img/s  x{v['speedup']:.3f}  util {100 * (v['utilization_interleaved'] or 0):.0f}%"
                     f"  rel. diff {v['relative_difference']:.1e}")
    return "\n".join(lines)


def _timed(call, reference, **kwargs) -> tuple[Timing, Timing | None]:
    if reference is None:
        return time_calls(call, **kwargs), None
    model_timing, reference_timing = time_interleaved([call, reference[0]], **kwargs)
    return model_timing, reference_timing


def _phase_report(compiled, seconds: dict, timing: Timing, batch_size: int,
                  reference=None, reference_timing: Timing | None = None) -> dict[str, Any]:
    flops = xla_flops(compiled)
    report = {**seconds, "images_per_s": timing.per_second(batch_size),
              "seconds_per_step": dataclasses.asdict(timing), "flops": flops,
              "flops_per_s": timing.per_second(flops) if flops else None,
              "memory": memory_summary(compiled)}
    if reference_timing is not None and flops:
        report["reference_matmul_flops_per_s"] = reference_timing.per_second(reference[1])
        report["utilization_interleaved"] = (report["flops_per_s"]["median"]
                                             / report["reference_matmul_flops_per_s"]["median"])
    return report


def add_utilization(result: dict, matmul: dict[str, dict]) -> None:
    """Adds each phase's achieved FLOP/s as a fraction of the matmul FLOP/s in its dtype."""
    reference = matmul.get(result["dtype"]) or matmul.get("float32")
    for phase in ("inference", "train"):
        report = result.get(phase)
        if report and report["flops_per_s"] and reference:
            report["utilization"] = (report["flops_per_s"]["median"]
                                     / reference["flops_per_s"]["median"])


# ----------------------------------------------------------------------------------------------
# Random patch size training


def draw_patch_size(seed: int, step: int, patch_sizes: Sequence[int]) -> int:
    """The step's patch size: uniform over ``patch_sizes`` from ``np.random.default_rng((seed,
    step))``, so every host and every resumed run draws the same one (FlexiViT, Sec. 3.1)."""
    return int(np.random.default_rng((seed, step)).choice(np.asarray(patch_sizes)))


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


def random_patch_run(name: str, *, steps: int, patch_sizes: Sequence[int], batch_size: int,
                     resolution: tuple[int, int], dtype: str = "float32",
                     optimizer: str = "adamw", overrides: dict | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """N training steps with the per-step patch size drawn as in training.

    One executable per patch size, compiled when the size first comes up. ``compile_s`` =
    ``lower_s`` (Python tracing and lowering to StableHLO, which no cache skips) +
    ``xla_compile_or_cache_load_s`` (XLA compilation, or reading the executable from the
    persistent cache on a hit); ``run_s`` is the time of the steps themselves, each blocked on so
    that the split is exact.
    """
    work = build_workload(name, resolution=resolution, patch_size=patch_sizes[0], dtype=dtype,
                          optimizer=optimizer, overrides=overrides, seed=seed)
    if not work.patch_kwargs:
        raise ValueError(f"{name} does not take patch_size=, so it cannot train with random patch "
                         f"sizes: pick a flexible-patch model, e.g. "
                         f"{registry.list_models('flexivit*')[:3]}")
    key = jax.random.PRNGKey(seed)
    images = jax.random.normal(key, (batch_size, *resolution, 3), jnp.float32)
    labels = jax.random.randint(key, (batch_size,), 0, 2)
    state = work.init_train_state()
    executables: dict[int, Any] = {}
    compile_s = lower_s = xla_s = run_s = 0.0
    drawn = []
    start = time.perf_counter()
    with CompileEvents() as events:
        for step in range(steps):
            size = draw_patch_size(seed, step, patch_sizes)
            drawn.append(size)
            if size not in executables:
                sized = dataclasses.replace(work, patch_kwargs={"patch_size": size})
                compiled, seconds = compile_timed(jax.jit(sized.train_step, donate_argnums=0),
                                                  state, images, labels, key)
                executables[size] = compiled
                compile_s += seconds["compile_s"]
                lower_s += seconds["lower_s"]
                xla_s += seconds["xla_compile_s"]
            tick = time.perf_counter()
            state, loss = executables[size](state, images, labels, key)
            jax.block_until_ready(loss)
            run_s += time.perf_counter() - tick
    return {"model": name, "steps": steps, "patch_sizes": list(patch_sizes),
            "drawn": drawn, "executables": len(executables), "compile_s": compile_s,
            "lower_s": lower_s, "xla_compile_or_cache_load_s": xla_s,
            "run_s": run_s, "total_s": time.perf_counter() - start, **events.counts,
            "final_loss": float(loss)}


def random_patch_benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs the random-patch benchmark ``args.random_patch_runs`` times, each in a fresh process
    sharing one persistent compilation cache, as a restarted training job would."""
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="flexvision_jax_cache_")
    runs = []
    for index in range(args.random_patch_runs):
        command = [sys.executable, "-m", "flexvision.benchmark", "--_random_patch_worker",
                   "--cache_dir", cache_dir, *_random_patch_argv(args)]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, check=False,
                              env={**os.environ, "PYTHONPATH": _pythonpath()})
        if proc.returncode:
            raise RuntimeError(f"random-patch run {index + 1} failed:\n{proc.stderr[-4000:]}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        report.update(run=index + 1, cache_dir=cache_dir,
                      process_s=time.perf_counter() - start)
        runs.append(report)
    return runs


def _random_patch_argv(args) -> list[str]:
    argv = ["--random_patch_steps", str(args.random_patch_steps),
            "--random_patch_model", args.random_patch_model,
            "--random_patch_sizes", ",".join(str(p) for p in args.random_patch_sizes),
            "--batch_size", str(args.batch_size), "--dtype", args.dtype,
            "--optimizer", args.optimizer, "--seed", str(args.seed),
            "--resolutions", "x".join(str(r) for r in args.random_patch_resolution)]
    if args.import_modules:
        argv += ["--import_modules", args.import_modules]
    if args.overrides:
        argv += ["--overrides", json.dumps(args.overrides)]
    return argv


def _pythonpath() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    existing = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + existing if existing else "")


# ----------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from err


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _json_list_of_dicts(text: str) -> list[dict]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON list of objects, got {text!r}") from err
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise argparse.ArgumentTypeError(f"expected a non-empty JSON list of objects, e.g. "
                                         f"'[{{}}, {{\"xla_cpu_prefer_vector_width\": 512}}]', "
                                         f"got {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flexvision.benchmark", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--models", default="vit_small_patch16_224",
        help="comma-separated registered names or shell patterns ('flexivit_*'); 'all' for every "
             "registered model")
    add("--batch_size", type=int, default=32)
    add("--resolutions", default="224",
        help="comma-separated sizes, each N or HEIGHTxWIDTH (e.g. 224,160x256)")
    add("--patch_sizes", type=_int_list, default=None,
        help="comma-separated patch sizes for models taking patch_size= (default: the model's own)")
    add("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (params stay f32)")
    add("--optimizer", choices=("adamw", "sgd"), default="adamw")
    add("--overrides", type=_json_dict, default=None,
        help='JSON object of model constructor overrides, e.g. \'{"num_classes": 10}\'')
    add("--compiler_options", type=_json_dict, default=None,
        help='JSON object of XLA options for the measured executables, e.g. '
             '\'{"xla_cpu_prefer_vector_width": 512}\' (per executable, unlike XLA_FLAGS)')
    add("--no_inference", action="store_true", help="skip the inference measurement")
    add("--no_train", action="store_true", help="skip the train-step measurement")
    add("--warmup", type=int, default=2, help="untimed calls before timing")
    add("--repeats", type=int, default=5, help="timed runs; the median is reported with min-max")
    add("--min_time", type=float, default=0.5, help="seconds each timed run lasts at least")
    add("--matmul_size", type=int, default=2048, help="side of the reference square matmul")
    add("--seed", type=int, default=0)
    add("--json", dest="json_path", default=None, help="write every result to this JSON file")
    add("--profile", action="store_true",
        help="also trace each phase with jax.profiler and print where the time goes per HLO "
             "instruction and per kind of op (matmul vs the rest)")
    add("--compare_native", action="store_true",
        help="for flexible-patch models at each --patch_sizes P, also time the same model built "
             "natively at P (no PI-resize) interleaved with it, and report the overhead")
    add("--compare_compiler_options", type=_json_list_of_dicts, default=None,
        help='JSON list of XLA option sets to A/B on each model in this process, timed '
             'interleaved, e.g. \'[{}, {"xla_cpu_prefer_vector_width": 512}]\' (first = baseline)')
    add("--random_patch_steps", type=int, default=0,
        help="also run N training steps with a random patch size per step (FlexiViT training)")
    add("--random_patch_model", default="flexivit_small")
    add("--random_patch_sizes", type=_int_list, default=list(FLEXIVIT_PATCH_SIZES))
    add("--random_patch_resolution", type=lambda t: parse_resolution(t), default=(240, 240))
    add("--random_patch_runs", type=int, default=2,
        help="fresh processes sharing the persistent compilation cache (2: cold, then warm)")
    add("--cache_dir", default=None,
        help="persistent compilation cache for the random-patch runs (default: a new temp dir)")
    add("--import_modules", default="",
        help="comma-separated modules to import first (they may register extra models)")
    add("--_random_patch_worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def resolve_models(spec: str) -> list[str]:
    """Registered names for a comma-separated list of names and shell patterns."""
    if spec == "all":
        return registry.list_models()
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if any(c in item for c in "*?["):
            matched = registry.list_models(item)
            if not matched:
                raise ValueError(f"pattern {item!r} matches no registered model; "
                                 f"flexvision.list_models() lists them")
            names += matched
        else:
            registry.resolve(item)  # a clear ValueError for unknown names
            names.append(item)
    return list(dict.fromkeys(names))


def environment() -> dict[str, Any]:
    """What the figures depend on: the device, the software and how busy the machine is."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_average": load,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _fmt_rate(rate: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not rate:
        return "-"
    return (f"{rate['median'] / scale:.{digits}f} "
            f"[{rate['min'] / scale:.{digits}f}-{rate['max'] / scale:.{digits}f}]")


def format_table(results: list[dict], matmul: dict[str, dict]) -> str:
    """A plain-text table: one row per configuration and phase."""
    header = ("model", "res", "patch", "dtype", "phase", "compile s", "img/s median [min-max]",
              "GFLOP/img", "GFLOP/s", "util", "util (interleaved)", "peak MiB")
    rows = [header]
    for r in results:
        for phase in ("inference", "train"):
            p = r.get(phase)
            if not p:
                continue
            gflop = p["flops"] / r["batch_size"] / 1e9 if p["flops"] else None
            rows.append((
                r["model"], "x".join(map(str, r["resolution"])), str(r["patch_size"] or "-"),
                r["dtype"], phase, f"{p['compile_s']:.1f}", _fmt_rate(p["images_per_s"]),
                f"{gflop:.4g}" if gflop is not None else "-",
                f"{p['flops_per_s']['median'] / 1e9:.1f}" if p["flops_per_s"] else "-",
                f"{100 * p['utilization']:.0f}%" if "utilization" in p else "-",
                f"{100 * p['utilization_interleaved']:.0f}%" if "utilization_interleaved" in p
                else "-",
                f"{p['memory']['peak_bytes'] / 2**20:.1f}" if p["memory"]["peak_bytes"] else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not results:
        lines = []
    for dtype, m in matmul.items():
        lines.append(f"matmul {m['size']}^2 {dtype}: "
                     f"{_fmt_rate(m['flops_per_s'], 1e9)} GFLOP/s (median [min-max])")
    return "\n".join(lines)


def format_overhead(c: dict) -> str:
    return (f"{c['model']} at patch {c['patch_size']} vs native /{c['patch_size']}: "
            f"{_fmt_rate(c['flexible_images_per_s'])} vs {_fmt_rate(c['native_images_per_s'])} "
            f"img/s, time overhead {100 * c['time_overhead']:+.2f}%, FLOP overhead "
            f"{100 * (c['flop_overhead'] or 0):+.3f}%")


def format_random_patch(runs: list[dict]) -> str:
    lines = ["random patch size training (each run a fresh process, one persistent cache):"]
    for r in runs:
        lines.append(f"  run {r['run']}: {r['steps']} steps, {r['executables']} executables, "
                     f"compile {r['compile_s']:.2f} s (trace+lower {r['lower_s']:.2f} s, XLA "
                     f"compile or cache load {r['xla_compile_or_cache_load_s']:.2f} s), "
                     f"run {r['run_s']:.2f} s, total "
                     f"{r['total_s']:.2f} s, cache hits {r['cache_hits']} / misses "
                     f"{r['cache_misses']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark described by the command line; returns (and prints) the report."""
    args = make_parser().parse_args(argv)
    for module in filter(None, (m.strip() for m in args.import_modules.split(","))):
        importlib.import_module(module)
    resolutions = [parse_resolution(t) for t in args.resolutions.split(",") if t.strip()]
    if args._random_patch_worker:  # pylint: disable=protected-access
        enable_persistent_cache(args.cache_dir)
        report = random_patch_run(
            args.random_patch_model, steps=args.random_patch_steps,
            patch_sizes=args.random_patch_sizes, batch_size=args.batch_size,
            resolution=resolutions[0], dtype=args.dtype, optimizer=args.optimizer,
            overrides=args.overrides, seed=args.seed)
        print(json.dumps(report))
        return report

    report: dict[str, Any] = {"environment": environment(), "args": {
        k: v for k, v in vars(args).items() if not k.startswith("_")}}
    timing = dict(warmup=args.warmup, repeats=args.repeats, min_time=args.min_time)
    matmul = {"float32": matmul_flops_per_second(args.matmul_size, jnp.float32, **timing)}
    if args.dtype != "float32":
        matmul[args.dtype] = matmul_flops_per_second(args.matmul_size, DTYPES[args.dtype],
                                                     **timing)
    results = []
    names = resolve_models(args.models) if args.models else []
    reference = matmul_reference(args.matmul_size, DTYPES[args.dtype]) if names else None
    for name in names:
        for resolution in resolutions:
            for patch in (args.patch_sizes or [None]):
                result = benchmark_config(
                    name, batch_size=args.batch_size, resolution=resolution, patch_size=patch,
                    dtype=args.dtype, optimizer=args.optimizer, overrides=args.overrides,
                    inference=not args.no_inference, train=not args.no_train,
                    warmup=args.warmup, repeats=args.repeats, min_time=args.min_time,
                    seed=args.seed, profile=args.profile, reference=reference,
                    compiler_options=args.compiler_options)
                results.append(result)
                if result["patch_size"] is None:
                    break  # the model ignores patch sizes: one configuration is enough
    # The machine is measured again after the models; the faster of the two measurements is the
    # reference, so that a busy moment at the start cannot inflate the models' utilization.
    for dtype, first in list(matmul.items()):
        again = matmul_flops_per_second(args.matmul_size, DTYPES[dtype], **timing)
        first["repeat_flops_per_s"] = again["flops_per_s"]
        if again["flops_per_s"]["median"] > first["flops_per_s"]["median"]:
            first["first_flops_per_s"], first["flops_per_s"] = first["flops_per_s"], again["flops_per_s"]
    for result in results:
        add_utilization(result, matmul)
    report.update(matmul=matmul, results=results)
    if results or matmul:
        print(format_table(results, matmul))
    for result in results:
        for phase in ("inference", "train"):
            if result.get(phase, {}).get("profile"):
                title = (f"{result['model']} {phase} {'x'.join(map(str, result['resolution']))}"
                         f" patch {result['patch_size']}")
                print(format_profile(title, result[phase]["profile"]))
    if args.compare_native:
        comparisons = []
        for result in results:
            if result["patch_size"] is not None:
                comparisons.append(flexi_overhead(
                    result["model"], batch_size=args.batch_size,
                    resolution=tuple(result["resolution"]), patch_size=result["patch_size"],
                    dtype=args.dtype, overrides=args.overrides, warmup=args.warmup,
                    repeats=max(args.repeats, 5), min_time=args.min_time, seed=args.seed))
                print(format_overhead(comparisons[-1]))
        report["flexi_overhead"] = comparisons
    if args.compare_compiler_options:
        report["compiler_options_ab"] = []
        for name in names:
            for phase in [p for p, skip in (("inference", args.no_inference),
                                            ("train", args.no_train)) if not skip]:
                ab = compare_compiler_options(
                    name, args.compare_compiler_options, batch_size=args.batch_size,
                    resolution=resolutions[0], patch_size=(args.patch_sizes or [None])[0],
                    phase=phase, dtype=args.dtype, optimizer=args.optimizer,
                    overrides=args.overrides, warmup=args.warmup, repeats=args.repeats,
                    min_time=args.min_time, seed=args.seed, matmul_size=args.matmul_size)
                report["compiler_options_ab"].append(ab)
                print(format_compiler_options(ab))
    if args.random_patch_steps:
        runs = random_patch_benchmark(args)
        report["random_patch"] = runs
        print(format_random_patch(runs))
    report["environment"]["load_average_end"] = os.getloadavg()
    report["environment"]["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=_json_default)
        print(f"wrote {args.json_path}")
    return report


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def run() -> None:
    """Console-script entry point (``flexvision-benchmark``)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    run()
