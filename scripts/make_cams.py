#!/usr/bin/env python
"""Write CAM seeds (official ``{"key", "cam"}`` .npy content, docs/semantics.md, "Inference CAMs") for a split from a
training checkpoint.

    python scripts/make_cams.py --checkpoint runs/synthetic-aream/<stamp>/checkpoint_best.pth --split val --eval
    python scripts/make_cams.py --checkpoint ckpt.pth --data-root VOCdevkit/VOC2012 --split train_aug \
        --scales 1.0 --out-dir cams/train_aug            # official seeds (train_aug, scale 1 + flip)
    torchrun --nproc_per_node 2 scripts/make_cams.py ...  # shards the images over processes

``--eval`` scores the written CAMs against the split's masks (background-threshold sweep, per-class IoU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_cams.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pth / checkpoint_best.pth written by train.py")
    p.add_argument("--split", default=None, help="split to process (default: the run's --cam-split)")
    p.add_argument("--data-root", default=None, help="dataset root (default: the run's, as the checkpoint or its "
                                                     "manifest.json records it; works from any directory)")
    p.add_argument("--out-dir", default=None, help="default: <checkpoint dir>/cams_<split>; refused inside the "
                                                   "dataset's image or mask folders")
    p.add_argument("--scales", default=None, help="comma-separated inference scales (default: official 1.0; "
                                                  "0.5,1,1.5 for a Conformer checkpoint, docs/semantics.md)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="skip the flipped view")
    p.add_argument("--overlays", type=int, default=0, help="also write PNG overlays for the first N images")
    p.add_argument("--eval", action="store_true", help="score the CAMs (needs masks): threshold sweep mIoU")
    p.add_argument("--mask-dir", default=None,
                   help="with --eval: GT mask folder under the root (default: for VOC, SegmentationClass when it "
                        "holds every listed mask (the official protocol), else SegmentationClassAug)")
    p.add_argument("--device", default=None)
    p.add_argument("--skip-bad-images", action="store_true")
    return p


def _refuse_dataset_folder(out_dir: str, dataset) -> None:
    """ValueError when ``out_dir`` is, or lies inside, the split's image folder or a ground-truth mask folder
    (writing .npy files there would mix CAMs into the dataset), as evaluate.py refuses ground truth."""
    from pathlib import Path

    from aream_fast.stage2.masks import gt_folders, refuse_gt_folder

    files = dataset.files
    refuse_gt_folder(Path(out_dir), gt_folders(files.root, files.mask_dir), "--out-dir", "write CAMs into")
    refuse_gt_folder(Path(out_dir), [Path(files.root) / "JPEGImages"], "--out-dir", "write CAMs into",
                     kind="image folder")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scales = None if args.scales is None else tuple(float(s) for s in args.scales.replace(",", " ").split())
    except ValueError:
        raise SystemExit(f"--scales must be comma-separated floats, got {args.scales!r}")
    if scales is not None and (not scales or any(s <= 0 for s in scales)):
        raise SystemExit(f"--scales must be positive, got {args.scales!r}")

    from aream_fast.engine.build import (build_cam_eval_split, build_split, checkpoint_data_root,
                                         load_checkpoint_model, resolve_data_root)
    from aream_fast.evaluation.cams import score_cams, write_cams
    from aream_fast.engine.distributed import barrier, cleanup, init_distributed

    info = init_distributed(args.device)
    try:
        model, cfg, ckpt = load_checkpoint_model(args.checkpoint, info.device)
        if scales is None:  # Conformer: infer_conformer.py scales; write_cams pads before flipping for it
            from aream_fast.pseudo_labels.conformer import CONFORMER_INFERENCE_SCALES

            scales = CONFORMER_INFERENCE_SCALES if cfg.model.model == "conformer_small" else (1.0,)
        data = cfg.data
        data.data_root = args.data_root if args.data_root is not None else checkpoint_data_root(
            args.checkpoint, data, ckpt)
        data.skip_bad_images = args.skip_bad_images or data.skip_bad_images
        split = args.split or cfg.cams.cam_split
        root = resolve_data_root(data, create=False)
        if args.eval:
            dataset = build_cam_eval_split(data, root, split, mask_dir=args.mask_dir)
            print(f"scoring against {dataset.files.mask_dir}", flush=True)
        else:
            dataset = build_split(data, root, split, train=False, native_size=True)
        out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"cams_{split}")
        _refuse_dataset_folder(out_dir, dataset)
        n = write_cams(model, dataset, out_dir, scales=scales, flip=args.flip, device=info.device,
                       overlays=args.overlays, rank=info.rank, world_size=info.world_size,
                       progress=info.is_main)
        print(f"[rank {info.rank}] wrote {n} CAM files to {out_dir}", flush=True)
        barrier(info)
        if args.eval and info.is_main:
            results = score_cams(out_dir, dataset, log=print)
            results["gt_dir"] = str(dataset.files.mask_dir)
            with open(os.path.join(out_dir, "cam_eval.json"), "w") as fh:
                json.dump(results, fh, indent=2)
    finally:
        cleanup(info)
    return 0


if __name__ == "__main__":
    from aream_fast.engine.errors import main_guard

    sys.exit(main_guard(main))
