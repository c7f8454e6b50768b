"""Image-folder datasets: your own images, one subfolder per class, read as they are.

Two layouts are recognised (nothing is copied, converted or prepared; the files are read and
decoded by the input pipeline's ``decode`` op at training time)::

    ROOT/<class>/<image>.jpg             one split, 'train' (hold out with 'train[90%:]')
    ROOT/<split>/<class>/<image>.jpg     splits named by their folders: 'train', 'test', ...
                                         (tfds.folder_dataset.ImageFolder's layout)

Image files are .jpg, .jpeg and .png (any case); other files are ignored. The classes are the
sorted union of the class-folder names over all splits, label ``i`` being the ``i``-th name
(as in tfds' ImageFolder and torchvision's ImageFolder). Each split's files are put in a fixed
pseudo-random order (sorted paths permuted with NumPy seed 0), so that a slice such as
'train[:90%]' / 'train[90%:]' holds images of every class. Split strings are tfds's ('train',
'train[:90%]', 'train[10:20]', 'train+test'), and per-process splits of
``tfds.split_for_jax_process`` work too, so multi-host input is the same as for TFDS datasets.

From a config (flexvision.data.pipeline picks it by name)::

    config.input.name = "image_folder"
    config.input.data_dir = "/content/my_photos"    # ROOT
    config.input.split = "train[:90%]"; config.eval.splits = ["train[90%:]"]
    config.input.pp = "decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(NUM_CLASSES)"

Paths may be anything ``tf.io.gfile`` reads (local, gs://).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

NAME = "image_folder"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_LAYOUT = ("expected ROOT/<class>/<image>.jpg or ROOT/<split>/<class>/<image>.jpg with "
           f"{'/'.join(IMAGE_EXTENSIONS)} files")


def _subfolders(path: str) -> list[str]:
    return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(path)
                  if tf.io.gfile.isdir(os.path.join(path, name)))


def _images(path: str) -> list[str]:
    return sorted(os.path.join(path, name) for name in tf.io.gfile.listdir(path)
                  if name.lower().endswith(IMAGE_EXTENSIONS)
                  and not tf.io.gfile.isdir(os.path.join(path, name)))


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG SOI + marker, PNG


def _read_checked(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Reads one file; asserts (naming the file) that it starts like a JPEG or PNG."""
    data = tf.io.read_file(example["path"])
    known = tf.reduce_any([tf.strings.substr(data, 0, len(sig)) == sig for sig in _SIGNATURES])
    check = tf.debugging.Assert(known, ["image_folder: not a JPEG or PNG file (empty, "
                                        "truncated at the start, or another format renamed); "
                                        "remove or replace it:", example["path"]])
    with tf.control_dependencies([check]):
        return {"image": tf.identity(data), "label": example["label"]}


