"""Boundary IoU (Cheng et al. 2021) on hand-computed cases, and its defined edge cases."""

import numpy as np
import pytest

from flexvision.detection import boundary


def _square(shape, rows, cols):
    mask = np.zeros(shape, np.uint8)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = 1
    return mask


def test_boundary_of_a_square_is_its_ring():
    gt = _square((5, 5), (1, 4), (1, 4))
    ring = gt.astype(bool).copy()
    ring[2, 2] = False
    np.testing.assert_array_equal(boundary.mask_boundary(gt, 1), ring)
    # width 2 reaches the centre from every side: the whole square is boundary
    np.testing.assert_array_equal(boundary.mask_boundary(gt, 2), gt.astype(bool))


def test_shifted_square_by_hand():
    """gt: 3x3 square at rows/cols 1-3 of a 5x5 image; pred: shifted right by one, touching the
    right border. d = 1: gt's boundary is its 8-pixel ring; pred's is all of it but (2, 3), since
    the border counts as background ((2, 4) is boundary). They share (1,2) (1,3) (3,2) (3,3):
    4 / (8 + 8 - 4) = 1/3."""
    gt = _square((5, 5), (1, 4), (1, 4))
    pred = _square((5, 5), (1, 4), (2, 5))
    expected_pred = pred.astype(bool).copy()
    expected_pred[2, 3] = False
    np.testing.assert_array_equal(boundary.mask_boundary(pred, 1), expected_pred)
    assert boundary.boundary_iou(gt, pred, width=1) == pytest.approx(1 / 3)
    # width 2: both boundaries are the whole masks, so boundary IoU = mask IoU = 6 / 12
    assert boundary.boundary_iou(gt, pred, width=2) == pytest.approx(0.5)


def test_interior_changes_do_not_count():
    """Only the boundary band counts: a 20x20 square (d = 1: its 76-pixel ring) against the same
    square with a 2x2 hole in the middle, whose boundary is the ring plus the 12 pixels around
    the hole (a 4x4 block minus the hole): 76 / 88."""
    gt = _square((30, 30), (5, 25), (5, 25))
    pred = gt.copy()
    pred[14:16, 14:16] = 0
    assert np.count_nonzero(boundary.mask_boundary(gt, 1)) == 76
    assert np.count_nonzero(boundary.mask_boundary(pred, 1)) == 88
    assert boundary.boundary_iou(gt, pred, width=1) == pytest.approx(76 / 88)


def test_full_image_mask_touching_every_border():
    full = np.ones((4, 6), bool)
    expected = np.ones((4, 6), bool)
    expected[1:3, 1:5] = False
    np.testing.assert_array_equal(boundary.mask_boundary(full, 1), expected)
    assert boundary.boundary_iou(full, full, width=1) == 1.0


def test_width_from_the_dilation_ratio():
    # diagonal of 30x40 is 50: 2 % -> 1 pixel, 10 % -> 5, tiny ratios still give 1
    assert boundary.boundary_width((30, 40)) == 1
    assert boundary.boundary_width((30, 40), 0.1) == 5
    assert boundary.boundary_width((30, 40), 1e-6) == 1
    gt = _square((30, 40), (5, 20), (5, 30))
    pred = _square((30, 40), (6, 20), (5, 30))
    assert boundary.boundary_iou(gt, pred) == boundary.boundary_iou(gt, pred, width=1)


def test_empty_masks_and_bad_input():
    empty = np.zeros((8, 8), np.uint8)
    square = _square((8, 8), (2, 6), (2, 6))
    assert boundary.boundary_iou(empty, empty, width=1) == 1.0
    assert boundary.boundary_iou(empty, square, width=1) == 0.0
    assert boundary.boundary_iou(square, empty, width=1) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        boundary.boundary_iou(square, np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="boolean or integer"):
        boundary.boundary_iou(square, square * 0.9)
    with pytest.raises(ValueError, match="positive int"):
        boundary.mask_boundary(square, 0)
    with pytest.raises(ValueError, match="dilation_ratio"):
        boundary.boundary_iou(square, square, dilation_ratio=0)


def _reference_boundary(mask, width):
    """The boundary-iou-api recipe, independently: pad one background pixel, erode ``width``
    times with a 3x3 square (cv2.erode: pixels beyond the array count as foreground), crop,
    subtract."""
    padded = np.pad(mask.astype(np.uint8), 1)
    for _ in range(width):
        big = np.pad(padded, 1, constant_values=1)
        padded = np.min([big[r:r + padded.shape[0], c:c + padded.shape[1]]
                         for r in range(3) for c in range(3)], axis=0)
    return mask.astype(bool) & ~padded[1:-1, 1:-1].astype(bool)


@pytest.mark.parametrize("width", [1, 2, 4])
def test_matches_iterated_3x3_erosion_on_random_masks(width):
    rng = np.random.default_rng(width)
    for _ in range(5):
        mask = rng.random((23, 31)) < 0.6
        np.testing.assert_array_equal(boundary.mask_boundary(mask, width),
                                      _reference_boundary(mask, width))
