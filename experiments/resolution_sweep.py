r"""Resolution sweep of every registered architecture family: accuracy vs input size.

The claim under test (FlexiViT, arXiv 2212.08013, and each family's own paper): one set of
weights runs at any input resolution. For EVERY family in the registry a tiny configuration
of its registered model (:data:`TINY_CONFIGS`: a few blocks, narrow widths, windows and
strides scaled to small maps) is trained briefly on the digits (3 channels) at one resolution
(32 px), then evaluated on the test digits resized to each resolution of the sweep. A family
that does not reach :data:`MIN_TRAINED_ACCURACY` at its training size within the budget is
reported by output stability instead (cosine similarity of its pooled features 'pre_logits' to
those at the training size), and the plot says so. A size a model cannot take is recorded with
its ValueError message (e.g. the ViT at 22 px, which its 4 px patches do not tile).

    python -m experiments.resolution_sweep --outdir docs/figures
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

import flexvision
from experiments import digits_lab as lab
from flexvision.models.hrnet import hrnet_stages

TRAIN_RESOLUTION = 32
RESOLUTIONS = (16, 22, 28, 32, 40, 48, 64)
MIN_TRAINED_ACCURACY = 0.5  # 5x chance on 10 classes

#: family -> (registered model, overrides that shrink it for a CPU run at 16-64 px).
TINY_CONFIGS = {
    "vit": ("vit_micro", dict(embed_dim=64, depth=2, num_heads=2, mlp_dim=128, patch_size=(4, 4),
                              posemb_grid=(8, 8), in_chans=3)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=TRAIN_RESOLUTION, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                  window_size=4, drop_path_rate=0.0)),
    "mvit": ("mvitv2_tiny",
             dict(img_size=TRAIN_RESOLUTION, depths=(1, 1, 1), embed_dim=32, num_heads=1,
                  stride_q=((1, 1), (2, 2), (2, 2)), stride_kv_adaptive=(2, 2))),
    "hrnet": ("hrnet_w18_small",
              # Three stages (branches at 1/4, 1/8, 1/16): the classification neck widens each
              # branch to 128 * 2**i channels, so a fourth branch alone would add ~6M params.
              dict(stages=hrnet_stages(8, stage1_blocks=1, stage1_width=16, blocks=1,
                                       modules=(1, 1, 1))[:3], stem_width=16,
                   num_features=128)),
    "cyclemlp": ("cyclemlp_b1", dict(depths=(1, 1, 1, 1), embed_dim=(16, 32, 64, 128),
                                     mlp_ratio=2.0)),
    "asmlp": ("asmlp_tiny", dict(embed_dim=16, depths=(1, 1, 1, 1), shift_size=3,
                                 mlp_ratio=2.0)),
}


def registered_families() -> list[str]:
    """Every architecture family flexvision ships (flexvision/models/*.py) with at least one
    registered model. Families registered by other code (user models, test doubles) are left
    out: they have no tiny configuration here."""
    from flexvision import registry

    entries = [registry.resolve(name)[0] for name in registry.list_models()]
    return sorted({entry.family for entry in entries
                   if getattr(entry.builder, "__module__", "").startswith("flexvision.models.")})


def tiny_model(family: str):
    """(registered name, module) of the tiny configuration of ``family``, 10 classes."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"no tiny configuration for family {family!r}; add one to "
                         f"experiments.resolution_sweep.TINY_CONFIGS (known: "
                         f"{sorted(TINY_CONFIGS)})")
    name, overrides = TINY_CONFIGS[family]
    return name, flexvision.create_model(name, num_classes=10, **overrides)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of NHWC images to size x size."""
    return np.asarray(jax.image.resize(images, (len(images), size, size, images.shape[-1]),
                                       "bilinear"))


@functools.lru_cache(maxsize=32)
def _logits_and_pooled(model):
    def forward(variables, images):
        logits = model.apply(variables, images)
        pooled = model.apply(variables, images, method="features")["pre_logits"]
        return logits, pooled.reshape(pooled.shape[0], -1)
    return jax.jit(forward)


def logits_and_pooled(model, variables, images) -> tuple[np.ndarray, np.ndarray]:
    """(N, classes) logits and (N, D) float64 'pre_logits' (the features entry point), one
    jitted evaluation-mode call per input shape."""
    logits, pooled = _logits_and_pooled(model)(variables, images)
    return np.asarray(logits), np.asarray(pooled, np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the cosine similarity of ``a`` and ``b`` (N, D)."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12
    return float(np.mean(num / den))


def sweep_family(family: str, data: dict, resolutions, train_resolution: int, steps: int,
                 batch_size: int, lr: float, seed: int) -> dict:
    """Trains the tiny model of ``family`` and measures it at every resolution."""
    tick = time.time()
    name, model = tiny_model(family)
    variables = lab.train_variables(model, data, steps=steps, batch_size=batch_size, lr=lr,
                                    seed=seed, log=None)
    train_seconds = time.time() - tick
    test_images, test_labels = data["test"]
    reference = logits_and_pooled(model, variables, test_images)[1]
    accuracy, stability, errors = [], [], {}
    for size in resolutions:
        images = resize_images(test_images, size)
        try:
            logits, features = logits_and_pooled(model, variables, images)
        except ValueError as err:
            accuracy.append(None)
            stability.append(None)
            errors[str(size)] = str(err)
            continue
        accuracy.append(float(np.mean(logits.argmax(-1) == test_labels)))
        stability.append(cosine(features, reference))
    train_accuracy = accuracy[resolutions.index(train_resolution)]
    num_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(variables["params"]))
    result = {"model": name, "overrides": repr(TINY_CONFIGS[family][1]), "params": num_params,
              "accuracy_at_train_resolution": train_accuracy,
              "trained": train_accuracy >= MIN_TRAINED_ACCURACY,
              "accuracy": accuracy, "stability": stability, "errors": errors,
              "train_seconds": round(train_seconds, 1),
              "seconds": round(time.time() - tick, 1)}
    result["metric"] = "accuracy" if result["trained"] else "stability"
    print(f"{family:9s} {name} acc@{train_resolution}={train_accuracy:.3f} "
          f"acc={[None if a is None else round(a, 3) for a in accuracy]} "
          f"({result['seconds']} s)", flush=True)
    return result


def run(outdir: str, resolutions=RESOLUTIONS, train_resolution: int = TRAIN_RESOLUTION,
        steps: int = 200, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
        families=None) -> dict:
    """Sweeps every registered family (or ``families``); writes resolution_sweep.json/png."""
    resolutions = tuple(sorted({int(r) for r in resolutions} | {int(train_resolution)}))
    families = list(families or registered_families())
    started = time.time()
    data = lab.load_digits_split(image_size=train_resolution, channels=3)
    table = {"experiment": "resolution_sweep", "resolutions": list(resolutions),
             "train_resolution": train_resolution, "steps": steps, "batch_size": batch_size,
             "lr": lr, "seed": seed, "min_trained_accuracy": MIN_TRAINED_ACCURACY,
             "stability_metric": "cosine similarity of pre_logits to those at the training "
                                 "resolution", "families": {}}
    for family in families:
        table["families"][family] = sweep_family(family, data, resolutions, train_resolution,
                                                 steps, batch_size, lr, seed)
    table["seconds"] = round(time.time() - started, 1)
    lab.write_json(outdir, "resolution_sweep", table)
    plot(table, outdir)
    return table


def plot(table: dict, outdir: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    fallbacks = []
    for family, result in table["families"].items():
        values = result[result["metric"]]
        xs = [r for r, v in zip(table["resolutions"], values) if v is not None]
        ys = [v for v in values if v is not None]
        skipped = sorted(int(r) for r in result["errors"])
        label = f"{family} ({result['params'] / 1e3:.0f}k params)"
        if skipped:
            label += f", cannot take {', '.join(map(str, skipped))} px"
        if result["metric"] == "stability":
            fallbacks.append(family)
            label += ": STABILITY (untrained)"
        ax.plot(xs, ys, "--" if result["metric"] == "stability" else "-", marker="o",
                label=label)
    ax.axvline(table["train_resolution"], color="gray", linestyle=":", linewidth=1)
    ax.set_xticks(table["resolutions"], [str(r) for r in table["resolutions"]])
    ax.set_xlabel(f"eval input resolution (px); trained at {table['train_resolution']} px")
    ylabel = "digits test accuracy"
    if fallbacks:
        ylabel += "\n(dashed: cosine to features at the training size)"
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Accuracy vs input resolution, tiny model of each family "
                 f"({table['steps']} steps)", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    path = lab.save_figure(fig, outdir, "resolution_sweep")
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--resolutions", default=",".join(map(str, RESOLUTIONS)))
    parser.add_argument("--train-resolution", type=int, default=TRAIN_RESOLUTION)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--families", default="",
                        help="comma-separated subset of families (default: every registered)")
    parser.add_argument("--fast", action="store_true",
                        help="seconds: 2 steps at 16 px, sizes 16 and 18 (for tests)")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f] or None
    if args.fast:
        table = run(args.outdir, (16, 18), train_resolution=16, steps=2, batch_size=8,
                    families=families)
    else:
        table = run(args.outdir, [int(r) for r in args.resolutions.split(",")],
                    train_resolution=args.train_resolution, steps=args.steps,
                    families=families)
    return table


if __name__ == "__main__":
    main()
