"""FlexiViT's speed/accuracy trade-off: one set of weights, images/s vs accuracy per patch size.

FlexiViT (Beyer et al. 2023, arXiv 2212.08013, Fig. 1 and Fig. 7) trains one model over random
patch sizes and then picks the patch size at deployment: a larger patch gives fewer tokens (faster)
at some cost in accuracy. This script draws that curve for a trained model:

* accuracy per patch size from a trainer workdir (``final_eval.json``:
  ``{"accuracy": {"<patch size>": float, ...}}``), or from ``--accuracy_json``;
* inference images/s per patch size measured with flexvision.benchmark (median of timed runs
  after warm-up, min-max as error bars), at the same resolution for every patch size.

Outputs in ``--outdir``: speed_accuracy.png (matplotlib Agg), speed_accuracy.json and
speed_accuracy.md (the table).

    python experiments/speed_accuracy.py --workdir workdirs/flexivit_digits \\
        --model flexivit_micro --overrides '{"num_classes": 10}' --resolution 48 \\
        --batch_size 64 --outdir /tmp/speed_accuracy
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
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        return None, {}
    config = json.loads(path.read_text())
    model = config.get("model", {}) if isinstance(config, dict) else {}
    if isinstance(model, str):
        return model, {}
    name = model.get("name")
    overrides = {k: v for k, v in model.items() if k != "name"}
    return name, overrides


def measure_speed(model: str, patch_sizes: Sequence[int], *, resolution: tuple[int, int],
                  batch_size: int, dtype: str, overrides: dict, repeats: int,
                  min_time: float) -> dict[int, dict[str, Any]]:
    """Inference images/s (median, min, max) and XLA FLOPs per image for each patch size."""
    speeds = {}
    for patch in patch_sizes:
        result = benchmark.benchmark_config(
            model, batch_size=batch_size, resolution=resolution, patch_size=patch, dtype=dtype,
            overrides=overrides, inference=True, train=False, repeats=repeats, min_time=min_time)
        if result["patch_size"] != patch:
            raise ValueError(f"{model} does not take patch_size=: the trade-off curve needs a "
                             f"flexible-patch model such as flexivit_small")
        phase = result["inference"]
        speeds[patch] = {"images_per_s": phase["images_per_s"],
                         "gflops_per_image": phase["flops"] / batch_size / 1e9,
                         "tokens": (resolution[0] // patch) * (resolution[1] // patch)}
    return speeds


def write_outputs(rows: list[dict], meta: dict, outdir: pathlib.Path) -> dict[str, str]:
    """speed_accuracy.{json,md,png} in ``outdir``; returns their paths."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    outdir.mkdir(parents=True, exist_ok=True)
    paths = {kind: str(outdir / f"speed_accuracy.{kind}") for kind in ("json", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)

    lines = [f"# Speed/accuracy of {meta['model']} at {meta['resolution'][0]}x"
             f"{meta['resolution'][1]}, batch {meta['batch_size']}, {meta['dtype']}", "",
             "| patch | tokens | GFLOP/img | images/s (median) | min-max | accuracy |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['patch_size']} | {r['tokens']} | {r['gflops_per_image']:.3f} | "
                     f"{r['images_per_s']['median']:.1f} | {r['images_per_s']['min']:.1f}-"
                     f"{r['images_per_s']['max']:.1f} | {r['accuracy']:.4f} |")
    lines += ["", f"Machine: {meta['environment']['device']} ({meta['environment']['backend']}), "
                  f"load average {meta['environment']['load_average']}."]
    pathlib.Path(paths["md"]).write_text("\n".join(lines) + "\n", encoding="utf-8")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    speed = [r["images_per_s"]["median"] for r in rows]
    low = [r["images_per_s"]["median"] - r["images_per_s"]["min"] for r in rows]
    high = [r["images_per_s"]["max"] - r["images_per_s"]["median"] for r in rows]
    accuracy = [100 * r["accuracy"] for r in rows]
    ax.errorbar(speed, accuracy, xerr=[low, high], marker="o", capsize=3)
    for r, x, y in zip(rows, speed, accuracy):
        ax.annotate(f"/{r['patch_size']}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel(f"images/s ({meta['environment']['backend']}, batch {meta['batch_size']}, "
                  f"{meta['dtype']})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{meta['model']}: one model, patch size chosen at inference")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="trainer workdir with final_eval.json (and config.json)")
    parser.add_argument("--accuracy_json", help="instead of --workdir: a JSON file with "
                                                "{\"accuracy\": {\"<patch>\": float}}")
    parser.add_argument("--model", help="registered model name (default: from the workdir)")
    parser.add_argument("--overrides", type=benchmark._json_dict, default=None,  # pylint: disable=protected-access
                        help="JSON model overrides (default: from the workdir)")
    parser.add_argument("--patch_sizes", type=benchmark._int_list, default=None,  # pylint: disable=protected-access
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

    speeds = measure_speed(model, patch_sizes, resolution=args.resolution,
                           batch_size=args.batch_size, dtype=args.dtype, overrides=overrides,
                           repeats=args.repeats, min_time=args.min_time)
    rows = [{"patch_size": p, "accuracy": accuracy[p], **speeds[p]} for p in patch_sizes]
    meta = {"model": model, "overrides": overrides, "resolution": list(args.resolution),
            "batch_size": args.batch_size, "dtype": args.dtype,
            "source": os.path.abspath(args.accuracy_json or args.workdir),
            "environment": benchmark.environment()}
    paths = write_outputs(rows, meta, pathlib.Path(args.outdir))
    print(pathlib.Path(paths["md"]).read_text())
    print("wrote", ", ".join(paths.values()))
    return {"rows": rows, "meta": meta, "paths": paths}


if __name__ == "__main__":
    main()
