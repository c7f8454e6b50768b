r"""Effect of the training patch-size distribution (FlexiViT, arXiv 2212.08013, Sec. 3.2).

Trains the micro FlexiViT on digits (24x24) with patch sizes {3, 4, 6, 8, 12} drawn per step
from: uniform (the paper's choice), area-proportional (p^2: favours big patches / few
tokens), inverse-area (1/p^2: favours small patches, compute-proportional) and fixed (only 4:
a plain ViT), then evaluates each at every patch size (PI-resize of the one stored kernel).

    python -m experiments.patch_distribution --outdir docs/figures
"""

from __future__ import annotations

import argparse
import time

from experiments import digits_lab as lab

DISTRIBUTIONS = ("uniform", "area", "inverse_area", "fixed")


def run(outdir: str, steps: int, seed: int = 0) -> dict:
    data = lab.load_digits_split()
    started = time.time()
    model = lab.make_model("flexivit_micro")
    curves, probs = {}, {}
    for name in DISTRIBUTIONS:
        weights = lab.patch_size_probs(lab.PATCH_SIZES, name)
        probs[name] = [round(float(w), 4) for w in weights]
        params = lab.train(model, data, steps=steps, patch_sizes=lab.PATCH_SIZES,
                           probs=weights, seed=seed)
        curves[name] = [lab.accuracy(model, params, data, p) for p in lab.PATCH_SIZES]
    table = {"experiment": "patch_distribution", "image_size": lab.IMAGE_SIZE,
             "patch_sizes": list(lab.PATCH_SIZES), "probs": probs, "steps": steps,
             "seed": seed, "accuracy": curves, "seconds": round(time.time() - started, 1)}
    lab.write_json(outdir, "patch_distribution", table)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, accs in curves.items():
        ax.plot(lab.PATCH_SIZES, accs, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lab.PATCH_SIZES, [str(p) for p in lab.PATCH_SIZES])
    ax.set_xlabel(f"eval patch size (image {lab.IMAGE_SIZE}px)")
    ax.set_ylabel("digits test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Training patch-size distribution ({steps} steps each)")
    ax.legend(fontsize=8)
    lab.save_figure(fig, outdir, "patch_distribution")
    plt.close(fig)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="a few steps: for tests")
    args = parser.parse_args(argv)
    table = run(args.outdir, 4 if args.fast else args.steps, args.seed)
    print(table["accuracy"])


if __name__ == "__main__":
    main()
