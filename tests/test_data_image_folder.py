"""Image-folder datasets (a folder of per-class subfolders of JPEG/PNG files) through the real
op-string pipeline and the trainer, on JPEG files written from scikit-learn's sample photos."""

import json
import os
import sys

import ml_collections
import numpy as np
import pytest

from flexvision.data import image_folder, pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
I1K_TRAIN_PP = "decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(2)"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """ROOT/<class>/*.{jpg,png}: 6 china and 6 flower images (PNG and grayscale among them)."""
    root = str(tmp_path_factory.mktemp("photos"))
    written = image_folder.write_sample_folder(root, per_class=6, size=(150, 200),
                                               mixed_formats=True)
    return root, written


def _input(root, **overrides):
    config = ml_collections.ConfigDict(dict(name="image_folder", split="train", data_dir=root,
                                            pp=I1K_TRAIN_PP, batch_size=4, shuffle_buffer=16))
    config.update(overrides)
    return config


def test_classes_splits_and_slices(photos):
    root, written = photos
    assert {os.path.splitext(p)[1] for p in written} == {".jpg", ".png"}
    assert any(a.shape[-1] == 1 for a in written.values())  # a grayscale JPEG
    folder = pipeline.get_builder("image_folder", root)
    assert folder.classes == ["china", "flower"] and folder.splits == {"train": 12}
    paths, labels = folder.files("train")
    assert sorted(paths) == sorted(written)
    for path, label in zip(paths, labels):
        assert folder.classes[label] == os.path.basename(os.path.dirname(path))
    head, tail = folder.files("train[:50%]"), folder.files("train[50%:]")
    assert sorted(np.concatenate([head[0], tail[0]])) == sorted(paths)
    assert set(head[1]) == set(tail[1]) == {0, 1}  # the fixed shuffle mixes the classes
    assert pipeline.num_examples(folder, "train[:75%]") == 9


def test_split_folders_layout(tmp_path):
    image_folder.write_sample_folder(str(tmp_path / "train"), per_class=3, size=(64, 64))
    image_folder.write_sample_folder(str(tmp_path / "test"), per_class=2, size=(64, 64), seed=1)
    folder = image_folder.ImageFolder(str(tmp_path))
    assert folder.splits == {"test": 4, "train": 6} and folder.num_classes == 2
    assert folder.num_examples("train+test[:1]") == 7


