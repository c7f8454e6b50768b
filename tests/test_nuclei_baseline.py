"""The nuclei baseline (Otsu + connected components) and the instance overlay pictures."""

import json

import numpy as np
import pytest
from PIL import Image

from experiments import nuclei_baseline
from flexvision.data import coco, instances, overlay


def test_otsu_threshold_matches_scikit_image_and_a_hand_case():
    from skimage.filters import threshold_otsu

    image, _ = instances.stardist_nuclei()
    for region in (image, image[384:], image[:64, :64]):
        assert nuclei_baseline.otsu_threshold(region) == threshold_otsu(region)
    # two grey levels 10 and 200: any cut between separates them; the first one is 10
    two = np.array([[10, 10, 200], [200, 200, 10]], np.uint8)
    assert nuclei_baseline.otsu_threshold(two) == 10
    with pytest.raises(ValueError, match="at least two grey levels"):
        nuclei_baseline.otsu_threshold(np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="integer image"):
        nuclei_baseline.otsu_threshold(np.zeros((3, 3)))


def test_threshold_instances_finds_separate_blobs():
    image = np.full((20, 30), 5, np.uint8)
    image[2:6, 3:9] = 200
    image[10:18, 20:25] = 120
    image[10, 12] = 250  # one bright pixel, dropped by min_area
    pred = nuclei_baseline.threshold_instances(image, min_area=2)
    assert len(pred["masks"]) == 2
    np.testing.assert_array_equal(pred["boxes"], [[3, 2, 9, 6], [20, 10, 25, 18]])
    np.testing.assert_allclose(pred["scores"], [200 / 250, 120 / 250])
    assert len(nuclei_baseline.threshold_instances(image)["masks"]) == 3


def test_run_writes_figures_that_coco_metrics_gives(tmp_path):
    table = nuclei_baseline.run(str(tmp_path / "out"), data_dir=str(tmp_path / "tfds"))
    saved = json.loads((tmp_path / "out" / "nuclei_baseline.json").read_text())
    assert saved["metrics"] == table["metrics"]
    image, labels = instances.stardist_nuclei()
    masks, boxes = coco.instances_from_label_map(labels[384:])
    expected = coco.coco_metrics(
        [dict(boxes=boxes, labels=np.zeros(len(boxes), int), masks=masks)],
        [nuclei_baseline.threshold_instances(image[384:])], ["nucleus"])
    assert table["metrics"] == expected
    assert table["ground_truth_instances"] == len(boxes)
    assert 0 < table["metrics"]["mask/AP50"] < 1
    picture = np.asarray(Image.open(tmp_path / "out" / "nuclei_baseline.png"))
    assert picture.shape == (3 * 2 * 128 + 2 * 4, 2 * 512, 3)


def test_outlines_and_overlay_colors():
    masks = np.zeros((2, 8, 10), bool)
    masks[0, 1:5, 1:6] = True
    masks[1, 6:8, 7:10] = True  # touches the image border
    edges = overlay.outlines(masks)
    inner = np.zeros_like(masks[0])
    inner[2:4, 2:5] = True
    np.testing.assert_array_equal(edges[0], masks[0] & ~inner)
    assert edges[1].sum() == masks[1].sum()  # 2 rows thick: every pixel is on the boundary
    image = np.full((8, 10), 100, np.uint8)
    colors = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    out = overlay.overlay_instances(image, masks, colors=colors, fill_alpha=0.5, percentiles=None)
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[1, 1], [255, 0, 0])  # outline: the instance colour
    np.testing.assert_array_equal(out[2, 2], [178, 50, 50])  # fill: half-way blend
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # background untouched
    assert len({tuple(c) for c in overlay.instance_colors(12)}) == 12
    with pytest.raises(ValueError, match="image's"):
        overlay.overlay_instances(image, masks[:, :4])
