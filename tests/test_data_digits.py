"""The embedded digits TFDS builder and the training/eval pipelines over it."""

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from flexvision.data import digits, pipeline

TRAIN_PP = "decode|resize(12)|random_crop(10)|flip_lr|value_range(-1, 1)|onehot(10)"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare(path)
    return path


def _input(data_dir, **overrides):
    config = ml_collections.ConfigDict(dict(name="flexvision_digits", split="train",
                                            data_dir=data_dir, pp=TRAIN_PP, batch_size=32,
                                            shuffle_buffer=1500))
    config.update(overrides)
    return config


def test_builder_splits_match_sklearn(data_dir):
    from sklearn.datasets import load_digits

    builder = tfds.builder("flexvision_digits", data_dir=data_dir)
    assert builder.info.splits["train"].num_examples == 1500
    assert builder.info.splits["test"].num_examples == 297
    indices = digits.digits_split_indices()
    assert not set(indices["train"]) & set(indices["test"])
    reference = load_digits()
    test = list(tfds.as_numpy(builder.as_dataset(split="test")))
    labels = sorted(int(x["label"]) for x in test)
    assert labels == sorted(reference.target[indices["test"]].tolist())
    assert np.bincount(labels, minlength=10).min() >= 25  # stratified: every class present
    by_label = {}
    for example in test:
        assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
        by_label.setdefault(int(example["label"]), []).append(example["image"][..., 0])
    expected = np.round(reference.images[indices["test"][0]] * 255 / 16).astype(np.uint8)
    label = int(reference.target[indices["test"][0]])
    assert any((img == expected).all() for img in by_label[label])


def test_builder_reuses_prepared_data(data_dir):
    builder = digits.prepare(data_dir)  # second call: nothing rebuilt
    assert builder.info.splits["train"].num_examples == 1500


def test_train_batches_shapes_and_ranges(data_dir):
    batch = next(pipeline.train_dataset(_input(data_dir), seed=0).as_numpy_iterator())
    assert batch["image"].shape == (32, 10, 10, 3) and batch["image"].dtype == np.float32
    assert batch["labels"].shape == (32, 10)
    assert -1 <= batch["image"].min() < batch["image"].max() <= 1
    assert set(batch) == {"image", "label", "labels"}


def test_data_order_is_a_function_of_seed_and_step(data_dir):
    config = _input(data_dir)
    full = pipeline.train_dataset(config, seed=3).as_numpy_iterator()
    batches = [next(full) for _ in range(50)]  # 1600 examples: crosses an epoch boundary
    resumed = next(pipeline.train_dataset(config, seed=3, start_step=48).as_numpy_iterator())
    for key in ("image", "labels"):
        np.testing.assert_array_equal(resumed[key], batches[48][key])
    other = next(pipeline.train_dataset(config, seed=4).as_numpy_iterator())
    assert not np.array_equal(other["label"], batches[0]["label"])


def test_each_epoch_is_a_permutation_of_the_train_split(data_dir):
    from sklearn.datasets import load_digits

    config = _input(data_dir, pp="decode(1)|onehot(10)", batch_size=50)
    stream = pipeline.train_dataset(config, seed=0).as_numpy_iterator()
    epochs = [[next(stream) for _ in range(30)] for _ in range(2)]  # 2 x 1500 examples
    train_images = np.round(load_digits().images[digits.digits_split_indices()["train"]]
                            * 255 / 16).astype(np.uint8)
    expected = sorted(img.tobytes() for img in train_images)
    orders = []
    for epoch in epochs:
        images = np.concatenate([b["image"][..., 0] for b in epoch])
        assert sorted(img.tobytes() for img in images) == expected
        orders.append(images)
    assert not np.array_equal(orders[0], orders[1])


def test_eval_batches_cover_the_split_once_with_padding_masked(data_dir):
    batches = list(pipeline.eval_batches(_input(data_dir), "decode|resize(10)|onehot(10)",
                                         "test", 128))
    assert len(batches) == 3
    assert all(b["image"].shape[0] == 128 for b in batches)
    assert sum(b["_mask"].sum() for b in batches) == 297
    assert batches[-1]["_mask"][:41].all() and not batches[-1]["_mask"][41:].any()


def test_unknown_dataset_and_bad_batch_size(data_dir):
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset_xyz'"):
        pipeline.get_builder("no_such_dataset_xyz", data_dir)
    with pytest.raises(ValueError, match="is not prepared"):
        pipeline.get_builder("mnist", data_dir)
    assert pipeline.local_batch_size(8) == 8
