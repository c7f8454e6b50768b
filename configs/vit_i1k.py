r"""Fixed-patch ViT baseline on ImageNet-1k: configs/flexivit_i1k.py without patch sampling.

The same recipe (240 px, Adam with decoupled weight decay, warmup + cosine, clipping, mixup,
inception crop) trains a ViT at one patch size (default 16: 15x15 tokens); evals still sweep
the FlexiViT patch sizes 48..8 to show how a standard ViT degrades away from its own size.

    python -m flexvision.train --config configs/vit_i1k.py:base,patch=16,epochs=90 \
        --workdir gs://BUCKET/vit_b16_i1k --config.input.data_dir=gs://BUCKET/tfds

``arg``: comma-separated ``small|base|large``, ``patch=P`` (a divisor of 240) and ``epochs=N``.
Config keys: see configs/flexivit_digits.py.
"""

from flexvision.engine.configs import sibling

flexivit_i1k = sibling(__file__, "flexivit_i1k")  # one recipe, two configs


def get_config(arg=None):
    parts = [p for p in (arg or "").split(",") if p]
    patch = 16
    for part in list(parts):
        if part.startswith("patch="):
            patch = int(part.split("=", 1)[1])
            parts.remove(part)
    if 240 % patch:
        raise ValueError(f"patch={patch} must divide the 240 px input; use one of "
                         f"{flexivit_i1k.PATCH_SIZES}")
    config = flexivit_i1k.get_config(",".join(parts))
    size = config.model.name.split("_")[1]
    config.model.name = f"vit_{size}_patch16_224"
    config.model.kwargs = {"num_classes": 1000, "patch_size": (patch, patch),
                           "posemb_grid": (240 // patch, 240 // patch)}
    config.flexi = None
    return config
