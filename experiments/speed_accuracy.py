"""FlexiViT's speed/accuracy trade-off: one set of weights, images/s vs accuracy per patch size.

FlexiViT (Beyer et al. 2023, arXiv 2212.08013, Fig. 1 and Fig. 7) trains one model over random
patch sizes and then picks the patch size at deployment: a larger patch gives fewer tokens (faster)
at some cost in accuracy. This script draws that curve for a trained model:

* accuracy per patch size from a trainer workdir (``final_eval.json``:
  ``{"accuracy": {"<patch size>": float, ...}}``), or from ``--accuracy_json``;
* inference images/s per patch size measured with flexvision.benchmark (median of timed runs
  after warm-up, min-max as error bars), at the same resolution for every patch size.

With ``--baseline_workdir`` (repeatable) the points of other runs are drawn beside it, e.g. a
ViT trained at one fixed patch size and evaluated at every patch size by PI-resizing its kernel
(configs/vit_digits.py): the paper's Fig. 7 compares FlexiViT with fixed-patch ViTs in the same
way. Each run's model and overrides come from its ``config.json`` (``model.name``,
``model.kwargs``); runs with the same architecture share one speed measurement per patch size.

Outputs in ``--outdir``: speed_accuracy.png (matplotlib Agg), speed_accuracy.json and
speed_accuracy.md (the table).

    python experiments/speed_accuracy.py --workdir workdirs/flexivit_digits \\
        --baseline_workdir workdirs/vit_digits --resolution 48 --batch_size 64 \\
        --outdir docs/figures
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flexvision import benchmark  # noqa: E402  pylint: disable=wrong-import-position
from flexvision.benchmark.cli import json_dict, int_list  # noqa: E402
from flexvision.engine.state import read_config  # noqa: E402
from flexvision.layers.flex import to_pair  # noqa: E402


def read_accuracy(workdir: str | None, accuracy_json: str | None) -> dict[int, float]:
    """{patch size: accuracy} from ``workdir/final_eval.json`` or an explicit JSON file."""
    path = pathlib.Path(accuracy_json) if accuracy_json else pathlib.Path(workdir) / "final_eval.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: give --workdir of a finished training run (it writes "
            f"final_eval.json) or --accuracy_json with {{\"accuracy\": {{\"<patch>\": float}}}}")
    data = json.loads(path.read_text())
    table = data.get("accuracy") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{path} has no 'accuracy' table: expected "
                         f"{{\"accuracy\": {{\"<patch size>\": float, ...}}}}, got keys "
                         f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    accuracy = {}
    for key, value in table.items():
        if value is None:  # the evaluator's mark for a patch size that does not tile the input
            continue
        try:
            accuracy[int(key)] = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: accuracy entry {key!r}: {value!r} is not "
                             f"'<integer patch size>': float") from err
    return dict(sorted(accuracy.items()))


def read_model_from_workdir(workdir: str | None) -> tuple[str | None, dict]:
    """The model name and overrides a trainer workdir recorded (config.json), if it has one."""
    if not workdir:
        return None, {}
    if not (pathlib.Path(workdir) / "config.json").exists():
        return None, {}
    model = read_config(workdir).to_dict().get("model", {})
    if isinstance(model, str):
        return model, {}
    name = model.get("name")
    if "kwargs" in model:  # the trainer's layout: model.name, model.kwargs
        return name, dict(model.get("kwargs") or {})
    overrides = {k: v for k, v in model.items() if k != "name"}
    return name, overrides


def measure_speeds(architectures: Sequence[tuple[str, dict]], patch_size: int, *,
                   resolution: tuple[int, int], batch_size: int, dtype: str, repeats: int,
                   min_time: float, seed: int = 0) -> list[dict[str, Any]]:
    """Inference images/s (median, min, max) and XLA FLOPs per image of each (model, overrides)
    at ``patch_size``, timed interleaved (flexvision.benchmark.time_interleaved) so that every
    architecture sees the same machine load."""
    import jax  # pylint: disable=import-outside-toplevel

    works = []
    for model, overrides in architectures:
        work = benchmark.build_workload(model, resolution=resolution, patch_size=patch_size,
                                        dtype=dtype, optimizer="sgd", overrides=overrides,
                                        seed=seed)
        if work.patch_size is None:
            raise ValueError(f"{model} does not take patch_size=: the trade-off curve needs a "
                             f"flexible-patch model such as flexivit_small")
        works.append(work)
    images = jax.random.normal(jax.random.PRNGKey(seed), (batch_size, *resolution, 3))
    compiled = [jax.jit(w.infer).lower(w.variables, images).compile() for w in works]
    calls = [lambda c=c, w=w: c(w.variables, images) for c, w in zip(compiled, works)]
    timings = benchmark.time_interleaved(calls, repeats=repeats, min_time=min_time)
    tokens = (resolution[0] // patch_size) * (resolution[1] // patch_size)
    return [{"images_per_s": timing.per_second(batch_size),
             "gflops_per_image": benchmark.xla_flops(c) / batch_size / 1e9, "tokens": tokens}
            for c, timing in zip(compiled, timings)]


def trained_patch_sizes(workdir: str | None) -> list[int] | None:
    """The patch sizes a trainer run drew from (config.json ``flexi.patch_sizes``); None for a
    fixed-patch run or a workdir without config.json."""
    if not workdir or not (pathlib.Path(workdir) / "config.json").exists():
        return None
    flexi = read_config(workdir).to_dict().get("flexi")
    sizes = flexi.get("patch_sizes") if isinstance(flexi, dict) else None
    return [int(p) for p in sizes] if sizes else None


def stored_patch_size(model: str, overrides: dict) -> int | None:
    """The patch size the model's kernel is stored at (its native, training patch size)."""
    import flexvision  # pylint: disable=import-outside-toplevel
    module = flexvision.create_model(model, **overrides)
    if "patch_size" not in module.flex_kwargs:  # the model contract: not a flexible-patch model
        return None
    patch = to_pair(module.patch_size, "patch_size")
    return patch[0] if patch[0] == patch[1] else None


