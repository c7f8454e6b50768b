"""The instance builder: stardist's real nuclei split spatially, and COCO-format files."""

import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils

from flexvision.data import coco, instances, pipeline


@pytest.fixture(scope="module")
def source():
    return instances.stardist_nuclei()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    instances.prepare(path)
    return path


def _examples(builder, split):
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def test_stardist_files_read_without_importing_stardist(source):
    import sys

    image, labels = source
    assert "stardist" not in sys.modules
    assert image.shape == labels.shape == (512, 512) and image.dtype == np.uint8
    assert len(np.unique(labels)) - 1 == 125  # the label map's 125 nuclei


def test_nuclei_split_is_spatial_and_disjoint(data_dir, source):
    image, labels = source
    builder = instances.prepare(data_dir)
    config = builder.builder_config
    split_row = 512 - config.eval_rows
    train, test = _examples(builder, "train"), _examples(builder, "test")
    assert len(train) == 35 and len(test) == 1
    covered = np.zeros((512, 512), int)
    for example, is_test in [(e, False) for e in train] + [(e, True) for e in test]:
        y, x = example["image/origin"]
        h, w = example["image"].shape[:2]
        assert (y >= split_row) if is_test else (y + h <= split_row)
        covered[y:y + h, x:x + w] += 1 if is_test else 1000
        np.testing.assert_array_equal(example["image"][..., 0], image[y:y + h, x:x + w])
        objects = example["objects"]
        masks = objects["mask"][..., 0].astype(bool)
        expected_masks, expected_boxes = coco.instances_from_label_map(labels[y:y + h,
                                                                              x:x + w])
        np.testing.assert_array_equal(masks, expected_masks)
        np.testing.assert_array_equal(objects["box"], expected_boxes)
        assert (objects["label"] == 0).all() and not objects["is_crowd"].any()
    # every pixel is in exactly one split; train tiles cover the training region
    assert (covered[split_row:] == 1).all() and (covered[:split_row] >= 1000).all()
    held_out = len(np.unique(labels[split_row:])) - 1
    assert len(test[0]["objects"]["box"]) == held_out
    assert builder.info.features["objects"]["label"].names == ["nucleus"]


def test_nuclei_through_the_pipelines_into_coco_metrics(data_dir):
    config = ml_collections.ConfigDict(dict(
        name="nuclei", data_dir=data_dir, split="train", batch_size=2, shuffle_buffer=35,
        pp="decode(3)|det_instances|det_flip_lr|det_flip_ud|det_scale_jitter(96, 0.5, 1.0)|"
           "det_pad(96, 32)|value_range(-1, 1)"))
    batch = next(pipeline.train_dataset(config, seed=0).as_numpy_iterator())
    assert batch["image"].shape == (2, 96, 96, 3) and batch["masks"].shape == (2, 32, 96, 96)
    assert batch["valid"].any(axis=1).all()
    batches = list(pipeline.eval_batches(config, "decode|det_instances|det_pad((128, 512), 48)",
                                         "test", 2))
    assert len(batches) == 1 and batches[0]["_mask"].tolist() == [1, 0]
    keys = ("boxes", "labels", "masks", "valid", "image_size", "is_crowd")
    gt = [{k: batches[0][k][0] for k in keys}]
    assert gt[0]["valid"].sum() == 36 and gt[0]["image_size"].tolist() == [128, 512]
    perfect = [dict(gt[0], scores=np.linspace(1, 0.1, 48))]
    metrics = coco.coco_metrics(gt, perfect, ["nucleus"])
    assert metrics["mask/AP"] == pytest.approx(1.0) and metrics["box/AP"] == pytest.approx(1.0)


def test_nuclei_config_errors():
    with pytest.raises(ValueError, match="eval_rows must be in"):
        instances.nuclei_crops(instances.InstancesConfig(name="x", eval_rows=512), 512, 512)
    with pytest.raises(ValueError, match="taller than the training region"):
        instances.nuclei_crops(instances.InstancesConfig(name="x", eval_rows=450), 512, 512)
    assert instances.tile_origins(10, 4, 3) == [0, 3, 6]
    assert instances.tile_origins(11, 4, 3) == [0, 3, 6, 7]


