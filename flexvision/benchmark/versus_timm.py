"""flexvision against timm on the same workloads, on whatever accelerator is present: one table and
one JSON file (issue 19, item 4).

    python -m flexvision.benchmark.versus_timm --json versus_timm.json
    python -m flexvision.benchmark.versus_timm --quick          # tiny batches: a smoke run

Workloads (``WORKLOADS``): on a GPU, bf16 compute with float32 parameters, AdamW, softmax
cross-entropy, 224 x 224: ViT-B/16 train step and inference at batch 256, Swin-T and
HRNet-W18-small train steps at batch 128 (sized to finish in under 6 minutes on one H200:
flexvision compiles ViT-B in ~14 s, Swin-T in ~35 s, HRNet in ~60 s there, and each timed phase
runs ~2 s); on a CPU, ViT-S/16 float32 inference at batch 32.

All sides of a workload are compiled first, then timed in alternation (the benchmark's
``time_interleaved``: warm-up calls, then ``repeats`` rounds, each running every side once for
about ``min_time`` seconds of back-to-back calls ended by a device synchronisation: flexvision's
``block_until_ready``, torch's ``torch.cuda.synchronize``), so that a change of machine load hits
every side alike; the median run is reported, and flexvision's speed over each timm side as the
median and range of the per-round ratios. timm runs eagerly and under ``torch.compile`` (default mode) when torch
and timm are importable; otherwise only flexvision runs and the table says so. torch is not a
dependency of flexvision (setup.py does not list it): install torch and timm yourself to compare.
The timm models get random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax

from flexvision.benchmark.cli import environment
from flexvision.benchmark.timing import time_interleaved
from flexvision.benchmark.workloads import PreparedPhase, phase_report, prepare_phase


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One workload: flexvision's registered model and timm's name for the same network."""

    label: str
    flexvision_model: str
    timm_model: str
    phase: str  # 'train' or 'inference'
    batch_size: int
    dtype: str  # compute dtype; parameters stay float32 on both sides
    resolution: int = 224


GPU_WORKLOADS = (
    Comparison("ViT-B/16 train", "vit_base_patch16_224", "vit_base_patch16_224", "train", 256,
               "bfloat16"),
    Comparison("ViT-B/16 inference", "vit_base_patch16_224", "vit_base_patch16_224",
               "inference", 256, "bfloat16"),
    Comparison("Swin-T train", "swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224",
               "train", 128, "bfloat16"),
    Comparison("HRNet-W18-small train", "hrnet_w18_small", "hrnet_w18_small", "train", 128,
               "bfloat16"),
)
CPU_WORKLOADS = (
    Comparison("ViT-S/16 inference", "vit_small_patch16_224", "vit_small_patch16_224",
               "inference", 32, "float32"),
)


def workloads_for(backend: str, quick: bool = False) -> tuple[Comparison, ...]:
    """The workloads of ``backend`` ('gpu', 'tpu' -> the GPU set; 'cpu' -> the CPU set); with
    ``quick`` every batch is 2 (a smoke run, no figures to quote)."""
    chosen = CPU_WORKLOADS if backend == "cpu" else GPU_WORKLOADS
    if quick:
        chosen = tuple(dataclasses.replace(c, batch_size=2) for c in chosen)
    return chosen


def prepare_flexvision(c: Comparison) -> PreparedPhase:
    """flexvision's side of ``c``, compiled: the engine's train step or inference call."""
    return prepare_phase(c.flexvision_model, c.phase, batch_size=c.batch_size,
                         resolution=(c.resolution, c.resolution), dtype=c.dtype,
                         optimizer="adamw")


def torch_available() -> tuple[bool, str]:
    """(True, versions) when torch and timm import, else (False, why)."""
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        return False, f"torch/timm not installed ({error})"
    return True, (f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), "
                  f"timm {timm.__version__}")


class _Synchronized:
    """A torch result that ``jax.block_until_ready`` (which ``time_interleaved`` calls at the
    end of each run) waits for: its ``block_until_ready`` synchronises the torch device."""

    def __init__(self, value, sync: Callable[[], None]):
        self.value, self._sync = value, sync

    def block_until_ready(self):
        self._sync()
        return self


def prepare_timm(c: Comparison, *, compiled: bool) -> tuple[Callable[[], Any], float]:
    """timm's side of ``c`` as a call (eager, or the step under ``torch.compile``, default mode)
    and the seconds of its first call (for torch.compile: its compilation)."""
    import timm
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        c.dtype]
    model = timm.create_model(c.timm_model, pretrained=False).to(device)
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(c.batch_size, 3, c.resolution, c.resolution, device=device
                         ).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (c.batch_size,), device=device)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    if c.phase == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

        def step():
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
    else:
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                return model(images)
    run = torch.compile(step) if compiled else step
    start = time.perf_counter()
    run()
    sync()
    first_s = time.perf_counter() - start
    return (lambda: _Synchronized(run(), sync)), first_s


SIDES = ("flexvision", "timm_eager", "timm_compiled")


