"""The model contract every backbone family implements (DESIGN.md "Model contract").

    model = flexvision.create_model("swin_micro", num_classes=10, in_chans=4)
    model.feature_info()            # (FeatureInfo('stage1', (4, 4), 16), ...), nothing is run
    logits = model.apply(variables, images)                       # (B, num_classes)
    maps = model.apply(variables, images, method="features")      # {'stage1': NHWC, ...,
                                                                  #  'pre_logits': (B, C)}

A family's module subclasses :class:`Backbone` and provides

* ``__call__(images, *, train=False, **flex_kwargs)`` -> logits; ``train`` is keyword-only;
  ``flex_kwargs`` are the run-time options listed in the class attribute ``flex_kwargs``
  (``("patch_size",)`` for the ViT family, ``()`` elsewhere), static under jit;
* ``features(images, *, train=False, **flex_kwargs)`` -> an ordered dict: one NHWC map per
  :meth:`Backbone.feature_info` entry, same names, same order, then ``'pre_logits'``, the
  pooled vector the classifier reads (B, C) (the one entry that is not a map);
* ``feature_info(**flex_kwargs)`` -> a tuple of :class:`FeatureInfo` computed from the
  configuration alone (no parameters, no tracing), like timm's ``feature_info``;
* ``input_shape()`` -> (height, width, in_chans) of the size the model is designed for (its
  position tables' size, or 224): where to ``init``; any other size runs;
* the constructor fields ``num_classes`` (0 = no head; negative is a ValueError) and
  ``in_chans`` (any channel count; the first convolution / patch embedding takes it);
* :func:`check_images` on its input, before anything else.

Map names: ``stage1`` .. ``stageN`` for the output of each stage of a hierarchical backbone
(Swin, MViT, CycleMLP, AS-MLP; HRNet's branch N after its last exchange unit), HRNet's ``stem``,
and the ViT family's ``patch_embed``, ``block0`` .. ``block{depth-1}`` and ``feature_map`` (the
patch tokens after the final norm). Dense heads choose maps by stride and channels from
``feature_info``, never by name.

Map sizes: a map of stride (sh, sw) on an H x W input is (H / sh, W / sw) when the input is a
multiple of the stride; at other sizes each family rounds as its module docstring says (Swin,
MViT, HRNet and AS-MLP: ceil(H / sh); CycleMLP: floor((H - 3) / 4) + 1 then ceil halvings; the
ViT family needs sizes that the patch size tiles).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
    """One map returned by ``features``: its name, stride (pixels per map cell along height and
    width) and number of channels."""

    name: str
    stride: tuple[int, int]
    channels: int


def check_images(images: Any, *, in_chans: int, model: str,
                 min_size: tuple[int, int] = (1, 1)) -> None:
    """The one input check of every family: ``images`` must be a floating NHWC array of shape
    (batch, height, width, in_chans) with height, width >= ``min_size``. Batch 0 is accepted.

    Integer and bool images are refused, not cast: 0..255 pixels fed to a model trained on
    normalized inputs give garbage silently, and which normalization is right is the caller's
    (the input pipeline's) to say.

    Raises:
      ValueError naming what was given, what is accepted and how to fix it.
    """
    shape = tuple(getattr(images, "shape", ()))
    dtype = getattr(images, "dtype", None)
    if dtype is None or len(shape) != 4:
        got = (f"an array of shape {shape}" if dtype is not None
               else f"a {type(images).__name__}")
        hint = (" Add a batch axis for a single image: images[None]." if len(shape) == 3
                else "")
        raise ValueError(f"{model} takes NHWC images, an array of shape (batch, height, width, "
                         f"{in_chans}); got {got}.{hint}")
    if shape[-1] != in_chans:
        hint = (" It looks like NCHW: transpose with images.transpose(0, 2, 3, 1)."
                if shape[1] == in_chans else
                f" Build the model with in_chans={shape[-1]} for {shape[-1]}-channel images.")
        raise ValueError(f"{model} takes NHWC images with {in_chans} channels, shape (batch, "
                         f"height, width, {in_chans}); got shape {shape}.{hint}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{model} takes floating-point images (float32, bfloat16, float16); got "
                         f"dtype {np.dtype(dtype).name}. Integer and bool images are refused, not "
                         f"cast: normalize them as the model's training input was, e.g. "
                         f"images.astype(jnp.float32) / 127.5 - 1 for uint8 in [0, 255] -> "
                         f"[-1, 1].")
    if shape[1] < min_size[0] or shape[2] < min_size[1]:
        raise ValueError(f"{model} takes images of at least {min_size[0]}x{min_size[1]} pixels "
                         f"(height x width); got {shape[1]}x{shape[2]}. Resize or pad the "
                         f"images.")


def check_num_classes(num_classes: Any, model: str) -> None:
    """``num_classes`` must be an int >= 0 (0: no head, ``__call__`` returns pre-logits)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or (
            num_classes < 0):
        raise ValueError(f"{model}: num_classes must be an int >= 0 (0 builds no head: the model "
                         f"returns its pooled features); got {num_classes!r}")


def per_stage(value: int | Sequence[int], num_stages: int, what: str) -> tuple[int, ...]:
    """A per-stage width from a constructor field (timm's ``MultiScaleVitCfg`` rule): an int is
    the first stage's and doubles per stage, a sequence is taken as given (one entry per stage).
    """
    if isinstance(value, (int, np.integer)):
        return tuple(int(value) * 2 ** i for i in range(num_stages))
    value = tuple(int(v) for v in value)
    if len(value) != num_stages:
        raise ValueError(f"{what} has {len(value)} entries but depths has {num_stages} stages")
    return value


def stage_strides(first: int | tuple[int, int], num_stages: int) -> tuple[tuple[int, int], ...]:
    """Strides of a pyramid whose first map has stride ``first`` and each later stage halves the
    map: first * 2**i for stage i (0-based)."""
    sh, sw = (first, first) if isinstance(first, int) else first
    return tuple((sh * 2 ** i, sw * 2 ** i) for i in range(num_stages))


class Backbone(nn.Module):
    """Base of every family's module: the contract's shared parts (see the module docstring).

    Subclasses are flax dataclasses with the fields ``num_classes`` and ``in_chans``; they
    implement ``__call__``, ``features`` and ``feature_info``.
    """

    #: Run-time keyword arguments ``__call__``/``features`` accept besides ``train``.
    flex_kwargs: ClassVar[tuple[str, ...]] = ()

    def feature_info(self, **flex_kwargs) -> tuple[FeatureInfo, ...]:
        raise NotImplementedError(f"{type(self).__name__} does not implement feature_info")

    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, in_chans) the model is designed for; families with position tables
        override it. Parameter shapes never depend on the size ``init`` sees."""
        return (224, 224, self.in_chans)

    def _check_inputs(self, images: Any, min_size: tuple[int, int] = (1, 1)) -> None:
        check_num_classes(self.num_classes, type(self).__name__)
        check_images(images, in_chans=self.in_chans, model=type(self).__name__,
                     min_size=min_size)
