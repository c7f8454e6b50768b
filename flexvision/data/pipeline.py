"""tf.data input pipelines over TFDS datasets, one slice per host (numpy batches per process).

Training order is a pure function of (seed, step): epoch ``e`` of this host's slice is shuffled
with a seed derived from (seed, e), and every example gets a stateless preprocessing seed from
(seed, process index, running example index). Starting at step ``s`` therefore yields exactly
the batches an uninterrupted run would have seen from step ``s`` on, which makes resumed runs
bit-identical. Only encoded records are skipped on resume, so it costs a read, not a decode.
"""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from flexvision.data import digits, image_folder, instances, ops

# TensorFlow must not grab accelerators that JAX uses.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow's runtime was already initialised by the caller.
    pass

_LOCAL_BUILDERS = {digits.NAME: digits.FlexvisionDigits, "digits": digits.FlexvisionDigits,
                   instances.NAME: instances.FlexvisionInstances,
                   "nuclei": instances.FlexvisionInstances}
COCO = "coco"  # input.name for your own COCO-format data, described by input.coco


def register_builder(name: str, builder_class) -> None:
    """Makes ``input.name=name`` build ``builder_class`` (a TFDS builder built locally, without
    downloads) on first use: for builders whose module sits above this layer, e.g.
    ``flexvision.detection.bpr_data`` (BPR's boundary patches need detection's geometry), which
    registers itself when imported. A name already taken by another class is a ValueError."""
    if _LOCAL_BUILDERS.get(name, builder_class) is not builder_class:
        raise ValueError(f"dataset name {name!r} is already registered for "
                         f"{_LOCAL_BUILDERS[name].__name__}")
    _LOCAL_BUILDERS[name] = builder_class


def get_builder(name: str, data_dir: str | None = None, coco=None
                ) -> tfds.core.DatasetBuilder | image_folder.ImageFolder:
    """The TFDS builder for ``name``; the embedded datasets are built locally on first use.

    ``name="coco"`` builds your COCO-format data locally: ``coco`` gives the arguments of
    :func:`flexvision.data.instances.coco_config` (name, image_dir, annotation_files, and
    optionally class_names, channels, version). ``name="image_folder"`` reads the images under
    ``data_dir`` (one subfolder per class, see flexvision/data/image_folder.py) and returns an
    :class:`image_folder.ImageFolder`.
    """
    if name == image_folder.NAME:
        return image_folder.ImageFolder(data_dir)
    if name == COCO:
        if not coco:
            raise ValueError("input.name='coco' needs input.coco = dict(name=..., image_dir=..., "
                             "annotation_files={'train': ..., 'test': ...}) describing the data")
        builder = instances.FlexvisionInstances(data_dir=data_dir,
                                                config=instances.coco_config(**dict(coco)))
        if jax.process_index() == 0 or not tf.io.gfile.exists(builder.data_path):
            builder.download_and_prepare()
        return builder
    if name in _LOCAL_BUILDERS:
        builder = _LOCAL_BUILDERS[name](data_dir=data_dir)
        if jax.process_index() == 0 or not tf.io.gfile.exists(builder.data_path):
            builder.download_and_prepare()
        return builder
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise ValueError(f"unknown dataset {name!r}: {err}. Built-in datasets that need no "
                         f"download: {sorted(_LOCAL_BUILDERS)}, {COCO!r} for your own "
                         f"COCO-format files, and {image_folder.NAME!r} for your own images "
                         f"(data_dir=ROOT holding one folder per class)") from None
    if not tf.io.gfile.exists(builder.data_path):
        raise ValueError(f"dataset {name!r} is not prepared under data_dir={data_dir!r} "
                         f"({builder.data_path} is missing). Prepare it once with "
                         f"`tfds build {name} --data_dir=DIR` (ImageNet needs the manual "
                         f"download) and pass config.input.data_dir=DIR.")
    return builder


def host_split(split: str) -> str:
    """This process's share of ``split`` (TFDS sub-split string), for multi-host input."""
    if jax.process_count() == 1:
        return split
    return tfds.split_for_jax_process(split, drop_remainder=False)


