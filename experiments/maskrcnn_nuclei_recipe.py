r"""Recipe search for the Mask R-CNN nuclei demo, on the engine's own pieces (no trainer).

Trains a registered Mask R-CNN (``flexvision.detection.maskrcnn``) on the ``flexvision_instances``
nuclei training tiles through the same tf.data pipeline and ``det_*`` preprocessing ops a config
uses (flexvision.data.pipeline.train_dataset), with the engine's optimizer and schedule
(flexvision.engine.optim.make_optimizer), one jitted train step per patch size, then scores the
held-out region (rows 384..511 of stardist's img2d.tif, one 128x512 image, 36 nuclei) with COCO
box and mask AP (flexvision.data.coco.coco_metrics, pycocotools) at each evaluation patch size,
with images/s. It found the values that configs/maskrcnn_*_nuclei.py use; the demo itself runs
through the trainer (``python -m flexvision.train --config configs/maskrcnn_flexivit_nuclei.py``).

    python -m experiments.maskrcnn_nuclei_recipe --detector maskrcnn_hrnet_micro --steps 400 \
        --warmup 40 --lr 2e-3 --anchor_scale 6 --out /tmp/r.json --overlay /tmp/r.png

What it found (400 steps of batch 4, held-out mask AP50; docs/figures/maskrcnn_nuclei.json,
'recipe_trials'): FlexiViT-micro at patch 8 with the default 8 x stride anchors (32 px at
stride 4, larger than most nuclei: few anchors reach IoU 0.7), lr 1e-3 and the stride-16
simple feature pyramid (an 8 x 8 grid for a 128 px tile): 0.12; HRNet-micro with 6 x stride
anchors and lr 2e-3: 0.75. The configs take the latter anchors and lr, and give FlexiViT a
stride-8 pyramid grid (``--vit_base_stride 8 --vit_scales 2,1,0.5``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flexvision.data import coco, pipeline
from flexvision.detection import maskrcnn as mrcnn
from flexvision.detection.masks import paste_masks
from flexvision.engine.optim import make_optimizer


def train_pp(size: int, min_scale: float, max_scale: float, max_instances: int) -> str:
    """The training preprocessing string: flips, large-scale jitter, [-1, 1], fixed-size pad."""
    return (f"decode(channels=1)|det_instances|det_flip_lr|det_flip_ud|"
            f"det_scale_jitter({size}, min_scale={min_scale}, max_scale={max_scale})|"
            f"value_range(-1, 1)|det_pad({size}, max_instances={max_instances})")


def build(args):
    neck = {}
    if args.vit_base_stride:  # ViT family: the simple feature pyramid's grid and scales
        neck = dict(base_stride=args.vit_base_stride,
                    scales=tuple(float(x) for x in args.vit_scales.split(",")))
    rpn = dict(pre_nms_top_n_train=args.rpn_pre, post_nms_top_n_train=args.rpn_post,
               pre_nms_top_n_test=args.rpn_pre, post_nms_top_n_test=args.rpn_post,
               batch_size_per_image=args.rpn_batch)
    if args.anchor_scale != 8.0:  # anchor side = anchor_scale x each neck level's stride
        strides = [i.stride[0] for i in mrcnn.create_detector(
            args.detector, num_classes=2, neck_overrides=neck).neck.feature_info()]
        rpn["anchor_sizes"] = tuple((args.anchor_scale * s,) for s in strides)
    roi = dict(batch_size_per_image=args.roi_batch, detections_per_img=args.detections,
               representation_size=args.representation, mask_layers=(args.mask_dim,) * 2,
               mask_dim_reduced=args.mask_dim)
    return mrcnn.create_detector(args.detector, num_classes=2, neck_channels=args.neck,
                                 backbone_overrides={"in_chans": 1}, rpn_overrides=rpn,
                                 roi_overrides=roi, neck_overrides=neck)


def held_out(data_dir):
    import tensorflow_datasets as tfds
    builder = pipeline.get_builder("nuclei", data_dir)
    (example,) = list(tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False)))
    objects = example["objects"]
    image = example["image"].astype(np.float32) / 255.0 * 2 - 1
    gt = {"boxes": objects["box"], "labels": objects["label"],
          "masks": objects["mask"][..., 0].astype(bool), "id": int(example["image/id"])}
    return image[None], gt, example["image"][..., 0]


def evaluate(model, variables, image, gt, patch_sizes, repeats=3):
    rows = {}
    size = image.shape[1:3]
    for ps in patch_sizes:
        flex = {} if ps is None else {"patch_size": ps}

        @jax.jit
        def infer(variables, image):
            out = model.apply(variables, image, **flex)
            masks = paste_masks(out["masks"][0], out["boxes"][0], size)
            return out, masks
        out, masks = jax.block_until_ready(infer(variables, image))
        start = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(infer(variables, image))
        ips = repeats / (time.perf_counter() - start)
        valid = np.asarray(out["valid"][0])
        pred = {"boxes": np.asarray(out["boxes"][0])[valid],
                "scores": np.asarray(out["scores"][0])[valid],
                "labels": np.asarray(out["labels"][0])[valid] - 1,
                "masks": np.asarray(masks)[valid]}
        metrics = coco.coco_metrics([gt], [pred], ["nucleus"])
        rows["default" if ps is None else str(ps)] = dict(
            {k.replace("/", "_"): round(v, 4) for k, v in metrics.items()
             if k.split("/")[1] in ("AP", "AP50", "AP75")},
            images_per_second=round(ips, 2), detections=int(valid.sum()))
        rows["default" if ps is None else str(ps)]["_pred"] = pred
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detector", default="maskrcnn_flexivit_micro")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--min_scale", type=float, default=0.8)
    p.add_argument("--max_scale", type=float, default=1.25)
    p.add_argument("--max_instances", type=int, default=48)
    p.add_argument("--neck", type=int, default=32)
    p.add_argument("--rpn_pre", type=int, default=256)
    p.add_argument("--rpn_post", type=int, default=128)
    p.add_argument("--rpn_batch", type=int, default=128)
    p.add_argument("--roi_batch", type=int, default=64)
    p.add_argument("--representation", type=int, default=128)
    p.add_argument("--mask_dim", type=int, default=32)
    p.add_argument("--detections", type=int, default=100)
    p.add_argument("--anchor_scale", type=float, default=8.0)
    p.add_argument("--vit_base_stride", type=int, default=0)
    p.add_argument("--vit_scales", default="4,2,1,0.5")
    p.add_argument("--train_patch_sizes", default="")
    p.add_argument("--eval_patch_sizes", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "flexvision_tfds"))
    p.add_argument("--out", default=None)
    p.add_argument("--overlay", default=None)
    args = p.parse_args(argv)

    train_ps = [int(x) for x in args.train_patch_sizes.split(",") if x] or [None]
    eval_ps = [int(x) for x in args.eval_patch_sizes.split(",") if x] or train_ps
    model = build(args)
    config = ml_collections.ConfigDict(dict(
        lr=args.lr, total_steps=args.steps,
        schedule=dict(warmup_steps=args.warmup, decay_type="cosine"),
        optax=dict(name="adam", weight_decay=args.wd, grad_clip_norm=args.clip)))
    optimizer, _ = make_optimizer(config)
    input_config = ml_collections.ConfigDict(dict(
        name="nuclei", split="train", data_dir=args.data_dir, batch_size=args.batch,
        pp=train_pp(args.size, args.min_scale, args.max_scale, args.max_instances),
        shuffle_buffer=64))
    batches = iter(pipeline.train_dataset(input_config, args.seed).as_numpy_iterator())

    first = next(batches)
    image0 = jnp.asarray(first["image"])
    flex0 = {} if train_ps[0] is None else {"patch_size": train_ps[0]}
    variables = jax.jit(lambda x: model.init({"params": jax.random.PRNGKey(args.seed)}, x,
                                             **flex0))(image0)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    opt_state = optimizer.init(params)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(nn.meta.unbox(params)))

    steps = {}

    def get_step(ps):
        if ps in steps:
            return steps[ps]
        flex = {} if ps is None else {"patch_size": ps}

        @jax.jit
        def step(params, opt_state, state, batch, key):
            targets = {k: batch[k] for k in ("boxes", "labels", "valid", "masks")}
            targets["labels"] = targets["labels"] + 1

            def loss_fn(params):
                out, updates = model.apply({"params": params, **state}, batch["image"],
                                           batch["image_size"], train=True, targets=targets,
                                           rngs={"sampling": key, "dropout": key},
                                           mutable=list(state), **flex)
                return out["loss"], (out, updates)
            (_, (losses, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            delta, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, delta), opt_state, {**state, **updates}, losses
        steps[ps] = step
        return step

    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    history = []
    batch = first
    compile_time = 0.0
    for i in range(args.steps):
        ps = train_ps[int(rng.integers(len(train_ps)))]
        tic = time.time()
        fresh = ps not in steps
        jb = {k: jnp.asarray(v) for k, v in batch.items()
              if k in ("image", "image_size", "boxes", "labels", "valid", "masks")}
        params, opt_state, state, losses = get_step(ps)(
            params, opt_state, state, jb, jax.random.fold_in(jax.random.PRNGKey(args.seed), i))
        if fresh:
            jax.block_until_ready(losses)
            compile_time += time.time() - tic
        if i % 25 == 0 or i == args.steps - 1:
            losses = jax.device_get(losses)
            history.append({"step": i, **{k: round(float(v), 4) for k, v in losses.items()}})
            print(f"step {i} ps {ps} loss {float(losses['loss']):.3f} "
                  f"{' '.join(f'{k[5:]}={float(v):.3f}' for k, v in losses.items() if k != 'loss')}"
                  f" t={time.time() - t0:.0f}s", flush=True)
        batch = next(batches)
    jax.block_until_ready(params)
    train_time = time.time() - t0
    image, gt, raw = held_out(args.data_dir)
    t1 = time.time()
    rows = evaluate(model, {"params": params, **state}, jnp.asarray(image), gt, eval_ps)
    eval_time = time.time() - t1
    preds = {k: v.pop("_pred") for k, v in rows.items()}
    load = os.getloadavg()
    result = dict(args=vars(args), params=int(n_params), train_seconds=round(train_time, 1),
                  compile_seconds=round(compile_time, 1),
                  steps_per_second=round(args.steps / max(train_time - compile_time, 1e-9), 3),
                  eval_seconds=round(eval_time, 1), loadavg=load, history=history, eval=rows)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.overlay:
        from flexvision.data import overlay
        key = next(iter(preds))
        keep = preds[key]["scores"] >= 0.5
        overlay.save_png(args.overlay, [overlay.overlay_instances(raw, gt["masks"]),
                                        overlay.overlay_instances(raw, preds[key]["masks"][keep]
                                                                  > 0.5)], zoom=2)
    return result


if __name__ == "__main__":
    main()
