"""What the benchmark measures: a registered model built at one size, its inference call and
the engine's train step (``flexvision.engine.step.make_train_step`` with the engine's optimizer
factory: the step the trainer runs), per configuration, per compiler-option set, against a
natively built model, and over random patch sizes drawn by the trainer's schedule."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flexvision
from flexvision import registry
from flexvision.benchmark.analysis import memory_summary, profile_calls, xla_flops
from flexvision.benchmark.flops import analytic_flops, choose_flops, datasheet_peak, utilization
from flexvision.benchmark.timing import (CompileEvents, Timing, compile_timed, device_peak_bytes,
                                         matmul_reference, time_calls, time_interleaved)
from flexvision.engine import optim, patch_schedule
from flexvision.layers.attention import record_attention_choices
from flexvision.engine.losses import mean_over_heads, softmax_xent
from flexvision.engine.sharding import unbox
from flexvision.engine.state import train_state
from flexvision.engine.step import accepts_patch_size, make_train_step, model_kwargs
from flexvision.layers.flex import to_pair

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FLEXIVIT_PATCH_SIZES = (8, 10, 12, 15, 16, 20, 24, 30, 40, 48)
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def parse_resolution(text: str | int | Sequence[int]) -> tuple[int, int]:
    """``224`` -> (224, 224); ``"160x256"`` -> (160, 256) as (height, width); ints and pairs
    go through ``flex.to_pair``. ValueError naming both accepted forms otherwise."""
    if not isinstance(text, str):
        return to_pair(text, "resolution")
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes, default=0) <= 0:
        raise ValueError(f"resolution {text!r} is not understood: give one positive integer "
                         f"(224) or HEIGHTxWIDTH (160x256)")
    return (sizes[0], sizes[-1])


OPTIMIZERS = {
    "adamw": {"name": "adam", "weight_decay": 0.05},
    "adam": {"name": "adam"},
    "sgd": {"name": "sgd", "kwargs": {"momentum": 0.9}},
    "lion": {"name": "lion", "weight_decay": 0.05},
}
"""``--optimizer`` choices: ``config.optax`` blocks for the engine's optimizer factory."""


def optimizer_config(name: str, learning_rate: float = 1e-3):
    """A trainer config holding just what ``engine.optim.make_optimizer`` reads: optimizer
    ``name`` (a key of :data:`OPTIMIZERS`) at a constant ``learning_rate``."""
    import ml_collections

    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not supported: use one of {sorted(OPTIMIZERS)}")
    return ml_collections.ConfigDict({
        "lr": learning_rate, "total_steps": 1, "schedule": {"decay_type": "constant"},
        "optax": dict(OPTIMIZERS[name])})


