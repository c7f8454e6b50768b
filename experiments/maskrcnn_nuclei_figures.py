r"""The README's Mask R-CNN nuclei figures, from the workdirs of the two demo runs.

Reads each workdir's final_eval.json (written by ``python -m flexvision.train`` with
configs/maskrcnn_flexivit_nuclei.py and configs/maskrcnn_hrnet_nuclei.py), the Otsu baseline's
docs/figures/nuclei_baseline.json, and the measured wall time and load of each run (given on
the command line: the trainer does not know the machine's load), and writes to ``--outdir``:

  maskrcnn_nuclei.json               the numbers: per run the final eval table, wall time,
                                     load, steps, batch; the baseline's metrics.
  maskrcnn_nuclei.md                 one markdown table: every run and patch size beside the
                                     baseline.
  maskrcnn_nuclei_patch_sizes.png    mask AP / AP50 and images/s vs patch size of the FlexiViT
                                     run (flexvision.engine.detection.plot_ap_and_speed).
  maskrcnn_nuclei_overlay.png        the FlexiViT run's final_overlay.png (held-out region:
                                     ground truth, then predicted masks at each patch size).

    python -m experiments.maskrcnn_nuclei_figures --outdir docs/figures \
        --run flexivit=workdirs/maskrcnn_flexivit_nuclei,WALL_SECONDS,LOAD \
        --run hrnet=workdirs/maskrcnn_hrnet_nuclei,WALL_SECONDS,LOAD
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from flexvision.engine.detection import METRICS, SPEED, plot_ap_and_speed

CONFIGS = {"flexivit": "configs/maskrcnn_flexivit_nuclei.py",
           "hrnet": "configs/maskrcnn_hrnet_nuclei.py"}


def parse_run(text: str) -> tuple[str, str, float, float]:
    """'name=WORKDIR,WALL_SECONDS,LOAD' -> (name, workdir, seconds, load)."""
    try:
        name, rest = text.split("=", 1)
        workdir, seconds, load = rest.rsplit(",", 2)
        return name, workdir, float(seconds), float(load)
    except ValueError:
        raise ValueError(f"--run must be NAME=WORKDIR,WALL_SECONDS,LOAD, got {text!r}") from None


def run_summary(name: str, workdir: str, seconds: float, load: float) -> dict:
    with open(os.path.join(workdir, "final_eval.json"), encoding="utf-8") as f:
        final = json.load(f)
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return {"config": CONFIGS.get(name), "model": config["model"]["name"],
            "steps": final["step"], "batch_size": config["input"]["batch_size"],
            "wall_seconds": round(seconds, 1), "load_average_1min": load,
            "split": final["split"], "table": final["splits"][final["split"]]}


def trial_summary(path: str) -> dict:
    """The settings, speed, load and held-out metrics of one recipe-search run."""
    with open(path, encoding="utf-8") as f:
        trial = json.load(f)
    keep = ("detector", "steps", "batch", "lr", "warmup", "min_scale", "max_scale", "neck",
            "anchor_scale", "vit_base_stride", "vit_scales", "rpn_pre", "rpn_post",
            "rpn_batch", "roi_batch", "representation", "mask_dim", "train_patch_sizes")
    return {"settings": {k: trial["args"][k] for k in keep if k in trial["args"]},
            "train_seconds": trial["train_seconds"], "compile_seconds": trial["compile_seconds"],
            "steps_per_second": trial["steps_per_second"],
            "load_average_1_5_15min_at_end": [round(v, 2) for v in trial["loadavg"]],
            "eval": trial["eval"]}


def markdown(runs: dict, baseline: dict) -> str:
    lines = ["| model | patch size | mask AP | mask AP50 | mask AP75 | box AP | box AP50 | "
             "images/s |", "|---|---|---|---|---|---|---|---|"]
    m = baseline["metrics"]
    lines.append(f"| Otsu + connected components | - | {m['mask/AP']:.3f} | {m['mask/AP50']:.3f} "
                 f"| {m['mask/AP75']:.3f} | {m['box/AP']:.3f} | {m['box/AP50']:.3f} | - |")
    for run in runs.values():
        table = run["table"]
        for ps in table["mask_AP"]:
            cells = [table[k][ps] for k in ("mask_AP", "mask_AP50", "mask_AP75", "box_AP",
                                            "box_AP50")]
            lines.append(f"| {run['model']} | {ps} | " + " | ".join(f"{v:.3f}" for v in cells)
                         + f" | {table[SPEED][ps]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--run", action="append", required=True,
                        help="NAME=WORKDIR,WALL_SECONDS,LOAD (NAME flexivit first)")
    parser.add_argument("--baseline", default="docs/figures/nuclei_baseline.json")
    parser.add_argument("--trial", action="append", default=[],
                        help="a result json of experiments.maskrcnn_nuclei_recipe (--out), "
                             "summarised under 'recipe_trials'")
    args = parser.parse_args(argv)
    runs = {}
    for text in args.run:
        name, workdir, seconds, load = parse_run(text)
        runs[name] = run_summary(name, workdir, seconds, load)
        runs[name]["_workdir"] = workdir
    with open(args.baseline, encoding="utf-8") as f:
        baseline = json.load(f)
    os.makedirs(args.outdir, exist_ok=True)
    flexi = next(iter(runs.values()))
    plot_ap_and_speed(flexi["table"], os.path.join(args.outdir, "maskrcnn_nuclei_patch_sizes.png"),
                      title=f"{flexi['model']}: held-out nuclei, one set of weights")
    shutil.copyfile(os.path.join(flexi.pop("_workdir"), "final_overlay.png"),
                    os.path.join(args.outdir, "maskrcnn_nuclei_overlay.png"))
    for run in runs.values():
        run.pop("_workdir", None)
    result = {"runs": runs, "baseline": {"method": baseline["method"],
                                         "metrics": {k: baseline["metrics"][k] for k in (
                                             "mask/AP", "mask/AP50", "mask/AP75", "box/AP",
                                             "box/AP50", "box/AP75")}},
              "metrics": list(METRICS),
              "recipe_trials": [trial_summary(path) for path in args.trial]}
    with open(os.path.join(args.outdir, "maskrcnn_nuclei.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    table = markdown(runs, baseline)
    with open(os.path.join(args.outdir, "maskrcnn_nuclei.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
