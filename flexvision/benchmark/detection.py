"""Speed of Mask R-CNN's detection ops at realistic sizes: RoIAlign, NMS, the RoI-heads postprocess.

Default workload (one image, COCO-style Mask R-CNN R50-FPN at test time): an 800x1333 image
padded to 800x1344, FPN levels P2-P5 (200x336 .. 25x42) with 256 channels, 1000 proposals,
91 classes. Timed, each jitted on its own (compile seconds, then the median of ``--repeats``
runs, with benchmark/timing.py's compile_timed and time_calls):

* ``roi_align``: 1000 rois on P2, 7x7, sampling_ratio 2;
* ``flatten_pyramid``: the one copy of P2-P5 into a table of rows that the poolers read;
* ``multiscale_roi_align 7x7``: the box head's pooler over P2-P5 (LevelMapper + RoIAlign);
* ``multiscale_roi_align 14x14 (100 rois)``: the mask head's pooler on the detections;
* ``nms``: 1000 boxes, IoU 0.5, up to 100 kept;
* ``batched_nms (rpn)``: the RPN's per-level NMS, 1000 per level x 5 levels, IoU 0.7, 1000 kept;
* ``postprocess_detections``: decode 1000 x 91 boxes, softmax, clip, threshold, per-class NMS,
  100 detections;
* ``RoIHeads eval``: box pooler + TwoMLPHead(1024) + predictor + postprocess (box branch only,
  then with the mask branch: mask pooler + 4 mask convs + predictor), on random weights. The
  mask branch is ~120 GFLOP per image at 100 detections (4 3x3 256->256 convs on 100 x 14x14,
  the 2x2 transposed conv, the 1x1 logits), the same arithmetic as torchvision's.

Static shapes make every cost independent of the data (the NMS runs its ``max_output`` steps
whatever the scores). torchvision's figures are not measured here: torch is not installed in
this environment.

    python -m flexvision.benchmark.detection [--json out.json] [--repeats 5] [--quick]
    python flexvision/benchmark/detection.py ...   (same, from a checkout)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flexvision import detection as det  # noqa: E402
from flexvision.benchmark.timing import compile_timed, time_calls  # noqa: E402
from flexvision.detection.roi_heads import RoIHeads, postprocess_detections  # noqa: E402


def random_boxes(rng: np.random.Generator, n: int, image_hw, min_side=16.0, max_side=512.0):
    """(n, 4) float32 boxes inside the image with log-uniform sides (like real proposals)."""
    h, w = image_hw
    sides = np.exp(rng.uniform(np.log(min_side), np.log(max_side), (n, 2)))
    sides = np.minimum(sides, [w - 1, h - 1])
    x1 = rng.uniform(0, w - sides[:, 0])
    y1 = rng.uniform(0, h - sides[:, 1])
    return np.stack([x1, y1, x1 + sides[:, 0], y1 + sides[:, 1]], 1).astype(np.float32)


def time_jitted(fn: Callable, *args, repeats: int = 5) -> dict[str, float]:
    """``fn`` jitted and compiled for ``args`` (:func:`timing.compile_timed`: compile seconds),
    then timed (:func:`timing.time_calls`: the median / min / max of ``repeats`` runs, each of
    back-to-back calls ended by ``block_until_ready``), in milliseconds per call."""
    compiled, compile_info = compile_timed(jax.jit(fn), *args)
    timing = time_calls(lambda: compiled(*args), warmup=1, repeats=repeats)
    return {"compile_s": compile_info["compile_s"], "median_ms": timing.median_s * 1e3,
            "min_ms": timing.min_s * 1e3, "max_ms": timing.max_s * 1e3}


def workload(quick: bool) -> dict[str, Any]:
    if quick:
        return {"image_hw": (128, 192), "padded_hw": (128, 192), "channels": 16,
                "proposals": 64, "classes": 5, "detections": 10, "rpn_per_level": 64,
                "representation": 32, "mask_layers": (16,)}
    return {"image_hw": (800, 1333), "padded_hw": (800, 1344), "channels": 256,
            "proposals": 1000, "classes": 91, "detections": 100, "rpn_per_level": 1000,
            "representation": 1024, "mask_layers": (256, 256, 256, 256)}


def run(quick: bool = False, repeats: int = 5, seed: int = 0) -> dict[str, Any]:
    """Times every entry; returns {'workload': ..., 'results': {name: timings}, 'device': ...}."""
    cfg = workload(quick)
    rng = np.random.default_rng(seed)
    ph, pw = cfg["padded_hw"]
    c = cfg["channels"]
    features = [jnp.asarray(rng.standard_normal((1, ph >> s, pw >> s, c), np.float32))
                for s in (2, 3, 4, 5)]
    scales = det.infer_scales(tuple(f.shape[1:3] for f in features), (ph, pw))
    flat = det.flatten_pyramid(features)
    pyramid_of = lambda table: flat._replace(table=table)  # noqa: E731
    k = cfg["proposals"]
    proposals = random_boxes(rng, k, cfg["image_hw"])
    image_index = jnp.zeros(k, jnp.int32)
    dets = cfg["detections"]
    results = {}

    results["roi_align P2 7x7 s2"] = time_jitted(
        lambda f, b: det.roi_align(f, b, image_index, 7, scales[0], 2, False),
        features[0], proposals, repeats=repeats)
    results["flatten_pyramid (P2-P5 copy)"] = time_jitted(
        lambda f: det.flatten_pyramid(f).table, features, repeats=repeats)
    results["multiscale_roi_align 7x7 s2 (flat pyramid)"] = time_jitted(
        lambda t, b: det.multiscale_roi_align(pyramid_of(t), b, image_index, 7, 2, scales)[0],
        flat.table, proposals, repeats=repeats)
    results[f"multiscale_roi_align 14x14 s2 ({dets} rois, flat pyramid)"] = time_jitted(
        lambda t, b: det.multiscale_roi_align(pyramid_of(t), b, jnp.zeros(dets, jnp.int32), 14,
                                              2, scales)[0],
        flat.table, proposals[:dets], repeats=repeats)

    scores = rng.permutation(k).astype(np.float32) / k
    results[f"nms {k} boxes iou 0.5 -> {dets}"] = time_jitted(
        lambda b, s: det.nms(b, s, 0.5, dets), proposals, scores, repeats=repeats)
    per_level = cfg["rpn_per_level"]
    rpn_boxes = random_boxes(rng, 5 * per_level, cfg["image_hw"], 8.0, 700.0)
    rpn_scores = rng.permutation(5 * per_level).astype(np.float32)
    levels = np.repeat(np.arange(5), per_level)
    results[f"batched_nms rpn {5 * per_level} boxes iou 0.7 -> {k}"] = time_jitted(
        lambda b, s: det.batched_nms(b, s, levels, 0.7, k), rpn_boxes, rpn_scores,
        repeats=repeats)

    n_cls = cfg["classes"]
    logits = rng.standard_normal((k, n_cls)).astype(np.float32) * 3
    deltas = rng.standard_normal((k, 4 * n_cls)).astype(np.float32) * 0.5
    image_hw = jnp.asarray(cfg["image_hw"], jnp.float32)
    results[f"postprocess_detections {k}x{n_cls} -> {dets}"] = time_jitted(
        lambda lg, dl, p: postprocess_detections(lg, dl, p, jnp.ones(k, bool), image_hw, 0.05,
                                                 0.5, dets, (10.0, 10.0, 5.0, 5.0)),
        logits, deltas, proposals, repeats=repeats)

    heads = RoIHeads(num_classes=n_cls, representation_size=cfg["representation"],
                     mask_layers=cfg["mask_layers"], mask_dim_reduced=cfg["mask_layers"][-1],
                     detections_per_img=dets)
    variables = jax.jit(lambda f, b: heads.init(
        jax.random.PRNGKey(0), f, b,
        method=lambda m, f_, b_: (m.box_branch(f_, b_, (ph, pw)),
                                  m.mask_branch(f_, b_[:, :2], (ph, pw)))))(
        features, proposals[None])
    sizes = jnp.asarray([cfg["image_hw"]], jnp.int32)
    box_only = heads.clone(with_masks=False)
    box_variables = {"params": {n: p for n, p in variables["params"].items()
                                if n.startswith("box_")}}
    results["RoIHeads eval, box branch + postprocess"] = time_jitted(
        lambda v, f, b: box_only.apply(v, f, b, jnp.ones(b.shape[:2], bool), sizes, (ph, pw)),
        box_variables, features, proposals[None], repeats=repeats)
    results["RoIHeads eval (box + postprocess + mask)"] = time_jitted(
        lambda v, f, b: heads.apply(v, f, b, jnp.ones(b.shape[:2], bool), sizes, (ph, pw)),
        variables, features, proposals[None], repeats=repeats)

    device = jax.devices()[0]
    return {"workload": {k_: list(v) if isinstance(v, tuple) else v for k_, v in cfg.items()},
            "results": results,
            "device": {"platform": device.platform, "kind": device.device_kind,
                       "cpu_count": os.cpu_count(), "machine": platform.machine(),
                       "jax": jax.__version__},
            "torchvision": "not measured: torch is not installed in this environment"}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'entry':<58} {'compile s':>9} {'median ms':>10} {'min ms':>9} {'max ms':>9}"]
    for name, t in report["results"].items():
        lines.append(f"{name:<58} {t['compile_s']:>9.2f} {t['median_ms']:>10.2f} "
                     f"{t['min_ms']:>9.2f} {t['max_ms']:>9.2f}")
    d = report["device"]
    lines.append(f"device: {d['platform']} ({d['kind']}, {d['cpu_count']} CPUs), jax {d['jax']}; "
                 f"torchvision: {report['torchvision']}")
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    report = run(quick=args.quick, repeats=args.repeats, seed=args.seed)
    print(format_table(report))
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
