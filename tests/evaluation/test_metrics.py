"""Metrics against hand-computed values and brute-force recomputation."""
import numpy as np
import pytest

from aream_fast.evaluation.metrics import (ThresholdSweep, average_precision, cam_to_prediction, confusion_matrix,
                                iou_from_confusion, miou_from_confusion, multilabel_map)


def test_confusion_by_hand():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 7]])  # 7 is out of range: a miss for GT 1
    cm = confusion_matrix(pred, gt, 3)
    expected = np.array([[1, 1, 0, 0],
                         [0, 2, 0, 1],
                         [1, 0, 1, 0]])
    np.testing.assert_array_equal(cm, expected)
    iou = iou_from_confusion(cm)
    # class 0: TP 1, T 2, P 2 -> 1/3; class 1: TP 2, T 3, P 3 -> 2/4; class 2: TP 1, T 2, P 1 -> 1/2
    np.testing.assert_allclose(iou, [1 / 3, 0.5, 0.5], rtol=1e-9)
    assert miou_from_confusion(cm) == pytest.approx((1 / 3 + 0.5 + 0.5) / 3)


def test_absent_class_counts_as_zero_and_bad_gt():
    cm = confusion_matrix(np.zeros((2, 2)), np.zeros((2, 2)), 4)
    np.testing.assert_allclose(iou_from_confusion(cm), [1.0, 0.0, 0.0, 0.0])  # official: absent class -> 0
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.zeros(3), np.array([0, 9, 1]), 4)


def test_cam_to_prediction_ties_go_to_background():
    keys = np.array([2, 0])
    cams = np.array([[[0.5, 0.2, 0.9]], [[0.1, 0.3, 0.9]]], dtype=np.float32)
    assert cam_to_prediction(keys, cams, 0.5).tolist() == [[0, 0, 3]]
    assert cam_to_prediction(keys, cams, 0.25).tolist() == [[3, 1, 3]]


def test_threshold_sweep_equals_per_threshold_recomputation():
    rng = np.random.default_rng(0)
    C = 5
    th = [0.05, 0.3, 0.1, 0.5, 0.77, 0.25]  # unsorted on purpose
    sweep = ThresholdSweep(C, th)
    data = []
    for i in range(4):
        H, W = 7, 9
        keys = np.sort(rng.choice(C - 1, size=int(rng.integers(0, 3)), replace=False))
        cams = (rng.integers(0, 10, size=(keys.size, H, W)) / 10).astype(np.float32)  # many exact ties
        gt = rng.integers(0, C, size=(H, W))
        gt[rng.random((H, W)) < 0.1] = 255
        sweep.update(keys, cams, gt)
        data.append((keys, cams, gt))
    cms = sweep.confusion_matrices()
    for j, t in enumerate(th):
        ref = sum(confusion_matrix(cam_to_prediction(k, c, np.float32(t)), g, C) for k, c, g in data)
        assert not ref[:, C].any()
        ref = ref[:, :C]
        np.testing.assert_array_equal(cms[j], ref)
    r = sweep.results()
    best = int(np.argmax(r["miou"]))
    assert r["best_threshold"] == th[best]
    assert r["best_miou"] == pytest.approx(miou_from_confusion(cms[best]))
    assert ThresholdSweep(3).thresholds[[0, -1]].tolist() == [0.01, 0.79]


def test_average_precision_by_hand():
    # scores desc: 0.9(+) 0.8(-) 0.7(+) 0.1(-): AP = 1/2*1 + 1/2*(2/3)
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 1 / 3)
    # ties form one step: {0.5(+), 0.5(-)} then 0.2(+): AP = 1/2*1/2 + 1/2*2/3
    assert average_precision([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(0.25 + 1 / 3)
    assert np.isnan(average_precision([0, 0], [0.1, 0.2]))
    m, aps = multilabel_map(np.array([[1, 0, 0], [0, 0, 0], [0, 1, 1]]),
                            np.array([[0.9, 0.1, 0.2], [0.5, 0.5, 0.5], [0.9, 0.8, 0.1]]))
    # image 0: AP 1; image 1 skipped; image 2: 0.8(+) rank 2 -> 1/2*1/2, 0.1(+) rank 3 -> 1/2*2/3
    assert m == pytest.approx((1 + 0.25 + 1 / 3) / 2)
    assert np.isnan(aps[1])


def test_average_precision_matches_bruteforce_definition():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.integers(0, 2, 12)
        if y.sum() == 0:
            y[0] = 1
        s = rng.integers(0, 5, 12) / 4.0
        # brute force: for each distinct threshold t (desc), precision/recall of {s >= t}
        ap, prev_r = 0.0, 0.0
        for t in sorted(set(s.tolist()), reverse=True):
            sel = s >= t
            p, r = (y[sel] == 1).sum() / sel.sum(), (y[sel] == 1).sum() / y.sum()
            ap += (r - prev_r) * p
            prev_r = r
        assert average_precision(y, s) == pytest.approx(ap)
