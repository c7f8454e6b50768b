"""Two toy models for tests/test_benchmark.py, registered under family 'benchmark_toy'.

They stand in for the two shapes of model the benchmark must handle whatever families are on
main: one takes ``patch_size=`` (PI-resized patch kernel, like FlexiViT) and one keeps
``batch_stats`` (BatchNorm, like HRNet).

Importing this module registers them (the benchmark's ``--import_modules`` does, in its own
subprocesses); a test imports it only inside ``registry.scoped_registrations()`` and calls
:func:`register` there, so that the toys never leak into other tests' view of the registry.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexvision import registry
from flexvision.models.contract import Backbone


class ToyFlexPatch(Backbone):
    """Patch embedding from an 8x8 kernel resized to the requested patch size, then mean + head."""

    flex_kwargs = ("patch_size",)

    width: int = 16
    num_classes: int = 10
    in_chans: int = 3
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, images, *, train: bool = False, patch_size: int = 8):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (8, 8, 3, self.width))
        kernel = jax.image.resize(kernel, (patch_size, patch_size, 3, self.width), "bilinear")
        x = jax.lax.conv_general_dilated(images.astype(self.dtype or jnp.float32),
                                         kernel.astype(self.dtype or jnp.float32),
                                         (patch_size, patch_size), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = nn.Dropout(0.1, deterministic=not train)(nn.gelu(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x.mean(axis=(1, 2)))


class ToyBatchNorm(Backbone):
    """Conv -> BatchNorm -> ReLU -> mean -> head: a model whose training updates batch_stats."""

    width: int = 16
    num_classes: int = 10
    in_chans: int = 3
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        x = nn.Conv(self.width, (3, 3), strides=(2, 2), dtype=self.dtype)(images)
        x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(nn.relu(x).mean(axis=(1, 2)))


def register() -> None:
    """Registers both toys (a no-op for those already registered)."""
    present = set(registry.list_models("toy_*"))
    for name, builder, tiny in (("toy_flex_patch", ToyFlexPatch, True),
                                ("toy_batchnorm", ToyBatchNorm, False)):
        if name not in present:
            registry.register_model(name, builder, family="benchmark_toy", tiny=tiny)


register()
