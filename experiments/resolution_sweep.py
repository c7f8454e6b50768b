r"""Resolution sweep of every registered architecture family: output stability vs input size.

For each family (vit, swin, mvit, hrnet, cyclemlp, asmlp) its smallest registered model is
run, UNTRAINED (random init, seed 0), on the same digits images resized to each resolution.
Untrained models have no accuracy to report, so each is judged by output stability: the
cosine similarity between its pooled features ('pre_logits') at a resolution and at the
reference resolution (the largest). A model that runs at every size and whose features move
smoothly passes; a size a model cannot take is recorded with its ValueError message.

    python -m experiments.resolution_sweep --outdir docs/figures
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import flexvision
from experiments import digits_lab as lab


def smallest_model_per_family() -> dict[str, str]:
    """{family: model name}: the first registered name of each family by a size heuristic."""
    preferred = {"vit": "vit_micro", "swin": "swin_tiny_patch4_window7_224",
                 "mvit": "mvitv2_tiny", "hrnet": "hrnet_w18_small", "cyclemlp": "cyclemlp_b1",
                 "asmlp": "asmlp_tiny"}
    families = {}
    for family, name in preferred.items():
        names = flexvision.list_models(family=family)
        if names:
            families[family] = name if name in names else sorted(names)[0]
    return families


def pooled_features(model, variables, images) -> np.ndarray:
    out = model.apply(variables, images, method="features")
    feats = out["pre_logits"] if "pre_logits" in out else out[sorted(out)[-1]]
    feats = np.asarray(feats, np.float64)
    return feats.reshape(feats.shape[0], -1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12
    return float(np.mean(num / den))


def run(outdir: str, resolutions, num_images: int = 4, families=None) -> dict:
    images, _ = lab.load_digits_split(image_size=max(resolutions))["test"]
    images = np.repeat(images[:num_images], 3, axis=-1)
    reference = max(resolutions)
    table = {"experiment": "resolution_sweep", "resolutions": list(resolutions),
             "reference_resolution": reference, "trained": False,
             "metric": "cosine similarity of pre_logits to the reference resolution",
             "models": {}, "cosine": {}, "errors": {}}
    started = time.time()
    for family, name in (families or smallest_model_per_family()).items():
        model = flexvision.create_model(name, num_classes=10)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
        resized = {r: jax.image.resize(jnp.asarray(images), (len(images), r, r, 3), "bilinear")
                   for r in resolutions}
        ref = pooled_features(model, variables, resized[reference])
        table["models"][family] = name
        table["cosine"][family], table["errors"][family] = [], {}
        for r in resolutions:
            try:
                table["cosine"][family].append(cosine(pooled_features(model, variables,
                                                                      resized[r]), ref))
            except ValueError as err:
                table["cosine"][family].append(None)
                table["errors"][family][str(r)] = str(err)
        print(family, name, table["cosine"][family], flush=True)
    table["seconds"] = round(time.time() - started, 1)
    lab.write_json(outdir, "resolution_sweep", table)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for family, values in table["cosine"].items():
        xs = [r for r, v in zip(resolutions, values) if v is not None]
        ys = [v for v in values if v is not None]
        ax.plot(xs, ys, marker="o", label=f"{family} ({table['models'][family]})")
    ax.set_xlabel("input resolution (px)")
    ax.set_ylabel(f"cosine to features at {reference}px")
    ax.set_title("Output stability vs resolution (UNTRAINED models, random init)", fontsize=9)
    ax.legend(fontsize=7)
    lab.save_figure(fig, outdir, "resolution_sweep")
    plt.close(fig)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--resolutions", default="48,64,96,128")
    parser.add_argument("--fast", action="store_true", help="two small sizes: for tests")
    args = parser.parse_args(argv)
    resolutions = (32, 48) if args.fast else tuple(int(r) for r in args.resolutions.split(","))
    run(args.outdir, resolutions, num_images=2 if args.fast else 4)


if __name__ == "__main__":
    main()