def compare(workloads, *, warmup: int = 2, repeats: int = 5, min_time: float = 1.0,
            timm_compile: bool = True, log=print) -> dict[str, Any]:
    """Runs every workload on flexvision and, where importable, timm eager and compiled, all
    sides of a workload timed in alternation (``time_interleaved``: run 1 of each side, run 2
    of each, ...), so that a change of machine load hits every side alike. Per side: images/s
    (median run, slowest and fastest); per timm side: flexvision's speed over it, as the median
    and range of the per-round ratios."""
    has_torch, torch_note = torch_available()
    rows = []
    for c in workloads:
        fv = prepare_flexvision(c)
        calls, row = {"flexvision": fv.call}, {"workload": dataclasses.asdict(c)}
        if has_torch:
            for key, compiled in (("timm_eager", False), ("timm_compiled", True)):
                if compiled and not timm_compile:
                    continue
                try:
                    calls[key], first_s = prepare_timm(c, compiled=compiled)
                    row[key] = {"first_call_s": first_s}
                except Exception as error:  # noqa: BLE001  (report, keep the other figures)
                    row[key] = {"error": f"{type(error).__name__}: {error}"[:300]}
        load_start = os.getloadavg()
        timings = dict(zip(calls, time_interleaved(list(calls.values()), warmup=warmup,
                                                   repeats=repeats, min_time=min_time)))
        report = phase_report(fv.compiled, fv.seconds, timings["flexvision"], c.batch_size,
                              analytic=fv.analytic, dtype=c.dtype)
        row["flexvision"] = {"images_per_s": report["images_per_s"]["median"],
                             "images_per_s_range": report["images_per_s"],
                             "compile_s": report["compile_s"], "flops": report["flops"],
                             "flop_counts": report["flop_counts"],
                             "utilization_datasheet": report["utilization_datasheet"],
                             "attention": fv.attention}
        for key, timing in timings.items():
            if key == "flexvision":
                continue
            ratios = [other / own for own, other in zip(timings["flexvision"].run_s,
                                                        timing.run_s)]
            row[key].update({
                "images_per_s": timing.per_second(c.batch_size)["median"],
                "images_per_s_range": timing.per_second(c.batch_size),
                "flexvision_speedup": {"median": statistics.median(ratios), "min": min(ratios),
                                       "max": max(ratios)}})
        row["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
        row["rounds"] = repeats
        rows.append(row)
        log(format_row(row))
    return {"environment": {**environment(), "torch": torch_note}, "timm_measured": has_torch,
            "interleaved": True, "rows": rows}


def _cell(entry: dict | None) -> str:
    if not entry:
        return "not run"
    if "error" in entry:
        return "error"
    return f"{entry['images_per_s']:.1f}"


def _speedup(entry: dict | None) -> str:
    if not entry or "flexvision_speedup" not in entry:
        return "-"
    ratio = entry["flexvision_speedup"]
    return f"{ratio['median']:.2f}x [{ratio['min']:.2f}-{ratio['max']:.2f}]"


def format_row(row: dict) -> str:
    c, fv = row["workload"], row["flexvision"]
    eager, compiled = row.get("timm_eager"), row.get("timm_compiled")
    gflop = fv["flops"] / c["batch_size"] / 1e9 if fv["flops"] else None
    util = fv.get("utilization_datasheet")
    load = row.get("load_average", {}).get("start", [float("nan")])[0]
    return (f"{c['label']:<24} b{c['batch_size']:<4} {c['dtype']:<9} "
            f"{fv['images_per_s']:>10.1f} {_cell(eager):>10} {_cell(compiled):>10} "
            f"{_speedup(eager):>19} {_speedup(compiled):>19}  "
            f"{(f'{gflop:.3g}' if gflop else '-'):>9} {fv['flop_counts']['used']:<8} "
            f"{(f'{100 * util:.0f}%' if util else 'n/a'):>5}  {','.join(fv['attention']) or '-':<9}"
            f" {load:.1f}")


HEADER = (f"{'workload':<24} {'batch':<5} {'dtype':<9} {'flexvision':>10} {'timm eager':>10} "
          f"{'timm comp.':>10} {'fv/eager [range]':>19} {'fv/comp. [range]':>19}  "
          f"{'GFLOP/img':>9} {'counted':<8} {'util':>5}  {'attention':<9} load\n"
          "(img/s, median of interleaved runs; fv/x: flexvision's speed over x, median and range "
          "of the per-round ratios; util vs datasheet peak; load: 1-min load average at start)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="versus_timm.json", help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="batch 2 everywhere (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min_time", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no_timm_compile", action="store_true",
                        help="skip timm under torch.compile (minutes of compilation on a CPU)")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    has_torch, note = torch_available()
    print(f"device: {jax.devices()[0].device_kind} ({backend}); "
          + (note if has_torch else f"{note}: flexvision only, timm columns 'not run'"))
    print(HEADER)
    result = compare(workloads_for(backend, args.quick), warmup=args.warmup,
                     repeats=args.repeats, min_time=args.min_time,
                     timm_compile=not args.no_timm_compile)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
