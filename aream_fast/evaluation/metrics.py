"""Segmentation and classification metrics (official ``evaluate.py`` semantics, docs/semantics.md, "Evaluation").

* Confusion matrix (rows = ground truth, columns = prediction) from one ``np.bincount``; GT == ignore_index
  (255) is skipped; a predicted id outside [0, C) (e.g. 255 in a pseudo-label PNG) goes to an extra last
  column: a miss of the GT class (it counts in T_c, in no P_c), as in the official script.
* IoU_c = TP / (T + P − TP + 1e-10); mIoU = plain mean over ALL C classes (official: 21 for VOC, 81 for COCO).
* ThresholdSweep: the official npy mode re-reads every file once per background threshold; here one pass
  accumulates a (C, C, T+1) histogram from which the confusion matrix of every threshold follows.
* Multi-label mAP: per-image average precision (sklearn ``average_precision_score`` semantics) averaged over
  images that have at least one positive label (official ``compute_mAP``).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(C, C + 1) int64 confusion matrix, rows = GT class, columns = predicted class, last column =
    predictions outside [0, C) (misses of the GT class).

    pred, gt: integer arrays/tensors of the same shape (any shape). GT values must be in [0, C) or
    ``ignore_index``.
    """
    pred, gt = _np(pred), _np(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    gt = gt.reshape(-1).astype(np.int64)
    pred = pred.reshape(-1).astype(np.int64)
    valid = gt != ignore_index
    gt, pred = gt[valid], pred[valid]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        bad = np.unique(gt[(gt < 0) | (gt >= num_classes)])
        raise ValueError(f"gt holds ids {bad[:10].tolist()} outside [0, {num_classes}) and not {ignore_index}")
    pred = np.where((pred < 0) | (pred >= num_classes), num_classes, pred)  # extra column, dropped below
    cm = np.bincount(gt * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    return cm.reshape(num_classes, num_classes + 1).astype(np.int64)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU (C,) float64 = TP / (T + P − TP + 1e-10), T = row sums (GT, including the out-of-range
    column of a (C, C + 1) matrix), P = column sums of the first C columns. Accepts (C, C) or (C, C + 1)."""
    cm = np.asarray(cm, dtype=np.float64)
    C = cm.shape[0]
    if cm.ndim != 2 or cm.shape[1] not in (C, C + 1):
        raise ValueError(f"confusion matrix must be (C, C) or (C, C + 1), got shape {cm.shape}")
    tp = np.diag(cm[:, :C])
    t = cm.sum(1)
    p = cm[:, :C].sum(0)
    return tp / (t + p - tp + 1e-10)


def miou_from_confusion(cm: np.ndarray) -> float:
    """Plain mean of :func:`iou_from_confusion` over all classes (official)."""
    return float(iou_from_confusion(cm).mean())


def cam_to_prediction(keys, cams, threshold: float) -> np.ndarray:
    """Official npy rule: argmax over [threshold plane, cams] (ties -> background), mapped to ids key + 1.

    keys (k,) int class indices, cams (k, H, W) float -> (H, W) int64.
    """
    keys, cams = _np(keys).astype(np.int64), _np(cams)
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise ValueError(f"cams must be (k, H, W) with k = len(keys) = {keys.shape[0]}, got {cams.shape}")
    stack = np.concatenate([np.full((1,) + cams.shape[1:], threshold, dtype=cams.dtype), cams], axis=0)
    ids = np.concatenate([[0], keys + 1])
    return ids[np.argmax(stack, axis=0)]


class ThresholdSweep:
    """Confusion matrices for many background thresholds from ONE pass over the CAMs.

    For threshold t the official prediction is bg where t >= max_k cam_k (ties go to the bg plane), else the
    id of the first arg-max class. The fg id and max do not depend on t, so each pixel contributes to a
    (gt, fg id, number of thresholds below its max) histogram; the confusion matrix of threshold j adds
    (gt, fg id) for pixels with t_j < max and (gt, 0) for the rest.

    thresholds: sequence of floats (default 0.01 … 0.79, official ``--start 1 --stop 80``). They are compared in
    the CAM's dtype, as the official float32 ``np.pad`` does.
    """

    def __init__(self, num_classes: int, thresholds: Optional[Sequence[float]] = None, ignore_index: int = 255):
        if thresholds is None:
            thresholds = [i / 100 for i in range(1, 80)]
        th = np.asarray(list(thresholds), dtype=np.float64)
        if th.ndim != 1 or th.size == 0:
            raise ValueError(f"thresholds must be a non-empty 1-D sequence, got {thresholds!r}")
        self.num_classes = int(num_classes)
        self.thresholds = th
        self.ignore_index = ignore_index
        self._order = np.argsort(th, kind="stable")
        self._hist = np.zeros((self.num_classes, self.num_classes + 1, th.size + 1), dtype=np.int64)
        self.num_images = 0

    def update(self, keys, cams, gt) -> None:
        """Add one image: keys (k,) class indices in [0, C−1), cams (k, H, W) float, gt (H, W) ids."""
        keys, cams, gt = _np(keys).astype(np.int64), _np(cams), _np(gt).astype(np.int64)
        C = self.num_classes
        if cams.ndim != 3 or cams.shape[0] != keys.shape[0] or cams.shape[1:] != gt.shape:
            raise ValueError(f"cams must be (len(keys)={keys.shape[0]}, H, W) matching gt {gt.shape}, "
                             f"got {cams.shape}")
        if keys.size and (keys.min() < 0 or keys.max() >= C - 1):
            raise ValueError(f"keys must be class indices in [0, {C - 1}), got {keys.tolist()}")
        valid = gt != self.ignore_index
        g = gt[valid]
        if g.size and (g.min() < 0 or g.max() >= C):
            raise ValueError(f"gt holds ids outside [0, {C}) and not {self.ignore_index}")
        th = self.thresholds[self._order].astype(cams.dtype if cams.dtype.kind == "f" else np.float64)
        if keys.size:
            c = cams[:, valid]
            fg = keys[np.argmax(c, axis=0)] + 1
            nbelow = np.searchsorted(th, c.max(axis=0), side="left")  # thresholds strictly below the max
        else:
            fg = np.zeros(g.shape, dtype=np.int64)
            nbelow = np.zeros(g.shape, dtype=np.int64)
        T1 = th.size + 1
        idx = (g * (C + 1) + fg) * T1 + nbelow
        self._hist += np.bincount(idx, minlength=C * (C + 1) * T1).reshape(C, C + 1, T1)
        self.num_images += 1

    def confusion_matrices(self) -> np.ndarray:
        """(T, C, C) int64, in the order the thresholds were given."""
        C = self.num_classes
        # pixels predicted fg at sorted threshold j: nbelow > j
        above = np.cumsum(self._hist[..., ::-1], axis=-1)[..., ::-1]  # above[..., j] = sum_{n >= j}
        fg_j = above[..., 1:]  # (C, C+1, T): counts with nbelow >= j + 1
        total = self._hist.sum(-1)  # (C, C+1)
        cms = np.zeros((self.thresholds.size, C, C), dtype=np.int64)
        for j in range(self.thresholds.size):
            f = fg_j[..., j]
            cm = np.zeros((C, C), dtype=np.int64)
            cm[:, 1:] = f[:, 1:C]  # fg ids 1..C-1
            cm[:, 0] = total.sum(1) - f[:, 1:].sum(1)  # everything else is predicted bg
            cms[self._order[j]] = cm
        return cms

    def results(self) -> Dict[str, object]:
        """{"thresholds", "miou" (T,), "best_index", "best_threshold", "best_miou", "best_iou" (C,)}."""
        cms = self.confusion_matrices()
        ious = np.stack([iou_from_confusion(cm) for cm in cms])
        mious = ious.mean(1)
        best = int(np.argmax(mious))  # first best, like the official strict '<' update
        return {"thresholds": self.thresholds.tolist(), "miou": mious.tolist(), "best_index": best,
                "best_threshold": float(self.thresholds[best]), "best_miou": float(mious[best]),
                "best_iou": ious[best].tolist(), "best_confusion": cms[best]}


def average_precision(y_true, scores) -> float:
    """Binary average precision, sklearn ``average_precision_score`` semantics:
    AP = Σ_n (R_n − R_{n−1}) P_n over the distinct score thresholds in decreasing order (tied scores form one
    step). y_true (K,) {0, 1}, scores (K,) float. Returns nan when there is no positive."""
    y = _np(y_true).reshape(-1) > 0
    s = _np(scores).reshape(-1).astype(np.float64)
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} must have the same length")
    npos = int(y.sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each group of tied scores
    tp = np.cumsum(y)[last].astype(np.float64)
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / npos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_map(labels, scores) -> Tuple[float, np.ndarray]:
    """Mean of per-image AP over images with at least one positive: labels (B, K), scores (B, K).
    Returns (mAP, per-image AP array with nan for images without positives)."""
    labels, scores = _np(labels), _np(scores)
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must both be (B, K), got {labels.shape} and {scores.shape}")
    aps = np.array([average_precision(labels[i], scores[i]) for i in range(labels.shape[0])])
    valid = ~np.isnan(aps)
    return (float(aps[valid].mean()) if valid.any() else float("nan")), aps