def num_examples(builder, split) -> int:
    """Number of examples in a (sub-)split, e.g. ``"train[:90%]"``."""
    if isinstance(builder, image_folder.ImageFolder):
        return builder.num_examples(split)
    return int(builder.info.splits[split].num_examples)


def _records(builder, split) -> tf.data.Dataset:
    """Encoded records of ``split`` in file order (images left encoded for the 'decode' op)."""
    if isinstance(builder, image_folder.ImageFolder):
        return builder.as_dataset(split)
    decoders = {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features else None
    return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                              read_config=tfds.ReadConfig(interleave_cycle_length=1))


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = 0
    return options


def _with_rng(seed: int, process: int):
    """Map fn giving each example its stateless preprocessing seed from its running index."""
    def _add(index, example):
        example = dict(example)
        base = tf.constant([seed, process], tf.int64)
        example[ops.RNG_KEY] = tf.random.experimental.stateless_fold_in(base, index)
        return example
    return _add


def _drop_internal(example):
    return {k: v for k, v in example.items() if not k.startswith("_")}


def local_batch_size(global_batch_size: int) -> int:
    """Per-process batch size; the global batch must split evenly over processes and devices."""
    if global_batch_size % jax.device_count():
        raise ValueError(f"batch_size {global_batch_size} must be divisible by the number of "
                         f"devices ({jax.device_count()}); pick a multiple of it")
    return global_batch_size // jax.process_count()


def train_dataset(input_config, seed: int, start_step: int = 0) -> tf.data.Dataset:
    """Infinite training batches (per-process slice) starting at ``start_step``.

    ``input_config`` fields: name, split, data_dir, pp, batch_size (global), shuffle_buffer.
    """
    builder = get_builder(input_config.name, input_config.get("data_dir"),
                          input_config.get("coco"))
    split = host_split(input_config.split)
    size = num_examples(builder, split)
    if size == 0:
        raise ValueError(f"config.input.split={input_config.split!r} of dataset "
                         f"{input_config.name!r} has no examples (on process "
                         f"{jax.process_index()} of {jax.process_count()})")
    batch = local_batch_size(input_config.batch_size)
    records = _records(builder, split)
    buffer = int(min(input_config.get("shuffle_buffer", 50_000), size))
    preprocess = ops.parse(input_config.pp)

    def epoch(e):
        epoch_seed = tf.bitwise.bitwise_xor(tf.cast(seed, tf.int64) * 1_000_003, e)
        return records.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

    start_example = start_step * batch
    start_epoch, offset = divmod(start_example, size)
    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    ds = ds.enumerate(start=start_epoch * size).skip(offset)
    ds = ds.map(_with_rng(seed, jax.process_index()))
    ds = ds.map(lambda x: _drop_internal(preprocess(x)), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_batches(input_config, pp: str, split: str, batch_size: int,
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Every example of ``split`` once, in batches padded to ``batch_size`` with ``_mask`` 0.

    Every process yields the same number of batches (padding with empty ones if its slice is
    shorter), so collective eval steps line up across hosts.
    """
    builder = get_builder(input_config.name, input_config.get("data_dir"),
                          input_config.get("coco"))
    local = local_batch_size(batch_size)
    total = num_examples(builder, split)
    per_process = -(-total // jax.process_count())
    num_batches = -(-per_process // local)
    preprocess = ops.parse(pp)
    ds = _records(builder, host_split(split)).enumerate().map(_with_rng(0, jax.process_index()))
    ds = ds.map(lambda x: _drop_internal(preprocess(x)), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local).prefetch(tf.data.AUTOTUNE).with_options(_options())
    template = None
    iterator = iter(tfds.as_numpy(ds))
    for _ in range(num_batches):
        batch = next(iterator, None)
        if batch is None:
            batch = {k: v[:0] for k, v in template.items()}
        template = batch
        yield pad_batch(batch, local)


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads every array to ``size`` rows and adds ``_mask`` (1 for real rows, 0 for padding)."""
    n = len(next(iter(batch.values())))
    padded = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
              for k, v in batch.items()}
    padded["_mask"] = (np.arange(size) < n).astype(np.float32)
    return padded

