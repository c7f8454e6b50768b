"""What XLA says about a compiled executable: its FLOPs (cost analysis), its buffers (memory
analysis), and, from a profiler trace, where the device time goes per HLO instruction and per
kind of op."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Any, Callable

import jax


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
