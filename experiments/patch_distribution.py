r"""Effect of the training patch-size distribution (FlexiViT, arXiv 2212.08013, Sec. 3.2).

Trains the micro FlexiViT on digits (24x24) with patch sizes {3, 4, 6, 8, 12} drawn per step
from: uniform (the paper's choice), area-proportional (p^2: favours big patches / few
tokens), inverse-area (1/p^2: favours small patches, compute-proportional) and fixed (only 4:
a plain ViT), then evaluates each at every patch size (PI-resize of the one stored kernel).
The paper's finding at small scale: a distribution is best where it puts its mass, the fixed
one collapses away from its size, and uniform is good everywhere.

    python -m experiments.patch_distribution --outdir docs/figures
"""

from __future__ import annotations

import argparse
import time

from experiments import digits_lab as lab

DISTRIBUTIONS = ("uniform", "area", "inverse_area", "fixed")


def run(outdir: str, steps: int, seed: int = 0, patch_sizes=lab.PATCH_SIZES,
        distributions=DISTRIBUTIONS, lr: float = 2e-3, batch_size: int = 64,
        model_overrides: dict | None = None) -> dict:
    """Trains one FlexiViT per distribution; writes patch_distribution.json/png.

    Returns the table: ``probs[d]`` the sampling weights of ``patch_sizes`` under ``d`` and
    ``accuracy[d]`` the test accuracy at each patch size.
    """
    patch_sizes = tuple(int(p) for p in patch_sizes)
    overrides = dict(model_overrides or {})
    data = lab.load_digits_split()
    started = time.time()
    model = lab.make_model("flexivit_micro", **overrides)
    curves, probs, seconds = {}, {}, {}
    for name in distributions:
        tick = time.time()
        weights = lab.patch_size_probs(patch_sizes, name)
        probs[name] = [round(float(w), 4) for w in weights]
        used = tuple(p for p, w in zip(patch_sizes, weights) if w > 0)
        params = lab.train(model, data, steps=steps, patch_sizes=used,
                           probs=[w for w in weights if w > 0], seed=seed, lr=lr,
                           batch_size=batch_size)
        curves[name] = [lab.accuracy(model, params, data, p) for p in patch_sizes]
        seconds[name] = round(time.time() - tick, 1)
    table = {"experiment": "patch_distribution", "image_size": lab.IMAGE_SIZE,
             "patch_sizes": list(patch_sizes), "base_patch": lab.BASE_PATCH, "probs": probs,
             "model_overrides": overrides, "steps": steps, "lr": lr, "batch_size": batch_size,
             "seed": seed, "accuracy": curves, "mean_accuracy": {
                 name: sum(accs) / len(accs) for name, accs in curves.items()},
             "seconds_per_model": seconds, "seconds": round(time.time() - started, 1)}
    lab.write_json(outdir, "patch_distribution", table)
    plot(table, outdir)
    return table


def plot(table: dict, outdir: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patch_sizes = table["patch_sizes"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    labels = {"uniform": "uniform", "area": "~ p² (big patches)",
              "inverse_area": "~ 1/p² (small patches)", "fixed": f"fixed {table['base_patch']}"}
    names = [d for d in DISTRIBUTIONS if d in table["accuracy"]]
    for name in names + sorted(set(table["accuracy"]) - set(names)):
        accs = table["accuracy"][name]
        mean = table["mean_accuracy"][name]
        line, = ax.plot(patch_sizes, accs, marker="o",
                        label=f"{labels.get(name, name)} (mean {mean:.2f})")
        bx.plot(patch_sizes, table["probs"][name], marker="o", color=line.get_color())
    for axis in (ax, bx):
        axis.set_xscale("log", base=2)
        axis.set_xticks(patch_sizes, [str(p) for p in patch_sizes])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
    ax.set_xlabel(f"eval patch size (image {table['image_size']}px)")
    ax.set_ylabel("digits test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Training patch-size distribution ({table['steps']} steps each)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    bx.set_xlabel("training patch size")
    bx.set_ylabel("sampling probability")
    bx.set_title("the distributions", fontsize=10)
    path = lab.save_figure(fig, outdir, "patch_distribution")
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true",
                        help="seconds: a 1-block ViT, 3 steps, patch sizes 4 and 8 (for tests)")
    args = parser.parse_args(argv)
    if args.fast:
        table = run(args.outdir, 3, args.seed, patch_sizes=(4, 8), batch_size=16,
                    model_overrides=lab.FAST_MODEL_OVERRIDES)
    else:
        table = run(args.outdir, args.steps, args.seed)
    print({k: [round(a, 3) for a in v] for k, v in table["accuracy"].items()})
    return table


if __name__ == "__main__":
    main()
