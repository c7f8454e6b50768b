"""Speed benchmark on the engine's own train step: ``python -m flexvision.benchmark --help``.

    timing      timers (median and spread, interleaved A/B), compile-time split, the matmul
                reference, persistent-cache event counts
    analysis    XLA cost and memory analysis, per-HLO-instruction profiles
    workloads   a registered model at one size with its inference call and the engine's train
                step and optimizer; one configuration, native-vs-flexible, compiler-option A/B,
                random patch sizes drawn by the trainer's schedule
    cli         the command line: runs the configurations, prints and saves each as measured

The names below are the public API (``from flexvision import benchmark; benchmark.time_calls``).
"""

from flexvision.benchmark.analysis import (hlo_instructions, memory_summary, op_kind,
                                           profile_calls, xla_flops)
from flexvision.benchmark.cli import (environment, format_table, main, make_parser,
                                      random_patch_benchmark, resolve_models, run)
from flexvision.benchmark.timing import (CompileEvents, Timing, compile_timed,
                                         matmul_flops_per_second, matmul_reference, time_calls,
                                         time_interleaved)
from flexvision.benchmark.workloads import (DTYPES, OPTIMIZERS, Workload, benchmark_config,
                                            build_workload, compare_compiler_options,
                                            draw_patch_size, flexi_overhead, make_optimizer,
                                            parse_resolution, random_patch_run)

__all__ = ["hlo_instructions", "memory_summary", "op_kind", "profile_calls", "xla_flops",
           "environment", "format_table", "main", "make_parser", "random_patch_benchmark",
           "resolve_models", "run", "CompileEvents", "Timing", "compile_timed",
           "matmul_flops_per_second", "matmul_reference", "time_calls", "time_interleaved",
           "DTYPES", "OPTIMIZERS", "Workload", "benchmark_config", "build_workload",
           "compare_compiler_options", "draw_patch_size", "flexi_overhead", "make_optimizer",
           "parse_resolution", "random_patch_run"]
