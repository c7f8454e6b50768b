"""The handwritten digits bundled with scikit-learn as a TFDS dataset: no download needed.

``sklearn.datasets.load_digits`` holds 1797 grayscale 8x8 images (16 gray levels) of the
digits 0-9 (UCI optdigits test set). :class:`FlexvisionDigits` exposes them as a regular
``tfds.core.GeneratorBasedBuilder`` named ``flexvision_digits``, prepared locally in the data
dir the first time it is used. The split is fixed and stratified: 1500 train and 297 test
images. Images are stored as 8x8x1 uint8 PNGs (gray level * 255 / 16); pipelines upsample them,
e.g. ``"decode|resize(48)|value_range(-1, 1)|onehot(10)"``.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NAME = "flexvision_digits"
NUM_TEST = 297
SPLIT_SEED = 0


def digits_split_indices() -> dict[str, np.ndarray]:
    """Fixed stratified train/test indices into ``load_digits()``: 1500 train, 297 test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train, test = train_test_split(np.arange(len(labels)), test_size=NUM_TEST,
                                   stratify=labels, random_state=SPLIT_SEED)
    return {"train": np.sort(train), "test": np.sort(test)}


class FlexvisionDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits with fixed train (1500) and test (297) splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn load_digits, stratified 1500/297 split (seed 0)."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Handwritten digits 0-9, 8x8 grayscale, from sklearn.datasets.load_digits.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(indices)
                for split, indices in digits_split_indices().items()}

    def _generate_examples(self, indices):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        for index in indices:
            yield int(index), {"image": images[index], "label": int(digits.target[index])}


def prepare(data_dir: str | None = None) -> FlexvisionDigits:
    """The digits builder in ``data_dir``, built there on first use (takes a few seconds)."""
    builder = FlexvisionDigits(data_dir=data_dir)
    builder.download_and_prepare()
    return builder