def test_mistakes_are_explained(tmp_path, photos):
    with pytest.raises(ValueError, match=r"needs its folder: set config.input.data_dir"):
        pipeline.get_builder("image_folder", None)
    with pytest.raises(ValueError, match=r"'/no/such/dir' \(config.input.data_dir\) does not "
                       r"exist.*ROOT/<class>/<image>.jpg"):
        image_folder.ImageFolder("/no/such/dir")
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds no images: expected ROOT/<class>"):
        image_folder.ImageFolder(str(tmp_path / "empty"))
    stray = tmp_path / "stray"
    image_folder.write_sample_folder(str(stray), per_class=1, size=(32, 32))
    (stray / "loose.jpg").write_bytes((stray / "china" / "china_0000.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"image files at its top level \(e.g. 'loose.jpg'\)"):
        image_folder.ImageFolder(str(stray))
    with pytest.raises(ValueError, match=r"split 'validation' of image folder .*Splits found: "
                       r"\{'train': 12\}"):
        image_folder.ImageFolder(photos[0]).files("validation")
    with pytest.raises(ValueError, match=r"'image_folder' for your own images"):
        pipeline.get_builder("no_such_dataset_xyz", str(tmp_path))


def test_i1k_train_ops_decode_the_real_files(photos):
    """decode|inception_crop(224)|flip_lr|value_range|onehot on the JPEG/PNG files; resumable."""
    root, _ = photos
    stream = pipeline.train_dataset(_input(root), seed=0).as_numpy_iterator()
    batches = [next(stream) for _ in range(4)]  # 16 images: more than one epoch
    for batch in batches:
        assert batch["image"].shape == (4, 224, 224, 3) and batch["image"].dtype == np.float32
        assert -1 <= batch["image"].min() < batch["image"].max() <= 1
        np.testing.assert_array_equal(batch["labels"], np.eye(2)[batch["label"]])
    resumed = next(pipeline.train_dataset(_input(root), seed=0, start_step=3).as_numpy_iterator())
    np.testing.assert_array_equal(resumed["image"], batches[3]["image"])


def test_eval_images_are_the_files_with_their_labels(photos):
    """Every decoded eval image is the array that was written (up to JPEG loss: mean |error| of
    quality-90 JPEG < 8 of 255, any other image > 8), labelled with its folder's class; padding
    of the last batch is masked."""
    root, written = photos
    size = 64
    batches = list(pipeline.eval_batches(_input(root), f"decode|central_crop({size})", "train",
                                         batch_size=5))
    folder = image_folder.ImageFolder(root)
    originals = []
    for path, array in written.items():
        top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
        crop = np.broadcast_to(array[top:top + size, left:left + size], (size, size, 3))
        originals.append((crop.astype(np.float32), folder.classes.index(
            os.path.basename(os.path.dirname(path)))))
    seen = 0
    for batch in batches:
        for image, label, mask in zip(batch["image"], batch["label"], batch["_mask"]):
            if not mask:
                continue
            errors = [np.abs(image.astype(np.float32) - crop).mean() for crop, _ in originals]
            best, second = np.argsort(errors)[:2]
            assert errors[best] < 8.0 < errors[second] and originals[best][1] == label
            seen += 1
    assert seen == 12 and len(batches) == 3


def test_tiny_training_run_on_the_folder(photos, tmp_path):
    """configs/flexivit_image_folder.py end to end: counts the classes, trains a few steps of a
    one-block FlexiViT through inception_crop on the files, evaluates the held-out slice."""
    from flexvision.train.trainer import train_and_evaluate

    root, _ = photos
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import flexivit_image_folder  # pylint: disable=import-outside-toplevel

    config = flexivit_image_folder.get_config(f"{root},micro,epochs=2,size=32")
    assert config.model.kwargs.num_classes == 2 and config.input.split == "train[:90%]"
    assert config.eval.splits == ("train[90%:]",) and config.flexi.patch_sizes == (16, 8)
    assert config.input.pp.startswith("decode|inception_crop(32)|flip_lr")
    config.model.kwargs.update({"embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32})
    config.flexi.patch_sizes = config.eval.patch_sizes = (8,)  # one compilation of each step
    config.input.batch_size = config.eval.batch_size = 4
    config.total_steps, config.checkpoint_every, config.log_every = 3, 3, 1
    config.compilation_cache_dir = str(tmp_path / "cache")
    workdir = str(tmp_path / "workdir")
    train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        losses = [row["train/loss"] for row in map(json.loads, f) if "train/loss" in row]
    assert len(losses) == 3 and np.isfinite(losses).all()
    with open(os.path.join(workdir, "final_eval.json"), encoding="utf-8") as f:
        final = json.load(f)
    assert "train[90%:]" in json.dumps(final)


def test_input_benchmark_reports_images_per_second_per_core(photos, tmp_path):
    from flexvision.data import benchmark

    out = tmp_path / "input.json"
    results = benchmark.main(["--data_dir", photos[0], "--batch_size", "4", "--threads", "1,2",
                              "--warmup", "1", "--repeats", "2", "--min_time", "0.05",
                              "--pp", "decode|inception_crop(64)|flip_lr|value_range(-1, 1)",
                              "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == results and [r["threads"] for r in results] == [1, 2]
    for row in results:
        assert 0 < row["min"] <= row["images_per_second"] <= row["max"]
        assert row["images_per_second_per_core"] == pytest.approx(
            row["images_per_second"] / row["cores_busy"])
        assert 0 < row["cores_busy"] <= os.cpu_count() + 0.5
        assert row["num_images"] == 12


def test_a_file_that_is_no_image_is_named(tmp_path):
    import tensorflow as tf

    root = tmp_path / "photos"
    image_folder.write_sample_folder(str(root), per_class=2, size=(48, 48))
    (root / "flower" / "notes.jpg").write_text("not an image")
    stream = pipeline.train_dataset(_input(str(root), pp="decode|resize(16)"), seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"not a JPEG or PNG file.*flower/notes\.jpg"):
        list(stream.take(2).as_numpy_iterator())
