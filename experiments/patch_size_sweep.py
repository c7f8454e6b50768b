r"""Accuracy vs patch size: FlexiViT vs fixed-patch ViTs resized bilinearly or with PI-resize.

Small-scale version of FlexiViT (arXiv 2212.08013) Fig. 1 and Fig. 3: ViTs trained at one
patch size (4 and 8 by default, as the paper's ViT-B/16 and ViT-B/30) are evaluated at every
other patch size after resizing their patch-embedding kernel, bilinearly (the naive way: token
norms change with the patch area and accuracy collapses) or with PI-resize (Sec. 3.4: holds up
near the native size), next to one FlexiViT trained with a uniformly random patch size per step,
which matches each fixed ViT at its own patch size and is good at all of them. Every model gets
the same number of steps. Data: scikit-learn digits upsampled to 24x24.

    python -m experiments.patch_size_sweep --outdir docs/figures
"""

from __future__ import annotations

import argparse
import time

from experiments import digits_lab as lab

RESIZE_METHODS = ("pi", "bilinear")


def run(outdir: str, steps: int, seed: int = 0, fixed_patches=(4, 8),
        patch_sizes=lab.PATCH_SIZES, lr: float = 2e-3, batch_size: int = 64,
        model_overrides: dict | None = None) -> dict:
    """Trains FlexiViT and one ViT per ``fixed_patches`` entry; writes patch_size_sweep.json/png.

    Returns the table: ``accuracy[curve]`` lists the test accuracy at each of ``patch_sizes``;
    curves are 'flexivit' and 'vit{p}_{pi|bilinear}' for each fixed patch p.
    ``model_overrides``: fields of the micro ViT to change (width, depth, ...).
    """
    overrides = dict(model_overrides or {})
    patch_sizes = tuple(int(p) for p in patch_sizes)
    data = lab.load_digits_split()
    started = time.time()
    curves, train_seconds = {}, {}

    tick = time.time()
    flexi = lab.make_model("flexivit_micro", **overrides)
    flexi_params = lab.train(flexi, data, steps=steps, patch_sizes=patch_sizes, seed=seed,
                             lr=lr, batch_size=batch_size)
    curves["flexivit"] = [lab.accuracy(flexi, flexi_params, data, p) for p in patch_sizes]
    train_seconds["flexivit"] = round(time.time() - tick, 1)

    for native in fixed_patches:
        tick = time.time()
        vit = lab.make_model("vit_micro", **{**overrides, "patch_size": (native, native)})
        vit_params = lab.train(vit, data, steps=steps, patch_sizes=(native,), seed=seed, lr=lr,
                               batch_size=batch_size)
        for how in RESIZE_METHODS:
            accs = []
            for patch in patch_sizes:
                model, params = lab.with_resized_patch_embed("vit_micro", vit_params, patch, how,
                                                             **overrides)
                accs.append(lab.accuracy(model, params, data))
            curves[f"vit{native}_{how}"] = accs
        train_seconds[f"vit{native}"] = round(time.time() - tick, 1)

    table = {"experiment": "patch_size_sweep", "image_size": lab.IMAGE_SIZE,
             "patch_sizes": list(patch_sizes), "fixed_patches": list(fixed_patches),
             "model_overrides": overrides, "steps": steps, "lr": lr,
             "batch_size": batch_size, "seed": seed,
             "accuracy": curves, "seconds_per_model": train_seconds,
             "seconds": round(time.time() - started, 1)}
    lab.write_json(outdir, "patch_size_sweep", table)
    plot(table, outdir)
    return table


def plot(table: dict, outdir: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patch_sizes = table["patch_sizes"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(patch_sizes, table["accuracy"]["flexivit"], marker="o", color="black", linewidth=2.5,
            label="FlexiViT (uniform random patch size)")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for color, native in zip(colors, table["fixed_patches"]):
        for how, style in (("pi", "-"), ("bilinear", ":")):
            accs = table["accuracy"][f"vit{native}_{how}"]
            name = "PI-resize" if how == "pi" else "bilinear resize"
            ax.plot(patch_sizes, accs, style, marker="s", color=color,
                    label=f"ViT/{native} + {name}")
        if native in patch_sizes:
            ax.plot([native], [table["accuracy"][f"vit{native}_pi"][patch_sizes.index(native)]],
                    marker="*", markersize=14, color=color, linestyle="none")
    ax.set_xscale("log", base=2)
    ax.set_xticks(patch_sizes, [str(p) for p in patch_sizes])
    ax.minorticks_off()
    ax.set_xlabel(f"eval patch size (image {table['image_size']}px; star: a ViT's own size)")
    ax.set_ylabel("digits test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Accuracy vs patch size ({table['steps']} steps per model)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    path = lab.save_figure(fig, outdir, "patch_size_sweep")
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixed-patches", default="4,8",
                        help="native patch sizes of the fixed-patch ViTs, comma separated")
    parser.add_argument("--fast", action="store_true",
                        help="seconds: a 1-block ViT, 3 steps, patch sizes 4 and 8 (for tests)")
    args = parser.parse_args(argv)
    fixed = tuple(int(p) for p in args.fixed_patches.split(","))
    if args.fast:
        table = run(args.outdir, 3, args.seed, fixed_patches=(4,), patch_sizes=(4, 8),
                    batch_size=16, model_overrides=lab.FAST_MODEL_OVERRIDES)
    else:
        table = run(args.outdir, args.steps, args.seed, fixed_patches=fixed)
    print({k: [round(a, 3) for a in v] for k, v in table["accuracy"].items()})
    return table


if __name__ == "__main__":
    main()