class ImageFolder:
    """The images under ``root`` as labelled splits (see the module docstring for the layout).

    Raises ValueError when ``root`` is missing, holds no images in either layout, or holds
    image files beside class folders (which of them would be a class is ambiguous).
    """

    def __init__(self, root: str):
        if not root:
            raise ValueError("the image_folder dataset needs its folder: set "
                             "config.input.data_dir to ROOT (" + _LAYOUT + ")")
        if not tf.io.gfile.isdir(root):
            raise ValueError(f"image folder {root!r} (config.input.data_dir) does not exist or "
                             f"is not a folder; {_LAYOUT}")
        self.root = root
        stray = _images(root)
        if stray:
            raise ValueError(f"image folder {root!r} has image files at its top level (e.g. "
                             f"{os.path.basename(stray[0])!r}); put each image in its class's "
                             f"subfolder: {_LAYOUT}")
        folders = _subfolders(root)
        if any(_images(os.path.join(root, name)) for name in folders):
            by_split = {"train": {name: _images(os.path.join(root, name)) for name in folders}}
        else:
            by_split = {split: {name: _images(os.path.join(root, split, name))
                                for name in _subfolders(os.path.join(root, split))}
                        for split in folders}
        by_split = {split: {name: images for name, images in classes.items() if images}
                    for split, classes in by_split.items()}
        by_split = {split: classes for split, classes in by_split.items() if classes}
        if not by_split:
            raise ValueError(f"image folder {root!r} holds no images: {_LAYOUT}")
        self.classes = sorted({name for classes in by_split.values() for name in classes})
        label = {name: index for index, name in enumerate(self.classes)}
        self._files: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split, classes in by_split.items():
            paths = [(path, label[name]) for name in sorted(classes) for path in classes[name]]
            order = np.random.default_rng(0).permutation(len(paths))
            self._files[split] = (np.array([paths[i][0] for i in order]),
                                  np.array([paths[i][1] for i in order], np.int64))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def splits(self) -> dict[str, int]:
        """Split name -> number of images."""
        return {split: len(paths) for split, (paths, _) in self._files.items()}

    def _absolute(self, split: Any) -> list:
        """tfds's absolute read instructions for a split string or instruction."""
        instruction = split if hasattr(split, "to_absolute") else \
            tfds.core.ReadInstruction.from_spec(str(split))
        infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[count], num_bytes=0)
                 for name, count in self.splits.items()}
        try:
            return instruction.to_absolute(infos)
        except (KeyError, ValueError, AssertionError) as err:
            raise ValueError(f"split {split!r} of image folder {self.root!r}: {err}. Splits "
                             f"found: {self.splits} (a folder with class folders directly "
                             f"under it has one split, 'train')") from None

    def files(self, split: Any) -> tuple[np.ndarray, np.ndarray]:
        """(paths, labels) of ``split`` in the split's fixed order."""
        paths, labels = [], []
        for part in self._absolute(split):
            all_paths, all_labels = self._files[part.splitname]
            paths.append(all_paths[part.from_:part.to])
            labels.append(all_labels[part.from_:part.to])
        return np.concatenate(paths), np.concatenate(labels)

    def num_examples(self, split: Any) -> int:
        return len(self.files(split)[0])

    def as_dataset(self, split: Any) -> tf.data.Dataset:
        """{'image': encoded bytes (tf.string), 'label': int64} per image, in file order.

        A file that does not start with a JPEG or PNG signature (an empty or half-copied file,
        another format renamed) stops the pipeline with an InvalidArgumentError naming it,
        rather than a decode error that names no file.
        """
        paths, labels = self.files(split)
        ds = tf.data.Dataset.from_tensor_slices({"path": paths, "label": labels})
        return ds.map(_read_checked, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def __repr__(self) -> str:
        return (f"ImageFolder({self.root!r}: {self.num_classes} classes, splits "
                f"{self.splits})")


def write_sample_folder(root: str, per_class: int = 8, size: tuple[int, int] = (375, 500),
                        seed: int = 0, mixed_formats: bool = False) -> dict[str, np.ndarray]:
    """Writes ROOT/china/*.jpg and ROOT/flower/*.jpg from scikit-learn's two sample photos.

    For demos, tests and the input benchmark when no folder of one's own is at hand: real JPEG
    files of natural images (``sklearn.datasets.load_sample_image``, 427x640 RGB). Image ``i``
    of a class is a random crop of its photo, between 60 % and 100 % of ``size`` (height,
    width; at most 427x640) on each side, saved at JPEG quality 90. ``mixed_formats`` saves
    every third image as PNG and every fourth as a grayscale JPEG instead. Returns
    {path: the uint8 HWC array that was encoded (gray images as HxWx1)}.
    """
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from sklearn.datasets import load_sample_image  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    written = {}
    for name in ("china", "flower"):
        photo = load_sample_image(f"{name}.jpg")
        limit = (min(size[0], photo.shape[0]), min(size[1], photo.shape[1]))
        folder = os.path.join(root, name)
        tf.io.gfile.makedirs(folder)
        for index in range(per_class):
            height, width = (int(rng.integers(int(0.6 * s), s + 1)) for s in limit)
            top = int(rng.integers(0, photo.shape[0] - height + 1))
            left = int(rng.integers(0, photo.shape[1] - width + 1))
            crop = photo[top:top + height, left:left + width]
            image, ext = Image.fromarray(crop), "jpg"
            if mixed_formats and index % 3 == 2:
                ext = "png"
            elif mixed_formats and index % 4 == 3:
                image = image.convert("L")
            path = os.path.join(folder, f"{name}_{index:04d}.{ext}")
            with tf.io.gfile.GFile(path, "wb") as file:
                image.save(file, format="PNG" if ext == "png" else "JPEG", quality=90)
            array = np.asarray(image)
            written[path] = array[..., None] if array.ndim == 2 else array
    return written
