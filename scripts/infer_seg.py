#!/usr/bin/env python
"""Segmentation inference: checkpoint -> PNG predictions (VOC palette) + mIoU with per-class IoU.

    python scripts/infer_seg.py --checkpoint runs/seg/checkpoint.pth --dataset voc \
        --data-root ~/data/VOCdevkit/VOC2012 --splits val train --out out/seg_pred --crf toco

The checkpoint holds {"model": state_dict, "seg_model": {"name", "num_classes", ...}} (the format of
``aream_fast.stage2.seg_models.save_seg_checkpoint``). Per split: ``<out>/<split>/<name>.png`` predictions at
the native image size and ``<out>/report_<split>.json`` = {"split", "scales", "flip", "combine", "crf_preset",
"checkpoint": {"path", "sha256"}, "num_images", "miou", "per_class_iou", "confusion"}. Inference is
``aream_fast.stage2.inference.multiscale_flip_probs`` (default scales 0.5-1.5 and flip; sliding windows above
``--max-pixels``), then ``crf_refine`` with ``--crf PRESET`` when given. mIoU is the mean over all K + 1
classes of ``aream_fast.evaluation.metrics`` (official semantics). Ground truth: for VOC, SegmentationClass when it holds
every listed mask (the official protocol, as scripts/evaluate.py), otherwise the layout's mask folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

try:
    import aream_fast  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aream_fast.data.classes import dataset_info  # noqa: E402
from aream_fast.data.dataset import SegmentationDataset  # noqa: E402
from aream_fast.data.image_io import write_mask  # noqa: E402
from aream_fast.data.layout import DatasetLayoutError, resolve_split  # noqa: E402
from aream_fast.data.transforms import EvalTransform  # noqa: E402
from aream_fast.evaluation.metrics import confusion_matrix, iou_from_confusion  # noqa: E402
from aream_fast.stage2.inference import (DEFAULT_MAX_PIXELS, DEFAULT_OVERLAP, DEFAULT_SCALES,  # noqa: E402
                                         DEFAULT_TILE, crf_refine, multiscale_flip_probs)
from aream_fast.stage2.seg_models import load_seg_model  # noqa: E402


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="segmentation checkpoint (model + seg_model)")
    p.add_argument("--dataset", choices=("synthetic", "voc", "coco"), default="synthetic")
    p.add_argument("--data-root", type=Path, required=True, help="dataset folder (see aream_fast.data.layout)")
    p.add_argument("--splits", nargs="+", default=["val"], help="splits (names or list files) to predict")
    p.add_argument("--mask-dir", default=None, help="ground-truth mask folder under the root (default: see above)")
    p.add_argument("--out", type=Path, required=True, help="output folder for PNGs and report JSON files")
    p.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES))
    p.add_argument("--no-flip", action="store_true", help="do not add the horizontally flipped image")
    p.add_argument("--combine", choices=("max", "mean"), default="max", help="how scales are combined")
    p.add_argument("--crf", default=None, metavar="PRESET", help="dense-CRF preset (aream_fast.stage2.dense_crf)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="above this many pixels a scaled image runs as sliding windows")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE)
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of each split (smoke runs)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be >= 1, got {a.limit}")
    return a


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _gt_split(args: argparse.Namespace, split: str):
    if args.mask_dir is None and args.dataset == "voc":
        try:  # official protocol: SegmentationClass (scripts/evaluate.py does the same)
            return resolve_split("voc", args.data_root, split, with_masks=True, mask_dir="SegmentationClass")
        except DatasetLayoutError:
            pass
    return resolve_split(args.dataset, args.data_root, split, with_masks=True, mask_dir=args.mask_dir)


def predict_split(args: argparse.Namespace, model, split: str, device, checkpoint: Dict[str, str]) -> Dict:
    import torch
    from tqdm import tqdm

    info = dataset_info(args.dataset)
    C = info.num_classes + 1
    if model.num_classes != C:
        raise ValueError(f"checkpoint {args.checkpoint} predicts {model.num_classes} classes but {args.dataset} "
                         f"has {C} (background included)")
    files = _gt_split(args, split)
    ds = SegmentationDataset(files, EvalTransform(None))
    n = len(ds) if args.limit is None else min(args.limit, len(ds))
    out_dir = args.out / Path(split).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    cm = np.zeros((C, C + 1), dtype=np.int64)
    for i in tqdm(range(n), desc=f"predicting {split}", disable=args.no_progress):
        item = ds[i]
        probs = multiscale_flip_probs(model, item["image"][None].to(device), args.scales, flip=not args.no_flip,
                                      combine=args.combine, max_pixels=args.max_pixels, tile=args.tile,
                                      overlap=args.overlap)[0]
        if args.crf is not None:
            probs = crf_refine(ds.load_raw(i)["image"], probs.cpu(), args.crf)
        pred = probs.argmax(0).to(torch.uint8).cpu().numpy()
        write_mask(out_dir / f"{item['name']}.png", pred)
        cm += confusion_matrix(pred, item["mask"], C)
    ious = iou_from_confusion(cm)
    names = ("background",) + tuple(info.class_names)
    return {"dataset": args.dataset, "split": split, "num_images": n, "prediction_dir": str(out_dir),
            "gt_dir": str(files.mask_dir), "scales": list(args.scales), "flip": not args.no_flip,
            "combine": args.combine, "crf_preset": args.crf, "checkpoint": checkpoint,
            "seg_model": dict(model.seg_config), "max_pixels": args.max_pixels, "miou": float(ious.mean()),
            "per_class_iou": dict(zip(names, map(float, ious))), "confusion": cm.tolist()}


def report(result: Dict) -> str:
    post = f"scales {result['scales']}, flip {result['flip']}, CRF {result['crf_preset'] or 'none'}"
    lines = [f"{result['dataset']} / {result['split']}: {result['num_images']} images, {post}",
             f"mIoU: {100 * result['miou']:.2f}", f"{'class':<16} IoU"]
    lines += [f"{k:<16} {100 * v:6.2f}" for k, v in result["per_class_iou"].items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    import torch

    args = _parse(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model = load_seg_model(args.checkpoint).to(device)
    checkpoint = {"path": str(args.checkpoint.resolve()), "sha256": _sha256(args.checkpoint)}
    results = []
    for split in args.splits:
        result = predict_split(args, model, split, device, checkpoint)
        path = args.out / f"report_{Path(split).stem}.json"
        path.write_text(json.dumps(result, indent=1))
        print(report(result))
        print(f"wrote {path}")
        results.append(result)
    return results


if __name__ == "__main__":
    from aream_fast.engine.errors import main_guard

    sys.exit(main_guard(main))
