#!/usr/bin/env python
"""Evaluate CAMs (npy, background-threshold sweep) or label PNGs against ground-truth masks (docs/semantics.md,
"Evaluation").

    python scripts/evaluate.py --cam-dir out/cams --dataset synthetic --data-root ~/.cache/aream_fast/... \
        --split train
    python scripts/evaluate.py --png-dir out/pseudo --dataset voc --data-root ~/data/VOCdevkit/VOC2012 \
        --split train --mask-dir SegmentationClass

npy files: ``<name>.npy`` = pickled dict {"key": int64 (k,) present class indices, "cam": float (k, H, W)}
(the official / ``aream_fast.pseudo_labels.cam.save_cam_npy`` format). One pass over the files accumulates the confusion
matrices of every threshold t = start/100 … (stop−1)/100. mIoU = mean over all K+1 classes (official).
Differences from the official script, on purpose: a missing prediction file is an error (the official one
silently substitutes the ground truth; only a CAM file of an image without any class label may be absent, as
the official writer skips those: it is scored as all background), and a prediction folder that is a
ground-truth folder is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

try:
    import aream_fast  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aream_fast.data.classes import dataset_info  # noqa: E402
from aream_fast.data.dataset import labels_from_mask  # noqa: E402
from aream_fast.data.image_io import read_mask  # noqa: E402
from aream_fast.data.layout import DatasetLayoutError, resolve_split  # noqa: E402
from aream_fast.evaluation.metrics import ThresholdSweep, confusion_matrix, iou_from_confusion  # noqa: E402
from aream_fast.pseudo_labels.seeds import load_cam_npy  # noqa: E402


def _gt_folders(files_root: Path, mask_dir: Path) -> List[Path]:
    out = [mask_dir]
    for n in ("SegmentationClass", "SegmentationClassAug"):
        if (files_root / n).is_dir():
            out.append(files_root / n)
    return out


def _refuse_gt_folder(pred_dir: Path, gt_dirs: Sequence[Path]) -> None:
    for g in gt_dirs:
        if g.exists() and os.path.samefile(pred_dir, g):
            raise ValueError(f"prediction folder {pred_dir} is (or resolves to) the ground-truth folder {g}; "
                             f"refusing to evaluate ground truth against itself")


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cam-dir", type=Path, help="folder of <name>.npy CAM files (threshold sweep)")
    src.add_argument("--png-dir", type=Path, help="folder of <name>.png label maps")
    p.add_argument("--dataset", choices=("synthetic", "voc", "coco"), default="synthetic")
    p.add_argument("--data-root", type=Path, required=True, help="dataset folder (see aream_fast.data.layout)")
    p.add_argument("--split", default="train",
                   help="split name or list file (default train: the official CAM protocol on VOC train; the demo "
                        "train.py scores --cam-split val and writes <run>/cams_val/, so pass --split val for those)")
    p.add_argument("--mask-dir", default=None,
                   help="GT mask folder under the root (default: for VOC, SegmentationClass when it holds "
                        "every listed mask (the official protocol); otherwise SegmentationClassAug if present, "
                        "else SegmentationClass)")
    p.add_argument("--start", type=int, default=1, help="first threshold ×100 (official 1)")
    p.add_argument("--stop", type=int, default=80, help="last threshold ×100, exclusive (official 80)")
    p.add_argument("--out", type=Path, default=None, help="JSON result file (default <pred-dir>/eval_<split>.json)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.cam_dir is not None and not (0 <= a.start < a.stop):
        p.error(f"need 0 <= --start < --stop, got {a.start} and {a.stop}")
    return a


def evaluate(args: argparse.Namespace) -> Dict[str, object]:
    from tqdm import tqdm

    info = dataset_info(args.dataset)
    C = info.num_classes + 1
    files = None
    if args.mask_dir is None and args.dataset == "voc":
        # Official protocol (docs/semantics.md, "Evaluation"): the VOC ground truth is SegmentationClass, not
        # SegmentationClassAug
        # (which resolve_split prefers for training). Use it whenever it holds every listed mask.
        try:
            files = resolve_split(args.dataset, args.data_root, args.split, with_masks=True,
                                  mask_dir="SegmentationClass")
        except DatasetLayoutError:
            files = None
    if files is None:
        files = resolve_split(args.dataset, args.data_root, args.split, with_masks=True, mask_dir=args.mask_dir)
    pred_dir = (args.cam_dir if args.cam_dir is not None else args.png_dir).expanduser()
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} does not exist")
    _refuse_gt_folder(pred_dir, _gt_folders(files.root, files.mask_dir))
    ext = ".npy" if args.cam_dir is not None else ".png"
    paths = [pred_dir / f"{n}{ext}" for n in files.names]
    missing = [p for p in paths if not p.is_file()]
    if missing and args.cam_dir is not None:
        # the official CAM writer skips images without any class label (no file): those are all background
        missing = [p for p, n, g in zip(paths, files.names, files.mask_paths) if not p.is_file()
                   and (files.labels[n] if files.labels is not None
                        else labels_from_mask(read_mask(g), info.num_classes, str(g))).any()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} prediction files are missing, e.g. {missing[0]}"
                                + ("" if len(missing) == 1 else f" and {missing[1]}"))
    if args.cam_dir is not None:
        sweep = ThresholdSweep(C, [i / 100 for i in range(args.start, args.stop)])
    else:
        cm = np.zeros((C, C + 1), dtype=np.int64)
    for name, pred_path, gt_path in tqdm(list(zip(files.names, paths, files.mask_paths)), desc="evaluating",
                                         disable=args.no_progress):
        gt = read_mask(gt_path)
        if args.cam_dir is not None:
            if pred_path.is_file():
                keys, cams = load_cam_npy(pred_path, info.num_classes)
            else:  # image without labels (checked above): all background
                keys, cams = np.zeros(0, np.int64), np.zeros((0,) + gt.shape, np.float32)
            if cams.shape[1:] != gt.shape:
                raise ValueError(f"CAM {pred_path} has size {cams.shape[1:]}, ground truth {gt_path} {gt.shape}")
            sweep.update(keys, cams, gt)
        else:
            pred = read_mask(pred_path)
            if pred.shape != gt.shape:
                raise ValueError(f"prediction {pred_path} has size {pred.shape}, ground truth {gt_path} {gt.shape}")
            cm += confusion_matrix(pred, gt, C)
    names = ("background",) + tuple(info.class_names)
    if args.cam_dir is not None:
        r = sweep.results()
        ious, best_t, best_cm = np.asarray(r["best_iou"]), r["best_threshold"], r["best_confusion"]
        sweep_list = [{"threshold": t, "miou": m} for t, m in zip(r["thresholds"], r["miou"])]
    else:
        ious, best_t, best_cm, sweep_list = iou_from_confusion(cm), None, cm, None
    result = {"dataset": args.dataset, "split": args.split, "num_images": len(files.names),
              "prediction_dir": str(pred_dir), "gt_dir": str(files.mask_dir),
              "mode": "npy" if args.cam_dir is not None else "png", "best_threshold": best_t,
              "miou": float(ious.mean()), "per_class_iou": dict(zip(names, map(float, ious))),
              "sweep": sweep_list, "confusion": best_cm.tolist()}
    return result


def report(result: Dict[str, object]) -> str:
    lines = [f"{result['dataset']} / {result['split']}: {result['num_images']} images, {result['mode']} mode"]
    cm = np.asarray(result["confusion"])
    if cm.sum() and cm[:, :cm.shape[0]].trace() == cm.sum():
        lines.append("WARNING: the predictions equal the ground truth on every pixel; are these copies of the "
                     "ground-truth masks?")
    if result["best_threshold"] is not None:
        lines.append(f"best background threshold: {result['best_threshold']:.2f}")
    lines.append(f"mIoU: {100 * result['miou']:.2f}")
    lines.append(f"{'class':<16} IoU")
    for n, v in result["per_class_iou"].items():
        lines.append(f"{n:<16} {100 * v:6.2f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = _parse(argv)
    result = evaluate(args)
    print(report(result))
    pred_dir = args.cam_dir if args.cam_dir is not None else args.png_dir
    out = args.out if args.out is not None else pred_dir / f"eval_{Path(args.split).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    from aream_fast.engine.errors import main_guard

    sys.exit(main_guard(main))