def make_optimizer(name: str, learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """The trainer's optimizer (``engine.optim.make_optimizer``: weight decay on kernels only)
    for ``name`` at a constant learning rate."""
    tx, _ = optim.make_optimizer(optimizer_config(name, learning_rate))
    return tx


@dataclasses.dataclass
class Workload:
    """One model and its variables with the engine's inference call and train step.

    The train step is ``engine.step.make_train_step`` (what the trainer jits): forward in train
    mode, softmax cross-entropy (averaged over the heads of multi-head models), backward, the
    optimizer update, the step counter; BatchNorm models update ``batch_stats``.
    """

    name: str
    model: Any
    variables: dict
    patch_size: int | None
    optimizer: optax.GradientTransformation
    seed: int = 0

    @property
    def has_batch_stats(self) -> bool:
        return "batch_stats" in self.variables

    def infer(self, variables, images):
        return self.model.apply(variables, images, train=False,
                                **model_kwargs(self.model, self.patch_size))

    def init_train_state(self) -> dict:
        return train_state(self.variables, self.optimizer)

    def train_step(self, patch_size: int | None = None) -> Callable:
        """``(state, batch) -> (state, metrics)`` at ``patch_size`` (default: the workload's)."""
        return make_train_step(self.model, self.optimizer, mean_over_heads(softmax_xent),
                               seed=self.seed, patch_size=patch_size or self.patch_size)

    def batch(self, batch_size: int, resolution: tuple[int, int]) -> dict:
        """A random batch: normal images, one-hot labels over the model's classes."""
        key = jax.random.PRNGKey(self.seed)
        images = jax.random.normal(key, (batch_size, *resolution, 3), jnp.float32)
        logits = jax.eval_shape(self.infer, self.variables, images[:1])
        num_classes = jax.tree_util.tree_leaves(logits)[0].shape[-1]
        labels = jax.nn.one_hot(jax.random.randint(key, (batch_size,), 0, 2), num_classes)
        return {"image": images, "labels": labels}


def build_workload(name: str, *, resolution: tuple[int, int], patch_size: int | None,
                   dtype: str, optimizer: str, overrides: dict | None = None,
                   seed: int = 0) -> Workload:
    """Creates registered model ``name`` and its float32 variables for one input size;
    ``overrides`` may come from JSON (``create_model`` puts them in the fields' types)."""
    model = flexvision.create_model(name, dtype=DTYPES[dtype], **(overrides or {}))
    patch_size = int(patch_size) if patch_size is not None and accepts_patch_size(model) else None
    images = jnp.zeros((1, *resolution, 3), jnp.float32)
    init = jax.jit(functools.partial(model.init, train=False,
                                     **model_kwargs(model, patch_size)))
    # The initializer runs once and is not timed: XLA's -O0 compiles its hundreds of per-parameter
    # RNG draws several times faster (22 s -> 4 s for a small HRNet on 2 cores).
    init = init.lower(jax.random.PRNGKey(seed), images).compile(INIT_COMPILER_OPTIONS)
    variables = unbox(dict(init(jax.random.PRNGKey(seed), images)))
    return Workload(name, model, variables, patch_size, make_optimizer(optimizer), seed)


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
    batch = work.batch(batch_size, resolution)
    images = batch["image"]
    result: dict[str, Any] = {
        "model": name, "family": registry.model_family(name), "batch_size": batch_size,
        "resolution": list(resolution), "patch_size": work.patch_size,
        "dtype": dtype, "optimizer": optimizer, "overrides": overrides or {},
        "compiler_options": compiler_options or {},
        "parameters": count_parameters(work.variables), "has_batch_stats": work.has_batch_stats,
    }
    choices: set[str] = set()
    if inference:
        with record_attention_choices() as recorded:
            compiled, seconds = compile_timed(jax.jit(work.infer), work.variables, images,
                                              compiler_options=compiler_options)
        choices.update(recorded)
        timing, ref_timing = _timed(lambda: compiled(work.variables, images), reference,
                                    warmup=warmup, repeats=repeats, min_time=min_time)
        result["inference"] = phase_report(
            compiled, seconds, timing, batch_size, reference, ref_timing,
            analytic=analytic_flops(result["family"], work.model, resolution, batch_size,
                                    work.patch_size), dtype=dtype)
        if profile:
            result["inference"]["profile"] = profile_calls(
                compiled, lambda: compiled(work.variables, images))
    if train:
        state = work.init_train_state()
        step = jax.jit(work.train_step(), donate_argnums=0)
        with record_attention_choices() as recorded:
            compiled, seconds = compile_timed(step, state, batch,
                                              compiler_options=compiler_options)
        choices.update(recorded)
        holder = {"state": state}

        def call():
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics["loss"]

        timing, ref_timing = _timed(call, reference, warmup=warmup, repeats=repeats,
                                    min_time=min_time)
        result["train"] = phase_report(compiled, seconds, timing, batch_size, reference,
                                        ref_timing, dtype=dtype)
        if profile:
            result["train"]["profile"] = profile_calls(compiled, call)
    result["device_peak_bytes"] = device_peak_bytes()
    result["attention"] = sorted(choices)  # implementations chosen (layers.attention)
    return result


@dataclasses.dataclass
class PreparedPhase:
    """One compiled phase ready to time: ``call()`` runs it once (a train step advances its own
    donated state), with what :func:`phase_report` needs afterwards."""

    call: Callable[[], Any]
    compiled: Any
    seconds: dict
    analytic: int | None
    attention: list[str]


def prepare_phase(name: str, phase: str, *, batch_size: int, resolution: tuple[int, int],
                  patch_size: int | None = None, dtype: str = "float32",
                  optimizer: str = "adamw", overrides: dict | None = None, seed: int = 0,
                  compiler_options: dict | None = None) -> PreparedPhase:
    """Builds and compiles ``phase`` ('inference' or 'train': the engine's train step) of
    registered model ``name`` without timing it, so that callers can time it interleaved with
    other calls (e.g. ``versus_timm``: flexvision and timm in alternation)."""
    if phase not in ("inference", "train"):
        raise ValueError(f"phase must be 'inference' or 'train', got {phase!r}")
    work = build_workload(name, resolution=resolution, patch_size=patch_size, dtype=dtype,
                          optimizer=optimizer, overrides=overrides, seed=seed)
    batch = work.batch(batch_size, resolution)
    with record_attention_choices() as recorded:
        if phase == "inference":
            compiled, seconds = compile_timed(jax.jit(work.infer), work.variables,
                                              batch["image"], compiler_options=compiler_options)
            call = functools.partial(compiled, work.variables, batch["image"])
        else:
            holder = {"state": work.init_train_state()}
            compiled, seconds = compile_timed(jax.jit(work.train_step(), donate_argnums=0),
                                              holder["state"], batch,
                                              compiler_options=compiler_options)

            def call():
                holder["state"], metrics = compiled(holder["state"], batch)
                return metrics["loss"]
    analytic = (analytic_flops(registry.model_family(name), work.model, resolution, batch_size,
                               work.patch_size) if phase == "inference" else None)
    return PreparedPhase(call, compiled, seconds, analytic, sorted(set(recorded)))


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
    if flexible.patch_size is None:
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
    batch = work.batch(batch_size, resolution)
    images = batch["image"]
    calls, compiled_all, outputs, seconds_all = [], [], [], []
    for options in option_sets:
        if phase == "inference":
            compiled, seconds = compile_timed(jax.jit(work.infer), work.variables, images,
                                              compiler_options=options)
            call = functools.partial(compiled, work.variables, images)
        else:
            state = jax.tree.map(jnp.copy, work.init_train_state())  # each variant donates its own
            compiled, seconds = compile_timed(jax.jit(work.train_step(), donate_argnums=0),
                                              state, batch, compiler_options=options)
            holder = {"state": state}

            def call(compiled=compiled, holder=holder):
                holder["state"], metrics = compiled(holder["state"], batch)
                return metrics["loss"]
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


def _timed(call, reference, **kwargs) -> tuple[Timing, Timing | None]:
    if reference is None:
        return time_calls(call, **kwargs), None
    model_timing, reference_timing = time_interleaved([call, reference[0]], **kwargs)
    return model_timing, reference_timing


def phase_report(compiled, seconds: dict, timing: Timing, batch_size: int,
                  reference=None, reference_timing: Timing | None = None, *,
                  analytic: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Timing, FLOPs and utilisation of one phase. ``flop_counts`` holds the three counts
    (analytic from the config where the family has a formula, lowered StableHLO, XLA's compiled
    cost analysis) and which one ``flops`` is (``flops.choose_flops``); utilisation is against the
    device's datasheet peak for ``dtype`` (None off the table, e.g. every CPU) and, with a
    reference, the matmul timed interleaved; an absurd fraction is None (``flops.utilization``)."""
    seconds = dict(seconds)
    lowered = seconds.pop("lowered_flops", None)
    xla = xla_flops(compiled)
    flops, used = choose_flops(xla, lowered)
    rates = timing.per_second(flops) if flops else None
    peak = datasheet_peak(jax.devices()[0].device_kind, dtype)
    report = {**seconds, "images_per_s": timing.per_second(batch_size),
              "seconds_per_step": dataclasses.asdict(timing), "flops": flops,
              "flop_counts": {"analytic": analytic, "lowered": lowered, "xla": xla, "used": used},
              "flops_per_s": rates, "memory": memory_summary(compiled),
              "datasheet_peak_flops_per_s": peak,
              "utilization_datasheet": utilization(rates and rates["median"], peak)[0]}
    if reference_timing is not None and flops:
        report["reference_matmul_flops_per_s"] = reference_timing.per_second(reference[1])
        report["utilization_interleaved"] = utilization(
            rates["median"], report["reference_matmul_flops_per_s"]["median"])[0]
    return report


def add_utilization(result: dict, matmul: dict[str, dict]) -> None:
    """Adds each phase's achieved FLOP/s as a fraction of the matmul FLOP/s in its dtype."""
    reference = matmul.get(result["dtype"]) or matmul.get("float32")
    for phase in ("inference", "train"):
        report = result.get(phase)
        if report and report["flops_per_s"] and reference:
            report["utilization"] = utilization(report["flops_per_s"]["median"],
                                                reference["flops_per_s"]["median"])[0]


def draw_patch_size(seed: int, step: int, patch_sizes: Sequence[int]) -> int:
    """The trainer's patch size for ``step`` with ``config.flexi.patch_sizes = patch_sizes``
    drawn uniformly (``engine.patch_schedule.patch_size_for_step``): the benchmark draws
    exactly what training draws."""
    return patch_schedule.patch_size_for_step(patch_schedule.uniform(patch_sizes), seed, step)


def random_patch_run(name: str, *, steps: int, patch_sizes: Sequence[int], batch_size: int,
                     resolution: tuple[int, int], dtype: str = "float32",
                     optimizer: str = "adamw", overrides: dict | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """N training steps of the engine's train step with the trainer's per-step patch size
    (:func:`draw_patch_size`).

    One executable per patch size, compiled when the size first comes up. ``compile_s`` =
    ``lower_s`` (Python tracing and lowering to StableHLO, which no cache skips) +
    ``xla_compile_or_cache_load_s`` (XLA compilation, or reading the executable from the
    persistent cache on a hit); ``run_s`` is the time of the steps themselves, each blocked on so
    that the split is exact.
    """
    work = build_workload(name, resolution=resolution, patch_size=patch_sizes[0], dtype=dtype,
                          optimizer=optimizer, overrides=overrides, seed=seed)
    if work.patch_size is None:
        raise ValueError(f"{name} does not take patch_size=, so it cannot train with random patch "
                         f"sizes: pick a flexible-patch model, e.g. "
                         f"{registry.list_models('flexivit*')[:3]}")
    batch = work.batch(batch_size, resolution)
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
                compiled, seconds = compile_timed(jax.jit(work.train_step(size), donate_argnums=0),
                                                  state, batch)
                executables[size] = compiled
                compile_s += seconds["compile_s"]
                lower_s += seconds["lower_s"]
                xla_s += seconds["xla_compile_s"]
            tick = time.perf_counter()
            state, metrics = executables[size](state, batch)
            loss = jax.block_until_ready(metrics["loss"])
            run_s += time.perf_counter() - tick
    return {"model": name, "steps": steps, "patch_sizes": list(patch_sizes),
            "drawn": drawn, "executables": len(executables), "compile_s": compile_s,
            "lower_s": lower_s, "xla_compile_or_cache_load_s": xla_s,
            "run_s": run_s, "total_s": time.perf_counter() - start, **events.counts,
            "final_loss": float(loss)}