def _polygon(mask):
    """An outline polygon (x, y, ...) of a mask: its boundary pixels' corners, in order."""
    from skimage import measure

    contour = max(measure.find_contours(np.pad(mask, 1).astype(float), 0.5), key=len)
    return (contour[:, ::-1] - 1 + 0.5).ravel().round(2).tolist()


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory, source):
    """A COCO dataset written from the nuclei labels: 3 images (one empty), polygons,
    uncompressed and compressed RLE, and one degenerate polygon."""
    image, labels = source
    root = tmp_path_factory.mktemp("coco")
    os.makedirs(root / "images")
    crops = {1: (0, 0, 96, 128), 2: (400, 300, 80, 100), 3: (0, 0, 1, 1)}
    dataset = {"images": [], "annotations": [],
               "categories": [{"id": 7, "name": "nucleus"}, {"id": 3, "name": "debris"}]}
    expected = {}
    for image_id, (y, x, h, w) in crops.items():
        crop = image[y:y + h, x:x + w]
        if image_id == 3:
            crop = np.zeros((50, 60), np.uint8)  # an image without any instance
        name = f"img{image_id}.png"
        Image.fromarray(crop).save(root / "images" / name)
        dataset["images"].append({"id": image_id, "file_name": name,
                                  "height": crop.shape[0], "width": crop.shape[1]})
        if image_id == 3:
            continue
        masks, boxes = coco.instances_from_label_map(labels[y:y + h, x:x + w])
        expected[image_id] = (masks, boxes)
        for i, (mask, box) in enumerate(zip(masks, boxes)):
            kind = i % 3
            if kind == 0:
                segmentation = [_polygon(mask)]
            else:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                if kind == 1:  # uncompressed RLE: counts as a list of run lengths
                    flat = mask.T.ravel().astype(int)
                    changes = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
                    counts = np.diff(np.r_[0, changes]).tolist()
                    rle = {"size": [h, w], "counts": counts}
                else:
                    rle["counts"] = rle["counts"].decode()
                segmentation = rle
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": image_id,
                "category_id": 7, "iscrowd": 0, "segmentation": segmentation,
                "bbox": coco.xyxy_to_xywh(box[None])[0].tolist(), "area": int(mask.sum())})
    dataset["annotations"].append({  # a degenerate polygon: no pixel, dropped
        "id": 999, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 0,
        "segmentation": [[5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], "bbox": [5, 5, 1, 1]})
    path = root / "train.json"
    path.write_text(json.dumps(dataset))
    return str(root), str(path), dataset, expected


def test_coco_files_through_the_same_builder(tmp_path, coco_files):
    root, path, dataset, expected = coco_files
    config = instances.coco_config("nuclei_coco", os.path.join(root, "images"),
                                   {"train": path, "test": path}, channels=1)
    builder = instances.prepare(str(tmp_path), config)
    assert builder.info.features["objects"]["label"].names == ["debris", "nucleus"]  # by id
    examples = {int(e["image/id"]): e for e in _examples(builder, "train")}
    assert sorted(examples) == [1, 2, 3]
    assert len(examples[3]["objects"]["box"]) == 0 and examples[3]["image"].shape == (50, 60, 1)
    for image_id, (masks, boxes) in expected.items():
        objects = examples[image_id]["objects"]
        got = objects["mask"][..., 0].astype(bool)
        assert len(got) == len(masks)  # the degenerate polygon is dropped
        np.testing.assert_array_equal(objects["box"], boxes)
        assert (objects["label"] == 1).all()
        for i, (g, m) in enumerate(zip(got, masks)):
            if i % 3:  # RLE: exact
                np.testing.assert_array_equal(g, m)
            else:  # polygon: rasterised outline
                assert (g & m).sum() / (g | m).sum() > 0.8
    # the pipeline reads it too (input.name='coco')
    input_config = ml_collections.ConfigDict(dict(
        name="coco", data_dir=str(tmp_path), split="train", batch_size=2, shuffle_buffer=3,
        pp="decode(1)|det_instances|det_pad(128, 64)", coco=dict(
            name="nuclei_coco", image_dir=os.path.join(root, "images"), channels=1,
            annotation_files={"train": path, "test": path})))
    stream = pipeline.train_dataset(input_config, seed=0).as_numpy_iterator()
    batches = [next(stream) for _ in range(3)]  # 6 examples: two epochs of 3 images
    assert batches[0]["masks"].shape == (2, 64, 128, 128)
    assert batches[0]["image"].shape == (2, 128, 128, 1)
    counts = sorted(int(v.sum()) for b in batches for v in b["valid"])
    assert counts == sorted(2 * [0, len(expected[1][0]), len(expected[2][0])])


def test_coco_bad_inputs(tmp_path, coco_files):
    _, path, dataset, _ = coco_files
    with pytest.raises(ValueError, match=r"category_id 3 \('debris'\), which the config does "
                                         r"not know; its classes are \['nucleus'\]"):
        coco.read_coco(path, class_names=["nucleus"])
    bad = json.loads(json.dumps(dataset))
    bad["annotations"][0]["bbox"] = [500, 500, 10, 10]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    _, records = coco.read_coco(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="with nothing inside the 128x96 image"):
        list(records)
    partly = json.loads(json.dumps(dataset))
    partly["annotations"][0]["bbox"] = [120, 90, 30, 30]
    (tmp_path / "partly.json").write_text(json.dumps(partly))
    records = list(coco.read_coco(str(tmp_path / "partly.json"))[1])
    np.testing.assert_array_equal(records[0]["boxes"][0], [120, 90, 128, 96])  # clipped
    with pytest.raises(ValueError, match="do.*not exist"):
        instances.coco_config("x", str(tmp_path / "nowhere"), {"train": path})
    with pytest.raises(ValueError, match="needs input.coco"):
        pipeline.get_builder("coco", str(tmp_path))


def test_write_coco_round_trips(tmp_path, source):
    _, labels = source
    masks, boxes = coco.instances_from_label_map(labels[:64, :64])
    record = dict(id=5, file_name="a.png", height=64, width=64, boxes=boxes,
                  labels=np.zeros(len(boxes), np.int64), masks=masks,
                  is_crowd=np.zeros(len(boxes), bool))
    coco.write_coco(str(tmp_path / "out.json"), [record], ["nucleus"])
    names, records = coco.read_coco(str(tmp_path / "out.json"))
    records = list(records)
    assert names == ["nucleus"] and records[0]["file_name"] == "a.png"
    np.testing.assert_array_equal(records[0]["masks"], masks)
    np.testing.assert_array_equal(records[0]["boxes"], boxes)
