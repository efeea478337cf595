#!/usr/bin/env python
"""CAM seeds (.npy from make_cams.py) -> pseudo masks (VOC palette PNGs), scored on the split's ground truth.

    python scripts/make_pseudo_masks.py --cam-dir runs/.../cams_train --dataset synthetic --data-root DATA \
        --split train --out-dir masks/thr                            # threshold only (best of the CAM sweep)
    python scripts/make_pseudo_masks.py ... --crf cam --out-dir masks/crf
    python scripts/make_pseudo_masks.py ... --random-walk aream --checkpoint runs/.../checkpoint_best.pth \
        --out-dir masks/rw                                           # RW on the ViT's own attention
    python scripts/make_pseudo_masks.py ... --crf cam --ignore --out-dir masks/la_ha   # official la/ha rule

The background threshold is ``--bg-threshold T`` or, by default (``auto``), the best threshold of the CAM
evaluation sweep found in the CAM folder (``cam_eval.json`` of ``make_cams.py --eval`` or ``eval_<split>.json``
of ``scripts/evaluate.py``). Masks are made without reading any ground truth; afterwards they are scored with
the CAM evaluation's confusion-matrix code (VOC: SegmentationClass, the official protocol, when it holds every
listed mask) and ``<out-dir>/report.json`` names the split, the post-processing and its presets.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

try:
    import aream_fast  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make_pseudo_masks.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cam-dir", type=Path, required=True, help="folder of <name>.npy CAM seeds")
    p.add_argument("--dataset", choices=("synthetic", "voc", "coco"), default="synthetic")
    p.add_argument("--data-root", type=Path, required=True, help="dataset folder (see aream_fast.data.layout)")
    p.add_argument("--split", default="train", help="split name or list file (official scoring: VOC train)")
    p.add_argument("--cls-labels", default=None, help="image-level label file (default <root>/cls_labels.npy)")
    p.add_argument("--out-dir", type=Path, required=True, help="folder for the <name>.png masks and report.json")
    p.add_argument("--bg-threshold", default="auto",
                   help="constant background score, or 'auto' = the best threshold of the CAM evaluation sweep")
    p.add_argument("--crf", default=None, metavar="PRESET", help="dense CRF preset (aream_fast.stage2.CRF_PRESETS)")
    p.add_argument("--crf-iterations", type=int, default=10)
    p.add_argument("--ignore", action="store_true",
                   help="official low/high-alpha rule: bg (1-max)^1 and (1-max)^12, agree -> label, else 255")
    p.add_argument("--random-walk", default=None, metavar="PRESET",
                   help="random-walk preset (aream_fast.stage2.RW_PRESETS); needs --checkpoint")
    p.add_argument("--checkpoint", default=None, help="stage-one checkpoint whose attention is the affinity")
    p.add_argument("--affinity-layers", default=None,
                   help="comma-separated layers for the affinity (default: the AReAM-supervised deep layers)")
    p.add_argument("--rw-beta", type=float, default=None)
    p.add_argument("--rw-t", type=int, default=None)
    p.add_argument("--rw-radius", type=float, default=None, help="grid radius of the affinity (0: all pairs)")
    p.add_argument("--mask-dir", default=None, help="GT mask folder under the root for scoring (default as "
                                                    "scripts/evaluate.py)")
    p.add_argument("--no-eval", action="store_true", help="do not score the masks")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.crf_iterations < 1:
        p.error(f"--crf-iterations must be >= 1, got {a.crf_iterations}")
    if a.random_walk is not None and a.checkpoint is None:
        p.error("--random-walk needs --checkpoint (the ViT whose attention gives the affinity)")
    return a


def _threshold(args: argparse.Namespace):
    from aream_fast.stage2.masks import best_threshold_from

    if args.ignore:
        if args.bg_threshold != "auto":
            raise ValueError("--ignore uses the la / ha background planes (alphas 1 and 12), not --bg-threshold; "
                             "drop one of them")
        return None, "not used (--ignore: la / ha alphas 1 and 12)"
    if args.bg_threshold == "auto":
        return best_threshold_from(args.cam_dir, args.split)
    try:
        t = float(args.bg_threshold)
    except ValueError:
        raise ValueError(f"--bg-threshold must be a number in [0, 1] or 'auto', got {args.bg_threshold!r}") from None
    if not 0 <= t <= 1:
        raise ValueError(f"--bg-threshold must be in [0, 1], got {t}")
    return t, "--bg-threshold"


def _affinity(args: argparse.Namespace):
    """(affinity_fn, patch size, layers) from the checkpoint's ViT."""
    import torch

    from aream_fast.data.transforms import EvalTransform
    from aream_fast.engine.build import load_model_from_checkpoint
    from aream_fast.stage2.random_walk import vit_affinity

    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, cfg = load_model_from_checkpoint(args.checkpoint, device)
    except RuntimeError as e:  # a truncated or foreign file (load_checkpoint names it)
        raise ValueError(str(e)) from e
    if args.affinity_layers is not None:
        try:
            layers = tuple(int(s) for s in args.affinity_layers.replace(",", " ").split())
        except ValueError:
            raise ValueError(f"--affinity-layers must be comma-separated integers, got {args.affinity_layers!r}")
    else:
        from aream_fast.models.records import LayerSplit

        layers = tuple(LayerSplit.from_depth(model.depth, cfg.aream.layer_index).supervised_layers)
    to_tensor = EvalTransform(None)

    def affinity_fn(image):
        return vit_affinity(model, to_tensor(image, None)[0].to(device), layers=layers)

    return affinity_fn, model.patch_size, layers


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from aream_fast.data.layout import DatasetLayoutError, resolve_split
    from aream_fast.stage2.masks import (IGNORE_ALPHAS, gt_folders, refuse_gt_folder, score_pseudo_masks,
                                         write_pseudo_masks)
    from aream_fast.stage2.random_walk import rw_params

    files = resolve_split(args.dataset, args.data_root, args.split, with_masks=False, cls_labels=args.cls_labels)
    gt_dirs = gt_folders(files.root, None if args.mask_dir is None else files.root / args.mask_dir)
    refuse_gt_folder(args.cam_dir, gt_dirs, "CAM folder", "read CAMs from")
    refuse_gt_folder(args.out_dir, gt_dirs, "output folder", "write pseudo masks into")
    threshold, threshold_source = _threshold(args)
    crf_info = None
    if args.crf is not None:
        from aream_fast.stage2 import CRF_PRESETS

        if args.crf not in CRF_PRESETS:
            raise ValueError(f"--crf must be one of {sorted(CRF_PRESETS)}, got {args.crf!r}")
        crf_info = {"preset": args.crf, "iterations": args.crf_iterations, "params": repr(CRF_PRESETS[args.crf])}
    rw_info, affinity_fn, patch_size, rw_overrides = None, None, None, None
    if args.random_walk is not None:
        rw_overrides = {"beta": args.rw_beta, "t": args.rw_t, "radius": args.rw_radius}
        params = rw_params(args.random_walk, **rw_overrides)
        affinity_fn, patch_size, layers = _affinity(args)
        used_bg = ("la / ha planes" if args.ignore else
                   f"constant {threshold} (the seeds' threshold)" if params.bg_threshold is not None
                   else f"(1 - max)^{params.bg_power}")
        rw_info = {"preset": args.random_walk, "beta": params.beta, "t": params.t, "radius": params.radius,
                   "background": used_bg, "affinity": f"head-mean softmax attention of layers {list(layers)}, "
                   f"symmetrised", "checkpoint": str(args.checkpoint), "source": params.source}
    steps = ["threshold" if not args.ignore else f"la/ha alphas {IGNORE_ALPHAS}"]
    steps += [f"rw({args.random_walk})"] if rw_info else []
    steps += [f"crf({args.crf})"] if crf_info else []
    n = write_pseudo_masks(files, args.cam_dir, args.out_dir, bg_threshold=threshold, crf=args.crf,
                           crf_iterations=args.crf_iterations, random_walk=args.random_walk,
                           rw_overrides=rw_overrides, affinity_fn=affinity_fn, patch_size=patch_size,
                           ignore=args.ignore, progress=not args.no_progress)
    report: Dict[str, Any] = {
        "dataset": args.dataset, "split": args.split, "num_images": n, "cam_dir": str(args.cam_dir),
        "out_dir": str(args.out_dir), "post_processing": " + ".join(steps), "bg_threshold": threshold,
        "bg_threshold_source": threshold_source, "crf": crf_info, "random_walk": rw_info,
        "ignore_rule": ({"alphas": list(IGNORE_ALPHAS), "rule": "agree -> label, disagree -> 255"}
                        if args.ignore else None), "score": None}
    if not args.no_eval:
        from aream_fast.data.classes import dataset_info

        gt_files = None
        if args.mask_dir is None and args.dataset == "voc":
            try:  # official protocol: SegmentationClass when it holds every listed mask (as scripts/evaluate.py)
                gt_files = resolve_split(args.dataset, args.data_root, args.split, with_masks=True,
                                         mask_dir="SegmentationClass", cls_labels=args.cls_labels)
            except DatasetLayoutError:
                gt_files = None
        if gt_files is None:
            gt_files = resolve_split(args.dataset, args.data_root, args.split, with_masks=True,
                                     mask_dir=args.mask_dir, cls_labels=args.cls_labels)
        score = score_pseudo_masks(args.out_dir, gt_files)
        names = ("background",) + tuple(dataset_info(args.dataset).class_names)
        score["per_class_iou"] = dict(zip(names, score["per_class_iou"]))
        score.update(split=args.split, gt_dir=str(gt_files.mask_dir))
        report["score"] = score
    return report


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = _parse(argv)
    report = run(args)
    out = args.out_dir / "report.json"
    out.write_text(json.dumps(report, indent=1))
    line = f"{report['num_images']} pseudo masks ({report['post_processing']}) -> {args.out_dir}"
    if report["score"] is not None:
        s = report["score"]
        line += (f"\nmIoU {100 * s['miou']:.2f} on {args.dataset}/{args.split} against {s['gt_dir']} "
                 f"(ignored pixels {100 * s['ignored_fraction']:.1f} %)")
    print(line + f"\nwrote {out}")
    return report


if __name__ == "__main__":
    from aream_fast.engine.errors import main_guard

    sys.exit(main_guard(main))
