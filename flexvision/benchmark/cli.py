"""Command line of the speed benchmark for every registered model: compile time, images/s,
FLOPs, utilization, memory.

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

The train step is the trainer's: ``flexvision.engine.step.make_train_step`` (forward in train
mode, softmax cross-entropy, backward, the optimizer update) with the optimizer from the
trainer's factory ``flexvision.engine.optim`` (``--optimizer``), the state donated; BatchNorm
models update ``batch_stats``. Each configuration's row is printed, and the ``--json`` file
rewritten, as soon as it is measured.

The random-patch-size benchmark (``--random_patch_steps N``) times N FlexiViT training steps whose
patch size is drawn per step by the trainer's schedule (``engine.patch_schedule``), split into
compile and run time, in separate fresh processes that share a persistent compilation cache: the
first process fills it, the second compiles nothing (its cache hits are counted and shown).

Examples::

    python -m flexvision.benchmark --models vit_small_patch16_224 --batch_size 32 --resolutions 224
    python -m flexvision.benchmark --models 'flexivit_*' --patch_sizes 8,16,32 --json out.json
    python -m flexvision.benchmark --random_patch_steps 20 --random_patch_model flexivit_small
"""


from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexvision import registry
from flexvision.benchmark.analysis import format_profile
from flexvision.benchmark.timing import matmul_flops_per_second, matmul_reference
from flexvision.benchmark.workloads import (DTYPES, FLEXIVIT_PATCH_SIZES, OPTIMIZERS,
                                            add_utilization, benchmark_config,
                                            compare_compiler_options, flexi_overhead,
                                            parse_resolution, random_patch_run)
from flexvision.engine.cache import enable_compilation_cache


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
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    existing = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + existing if existing else "")


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from err


def json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def json_list_of_dicts(text: str) -> list[dict]:
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
    add("--patch_sizes", type=int_list, default=None,
        help="comma-separated patch sizes for models taking patch_size= (default: the model's own)")
    add("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (params stay f32)")
    add("--optimizer", choices=sorted(OPTIMIZERS), default="adamw",
        help="the train step's optimizer, built by the trainer's factory (engine.optim): adamw "
             "(Adam + decoupled weight decay 0.05 on kernels), adam, sgd (momentum 0.9), lion")
    add("--overrides", type=json_dict, default=None,
        help='JSON object of model constructor overrides, e.g. \'{"num_classes": 10}\'')
    add("--compiler_options", type=json_dict, default=None,
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
    add("--compare_compiler_options", type=json_list_of_dicts, default=None,
        help='JSON list of XLA option sets to A/B on each model in this process, timed '
             'interleaved, e.g. \'[{}, {"xla_cpu_prefer_vector_width": 512}]\' (first = baseline)')
    add("--random_patch_steps", type=int, default=0,
        help="also run N training steps with a random patch size per step (FlexiViT training)")
    add("--random_patch_model", default="flexivit_small")
    add("--random_patch_sizes", type=int_list, default=list(FLEXIVIT_PATCH_SIZES))
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


def format_table(results: list[dict], matmul: dict[str, dict], header: bool = True) -> str:
    """A plain-text table: one row per configuration and phase (columns sized to fit, so rows
    printed one configuration at a time align only roughly); ``header=False`` leaves out the
    column titles."""
    titles = ("model", "res", "patch", "dtype", "phase", "compile s", "img/s median [min-max]",
              "GFLOP/img", "GFLOP/s", "util", "util (interleaved)", "peak MiB")
    rows = [titles]
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(titles))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not results:
        lines = []
    elif not header:
        lines = lines[2:]
    for dtype, m in matmul.items():
        lines.append(f"matmul {m['size']}^2 {dtype}: "
                     f"{_fmt_rate(m['flops_per_s'], 1e9)} GFLOP/s (median [min-max])")
    return "\n".join(lines)


def format_compiler_options(c: dict) -> str:
    lines = [f"compiler options, {c['model']} {c['phase']} batch {c['batch_size']} (timed "
             f"interleaved; matmul {_fmt_rate(c['reference_matmul_flops_per_s'], 1e9)} GFLOP/s):"]
    for v in c["variants"]:
        lines.append(f"  {json.dumps(v['compiler_options']):<70} {_fmt_rate(v['images_per_s'])} "
                     f"img/s  x{v['speedup']:.3f}  util {100 * (v['utilization_interleaved'] or 0):.0f}%"
                     f"  rel. diff {v['relative_difference']:.1e}")
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
        enable_compilation_cache(args.cache_dir, min_compile_time_secs=0.0)
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
                add_utilization(result, matmul)
                results.append(result)
                # Shown and saved as soon as measured: a run cut short keeps every figure so far.
                print(format_table([result], {}, header=len(results) == 1), flush=True)
                _write_json(args.json_path, dict(report, matmul=matmul, results=results))
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
        _write_json(args.json_path, report)
        print(f"wrote {args.json_path}")
    return report


def _write_json(path: str | None, report: dict) -> None:
    """Writes ``report`` to ``path`` (if any) through a temporary file, so that the file is
    always a complete JSON document, however the process ends."""
    if not path:
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=_json_default)
    os.replace(path + ".tmp", path)


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