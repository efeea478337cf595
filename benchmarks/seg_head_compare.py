#!/usr/bin/env python
"""Which head is the better default for the ViT segmenter: LargeFOV vs ASPP, same backbone, same steps.

A measurement, not a trainer: a small ViT (192-d, 6 blocks, from scratch) + each head is trained for a fixed
number of AdamW steps on the synthetic train split with its ground-truth masks (joint scale/crop/flip of
``aream_fast.stage2.seg_data.SegTrainTransform``), then scored single-scale on the synthetic val split
(mIoU over 7 classes, ``aream_fast.evaluation.metrics``). Same seed and data order for both heads.

    .venv/bin/python benchmarks/seg_head_compare.py --steps 400 --seeds 0 1
"""
import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from aream_fast.data import ensure_synthetic, resolve_split
from aream_fast.data.dataset import SegmentationDataset
from aream_fast.data.transforms import EvalTransform
from aream_fast.evaluation.metrics import confusion_matrix, iou_from_confusion
from aream_fast.stage2.seg_data import SegTrainTransform
from aream_fast.stage2.seg_models import build_seg_model


def run(head: str, seed: int, steps: int, batch: int, root) -> dict:
    torch.manual_seed(seed)
    arch = dict(embed_dim=192, depth=6, num_heads=3, img_size=96, head_channels=256, drop_path=0.0)
    model = build_seg_model(f"vit_small_{head}", 7, **arch)
    train = SegmentationDataset(resolve_split("synthetic", root, "train", with_masks=True),
                                SegTrainTransform(96, (0.75, 1.5)), preload=True)
    val = SegmentationDataset(resolve_split("synthetic", root, "val", with_masks=True), EvalTransform(None),
                              preload=True)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, generator=g, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (1 - t / steps) ** 0.9)
    model.train()
    step, t0, losses = 0, time.perf_counter(), []
    with tqdm(total=steps, desc=f"{head} seed {seed}") as bar:
        while step < steps:
            for item in loader:
                loss = F.cross_entropy(model(item["image"]), item["mask"], ignore_index=255)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss))
                step += 1
                bar.update(1)
                if step >= steps:
                    break
    train_s = time.perf_counter() - t0
    model.eval()
    cm = np.zeros((7, 8), dtype=np.int64)
    with torch.no_grad():
        for i in range(len(val)):
            it = val[i]
            pred = model(it["image"][None]).argmax(1)[0]
            cm += confusion_matrix(pred, it["mask"], 7)
    ious = iou_from_confusion(cm)
    return {"head": head, "seed": seed, "steps": steps, "batch": batch, "train_s": round(train_s, 1),
            "final_loss": float(np.mean(losses[-20:])), "val_miou": float(ious.mean()),
            "params_head_M": sum(p.numel() for p in model.head.parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    a = p.parse_args()
    torch.set_num_threads(2)
    root = ensure_synthetic()
    results = []
    for seed in a.seeds:
        for head in ("largefov", "aspp"):
            r = run(head, seed, a.steps, a.batch, root)
            print(json.dumps(r), flush=True)
            results.append(r)
    for head in ("largefov", "aspp"):
        rs = [r for r in results if r["head"] == head]
        mious = [round(r["val_miou"] * 100, 2) for r in rs]
        train_s = np.mean([r["train_s"] for r in rs])
        print(f"{head}: val mIoU {np.mean(mious):.2f} (seeds {mious}), train {train_s:.1f} s")


if __name__ == "__main__":
    main()
