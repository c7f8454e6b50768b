"""flexvision against timm on the same workloads, on whatever accelerator is present: one table and
one JSON file (issue 19, item 4).

    python -m flexvision.benchmark.versus_timm --json versus_timm.json
    python -m flexvision.benchmark.versus_timm --quick          # tiny batches: a smoke run

Workloads (``WORKLOADS``): on a GPU, bf16 compute with float32 parameters, AdamW, softmax
cross-entropy, 224 x 224: ViT-B/16 train step and inference at batch 256, Swin-T and
HRNet-W18-small train steps at batch 128 (sized to finish in under 6 minutes on one H200:
flexvision compiles ViT-B in ~14 s, Swin-T in ~35 s, HRNet in ~60 s there, and each timed phase
runs ~2 s); on a CPU, ViT-S/16 float32 inference at batch 32.

Each side is timed the same way: warm-up calls, then ``repeats`` runs of back-to-back calls that
last about ``min_time`` seconds, each run ended by a device synchronisation (flexvision:
``block_until_ready``, its benchmark's ``time_calls``; torch: ``torch.cuda.synchronize``); the
median run is reported. timm runs eagerly and under ``torch.compile`` (default mode) when torch
and timm are importable; otherwise only flexvision runs and the table says so. torch is not a
dependency of flexvision (setup.py does not list it): install torch and timm yourself to compare.
The timm models get random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Any, Callable

import jax

from flexvision.benchmark.cli import environment
from flexvision.benchmark.workloads import benchmark_config


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


def run_flexvision(c: Comparison, *, warmup: int, repeats: int, min_time: float
                   ) -> dict[str, Any]:
    """flexvision's figure for ``c`` from the benchmark (the engine's train step/inference)."""
    result = benchmark_config(c.flexvision_model, batch_size=c.batch_size,
                              resolution=(c.resolution, c.resolution), patch_size=None,
                              dtype=c.dtype, optimizer="adamw",
                              inference=c.phase == "inference", train=c.phase == "train",
                              warmup=warmup, repeats=repeats, min_time=min_time)
    phase = result[c.phase]
    return {"images_per_s": phase["images_per_s"]["median"], "compile_s": phase["compile_s"],
            "flops": phase["flops"], "flop_counts": phase["flop_counts"],
            "utilization_datasheet": phase.get("utilization_datasheet"),
            "attention": result.get("attention", [])}


def torch_available() -> tuple[bool, str]:
    """(True, versions) when torch and timm import, else (False, why)."""
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        return False, f"torch/timm not installed ({error})"
    return True, f"torch {torch.__version__}, timm {timm.__version__}"


def _torch_time(call: Callable[[], Any], sync: Callable[[], None], *, warmup: int, repeats: int,
                min_time: float) -> float:
    """Median seconds per call of ``call``, timed like flexvision's ``time_calls``."""
    start = time.perf_counter()
    for _ in range(warmup):
        call()
    sync()
    per_call = (time.perf_counter() - start) / warmup
    count = max(1, int(min_time / max(per_call, 1e-9)) + 1)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(count):
            call()
        sync()
        runs.append((time.perf_counter() - start) / count)
    return statistics.median(runs)


def run_timm(c: Comparison, *, compiled: bool, warmup: int, repeats: int, min_time: float
             ) -> dict[str, Any]:
    """timm's figure for ``c``: eager, or the step under ``torch.compile`` (its compile time is
    the first call's time, reported apart)."""
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
    call = torch.compile(step) if compiled else step
    start = time.perf_counter()
    call()
    sync()
    first_s = time.perf_counter() - start
    seconds = _torch_time(call, sync, warmup=warmup, repeats=repeats, min_time=min_time)
    return {"images_per_s": c.batch_size / seconds, "first_call_s": first_s}


def compare(workloads, *, warmup: int = 2, repeats: int = 5, min_time: float = 1.0,
            log=print) -> dict[str, Any]:
    """Runs every workload on flexvision and, where importable, timm eager and compiled."""
    has_torch, torch_note = torch_available()
    rows = []
    for c in workloads:
        row = {"workload": dataclasses.asdict(c),
               "flexvision": run_flexvision(c, warmup=warmup, repeats=repeats, min_time=min_time)}
        if has_torch:
            for key, compiled in (("timm_eager", False), ("timm_compiled", True)):
                try:
                    row[key] = run_timm(c, compiled=compiled, warmup=warmup, repeats=repeats,
                                        min_time=min_time)
                except Exception as error:  # noqa: BLE001  (report, keep the other figures)
                    row[key] = {"error": f"{type(error).__name__}: {error}"[:300]}
        rows.append(row)
        log(format_row(row))
    return {"environment": {**environment(), "torch": torch_note}, "timm_measured": has_torch,
            "rows": rows}


def _cell(entry: dict | None) -> str:
    if not entry:
        return "not run"
    if "error" in entry:
        return "error"
    return f"{entry['images_per_s']:.1f}"


def format_row(row: dict) -> str:
    c, fv = row["workload"], row["flexvision"]
    eager, compiled = row.get("timm_eager"), row.get("timm_compiled")
    ratio = "-"
    if compiled and "images_per_s" in compiled:
        ratio = f"{fv['images_per_s'] / compiled['images_per_s']:.2f}x"
    gflop = fv["flops"] / c["batch_size"] / 1e9 if fv["flops"] else None
    util = fv.get("utilization_datasheet")
    return (f"{c['label']:<24} b{c['batch_size']:<4} {c['dtype']:<9} "
            f"{fv['images_per_s']:>10.1f} {_cell(eager):>12} {_cell(compiled):>14} {ratio:>9}  "
            f"{(f'{gflop:.3g}' if gflop else '-'):>9} {fv['flop_counts']['used']:<8} "
            f"{(f'{100 * util:.0f}%' if util else 'n/a'):>6}  {','.join(fv['attention']) or '-'}")


HEADER = (f"{'workload':<24} {'batch':<5} {'dtype':<9} {'flexvision':>10} {'timm eager':>12} "
          f"{'timm compiled':>14} {'fv/comp.':>9}  {'GFLOP/img':>9} {'counted':<8} "
          f"{'util':>6}  attention   (img/s; util vs datasheet peak)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="versus_timm.json", help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="batch 2 everywhere (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min_time", type=float, default=1.0)
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    has_torch, note = torch_available()
    print(f"device: {jax.devices()[0].device_kind} ({backend}); "
          + (note if has_torch else f"{note}: flexvision only, timm columns 'not run'"))
    print(HEADER)
    result = compare(workloads_for(backend, args.quick), repeats=args.repeats,
                     min_time=args.min_time)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