def describe_run(workdir: str | None, model: str, overrides: dict) -> tuple[str, int | None]:
    """A legend label for a run and, for a fixed-patch run, the one patch size it trained at."""
    name = pathlib.Path(workdir).name if workdir else model
    drawn = trained_patch_sizes(workdir)
    if drawn:
        return f"{name}: {model}, random patch size in {{{', '.join(map(str, drawn))}}}", None
    native = stored_patch_size(model, overrides)
    if native is not None and workdir and (pathlib.Path(workdir) / "config.json").exists():
        return f"{name}: {model}, trained at patch {native} only", native
    return f"{name}: {model}", None


def write_outputs(runs: list[dict], meta: dict, outdir: pathlib.Path) -> dict[str, str]:
    """speed_accuracy.{json,md,png} in ``outdir``; returns their paths. ``runs[0]`` is the main
    run, the others are baselines drawn beside it."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    outdir.mkdir(parents=True, exist_ok=True)
    paths = {kind: str(outdir / f"speed_accuracy.{kind}") for kind in ("json", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": runs[0]["rows"], "baselines": runs[1:]}, f, indent=1)

    pathlib.Path(paths["md"]).write_text("\n".join(format_table(runs, meta)) + "\n",
                                         encoding="utf-8")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for index, run in enumerate(runs):
        rows = run["rows"]
        speed = [r["images_per_s"]["median"] for r in rows]
        low = [r["images_per_s"]["median"] - r["images_per_s"]["min"] for r in rows]
        high = [r["images_per_s"]["max"] - r["images_per_s"]["median"] for r in rows]
        accuracy = [100 * r["accuracy"] for r in rows]
        ax.errorbar(speed, accuracy, xerr=[low, high], marker="o" if index == 0 else "s",
                    capsize=3, label=run["label"], linestyle="-" if index == 0 else "--")
        for r, x, y in zip(rows, speed, accuracy):
            native = r["patch_size"] == run.get("native_patch_size")
            ax.annotate(f"/{r['patch_size']}" + (" (trained)" if native else ""), (x, y),
                        textcoords="offset points", xytext=(4, 4 if index == 0 else -11),
                        fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"images/s ({meta['environment']['backend']}, "
                  f"{meta['resolution'][0]}x{meta['resolution'][1]}, batch {meta['batch_size']}, "
                  f"{meta['dtype']})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("one set of weights, patch size chosen at inference")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def format_table(runs: list[dict], meta: dict) -> list[str]:
    """Markdown: one row per patch size; tokens and GFLOP/img of the main run's model, then the
    images/s [min-max] and accuracy of each run."""
    res = meta["resolution"]
    lines = [f"# Speed/accuracy at {res[0]}x{res[1]}, batch {meta['batch_size']}, {meta['dtype']}",
             ""]
    for index, run in enumerate(runs):
        lines.append(f"- run {index + 1}: {run['label']} ({run['source']})")
    header = "| patch | tokens | GFLOP/img |"
    rule = "|---:|---:|---:|"
    for index in range(len(runs)):
        header += f" run {index + 1} images/s [min-max] | run {index + 1} accuracy |"
        rule += "---:|---:|"
    lines += ["", header, rule]
    by_patch = [{r["patch_size"]: r for r in run["rows"]} for run in runs]
    for patch in sorted(set().union(*by_patch)):
        first = next(rows[patch] for rows in by_patch if patch in rows)
        line = f"| {patch} | {first['tokens']} | {first['gflops_per_image']:.3f} |"
        for run, rows in zip(runs, by_patch):
            r = rows.get(patch)
            if r is None:
                line += " - | - |"
                continue
            speed = r["images_per_s"]
            mark = " (trained)" if patch == run.get("native_patch_size") else ""
            line += (f" {speed['median']:.1f} [{speed['min']:.1f}-{speed['max']:.1f}] |"
                     f" {100 * r['accuracy']:.2f}%{mark} |")
        lines.append(line)
    env = meta["environment"]
    load = env.get("load_average")
    load_end = meta.get("load_average_end")
    lines += ["", f"Measured {env['time_utc']} on {env['device']} ({env['backend']}, jax "
                  f"{env['jax']}), load average (1, 5, 15 min) {_fmt_load(load)} at the start, "
                  f"{_fmt_load(load_end)} at the end; {meta['repeats']} timed runs per point, "
                  f"median with min-max."]
    return lines


def _fmt_load(load) -> str:
    return "-" if not load else "/".join(f"{x:.1f}" for x in load)


def _speed_key(model: str, overrides: dict) -> str:
    return json.dumps([model, overrides], sort_keys=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="trainer workdir with final_eval.json (and config.json)")
    parser.add_argument("--accuracy_json", help="instead of --workdir: a JSON file with "
                                                "{\"accuracy\": {\"<patch>\": float}}")
    parser.add_argument("--baseline_workdir", action="append", default=[],
                        help="another trainer workdir to draw beside it (repeatable), e.g. a "
                             "fixed-patch ViT; its model comes from its config.json")
    parser.add_argument("--model", help="registered model name (default: from the workdir)")
    parser.add_argument("--overrides", type=json_dict, default=None,
                        help="JSON model overrides (default: from the workdir)")
    parser.add_argument("--patch_sizes", type=int_list, default=None,
                        help="patch sizes to measure (default: those with an accuracy)")
    parser.add_argument("--resolution", type=benchmark.parse_resolution, default=(240, 240))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(benchmark.DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min_time", type=float, default=0.5)
    parser.add_argument("--outdir", required=True)
    args = parser.parse_args(argv)
    if not args.workdir and not args.accuracy_json:
        parser.error("give --workdir (a finished trainer run) or --accuracy_json")

    accuracy = read_accuracy(args.workdir, args.accuracy_json)
    recorded_model, recorded_overrides = read_model_from_workdir(args.workdir)
    model = args.model or recorded_model
    if not model:
        parser.error("the workdir records no model (config.json): give --model")
    overrides = recorded_overrides if args.overrides is None else args.overrides
    patch_sizes = args.patch_sizes or list(accuracy)
    missing = [p for p in patch_sizes if p not in accuracy]
    if missing:
        raise ValueError(f"no accuracy for patch sizes {missing}; the evaluation has "
                         f"{sorted(accuracy)}")
    untileable = [p for p in patch_sizes if args.resolution[0] % p or args.resolution[1] % p]
    if untileable:
        raise ValueError(f"patch sizes {untileable} do not tile {args.resolution[0]}x"
                         f"{args.resolution[1]}: pick a --resolution they divide")

    label, native = describe_run(args.workdir, model, overrides)
    runs = [{"label": label, "source": os.path.abspath(args.accuracy_json or args.workdir),
             "model": model, "overrides": overrides, "native_patch_size": native,
             "accuracy": accuracy}]
    for workdir in args.baseline_workdir:
        base_model, base_overrides = read_model_from_workdir(workdir)
        if not base_model:
            raise ValueError(f"baseline workdir {workdir} records no model: it needs the "
                             f"config.json a trainer run writes")
        base_label, base_native = describe_run(workdir, base_model, base_overrides)
        runs.append({"label": base_label, "source": os.path.abspath(workdir),
                     "model": base_model, "overrides": base_overrides,
                     "native_patch_size": base_native,
                     "accuracy": read_accuracy(workdir, None)})

    environment = benchmark.environment()  # the load average before the measurements
    # Patch size by patch size, all architectures timed interleaved, so that load changes on the
    # shared machine hit all runs alike; runs with the same architecture share one measurement.
    architectures = list(dict.fromkeys(_speed_key(r["model"], r["overrides"]) for r in runs))
    speeds: dict[str, dict[int, dict]] = {key: {} for key in architectures}
    for patch in patch_sizes:
        keys = [k for k in architectures
                if any(patch in r["accuracy"] and _speed_key(r["model"], r["overrides"]) == k
                       for r in runs)]
        measured = measure_speeds([tuple(json.loads(k)) for k in keys], patch,
                                  resolution=args.resolution, batch_size=args.batch_size,
                                  dtype=args.dtype, repeats=args.repeats, min_time=args.min_time)
        for key, speed in zip(keys, measured):
            speeds[key][patch] = speed
    for run in runs:
        measured = speeds[_speed_key(run["model"], run["overrides"])]
        run["rows"] = [{"patch_size": p, "accuracy": run["accuracy"][p], **measured[p]}
                       for p in patch_sizes if p in run["accuracy"]]
        del run["accuracy"]
    meta = {"model": model, "overrides": overrides, "resolution": list(args.resolution),
            "batch_size": args.batch_size, "dtype": args.dtype, "repeats": args.repeats,
            "source": runs[0]["source"], "environment": environment,
            "load_average_end": list(os.getloadavg())}
    paths = write_outputs(runs, meta, pathlib.Path(args.outdir))
    print(pathlib.Path(paths["md"]).read_text())
    print("wrote", ", ".join(paths.values()))
    return {"rows": runs[0]["rows"], "baselines": runs[1:], "meta": meta, "paths": paths}


if __name__ == "__main__":
    main()
