r"""Accuracy vs patch size: FlexiViT vs fixed-patch ViTs resized bilinearly or with PI-resize.

Small-scale version of FlexiViT (arXiv 2212.08013) Fig. 1/3: a ViT trained at one patch size
(4) and evaluated at other patch sizes after resizing its patch-embedding kernel (bilinear:
collapses; PI-resize: degrades gracefully), next to a FlexiViT trained with a uniformly random
patch size per step (one set of weights good at all of them). Data: digits at 24x24.

    python -m experiments.patch_size_sweep --outdir docs/figures
"""

from __future__ import annotations

import argparse
import time

from experiments import digits_lab as lab


def run(outdir: str, steps: int, seed: int = 0) -> dict:
    data = lab.load_digits_split()
    started = time.time()
    vit = lab.make_model("vit_micro")
    vit_params = lab.train(vit, data, steps=steps, patch_sizes=(lab.BASE_PATCH,), seed=seed)
    flexi = lab.make_model("flexivit_micro")
    flexi_params = lab.train(flexi, data, steps=steps, patch_sizes=lab.PATCH_SIZES, seed=seed)
    curves = {"flexivit": [], "vit_pi_resize": [], "vit_bilinear": []}
    for patch in lab.PATCH_SIZES:
        curves["flexivit"].append(lab.accuracy(flexi, flexi_params, data, patch))
        for how in ("pi", "bilinear"):
            model, params = lab.with_resized_patch_embed("vit_micro", vit_params, patch, how)
            key = "vit_pi_resize" if how == "pi" else "vit_bilinear"
            curves[key].append(lab.accuracy(model, params, data))
    table = {"experiment": "patch_size_sweep", "image_size": lab.IMAGE_SIZE,
             "patch_sizes": list(lab.PATCH_SIZES), "train_patch_size_vit": lab.BASE_PATCH,
             "steps": steps, "seed": seed, "accuracy": curves,
             "seconds": round(time.time() - started, 1)}
    lab.write_json(outdir, "patch_size_sweep", table)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = {"flexivit": "FlexiViT (random patch size)",
              "vit_pi_resize": f"ViT/{lab.BASE_PATCH} + PI-resize",
              "vit_bilinear": f"ViT/{lab.BASE_PATCH} + bilinear resize"}
    for key, accs in curves.items():
        ax.plot(lab.PATCH_SIZES, accs, marker="o", label=labels[key])
    ax.set_xscale("log", base=2)
    ax.set_xticks(lab.PATCH_SIZES, [str(p) for p in lab.PATCH_SIZES])
    ax.set_xlabel(f"patch size (image {lab.IMAGE_SIZE}px)")
    ax.set_ylabel("digits test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Accuracy vs patch size ({steps} steps)")
    ax.legend(fontsize=8)
    lab.save_figure(fig, outdir, "patch_size_sweep")
    plt.close(fig)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="a few steps: for tests")
    args = parser.parse_args(argv)
    table = run(args.outdir, 6 if args.fast else args.steps, args.seed)
    print(table["accuracy"])


if __name__ == "__main__":
    main()
