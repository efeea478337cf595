"""CAM seeds for a split (docs/semantics.md, "Inference CAMs") and their mIoU with a background-threshold sweep
(docs/semantics.md, "Evaluation").

* :func:`write_cams`: for every image of a dataset built at native size (batch 1), ``inference_cam``
  (multi-scale + flip options) and ``save_cam_npy`` -> ``<out_dir>/<name>.npy`` with the official
  ``{"key", "cam"}`` content; images without labels are skipped (no file, as officially). Optional PNG
  overlays ``<name>_cls<k>.png`` (JET colormap, 50/50 blend). Shardable over processes (rank::world_size).
* :func:`score_cams`: read the files back, build predictions for every background threshold in one pass
  (``aream_fast.evaluation.metrics.ThresholdSweep``) against the dataset's masks, report the best threshold's mIoU and
  per-class IoU. A missing CAM file for an image with labels is an error (the official evaluate.py silently
  substitutes the ground truth there, docs/semantics.md, "Oddities").
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn


def _overlay(image: torch.Tensor, cam: np.ndarray, path: str) -> None:
    """50/50 blend of the denormalised image (3, H, W) and the JET-coloured cam (H, W) in [0, 1]."""
    from matplotlib import colormaps
    from PIL import Image

    from aream_fast.data.transforms import denormalize

    rgb = denormalize(image[None].float().cpu())[0].clamp(0, 1).permute(1, 2, 0).numpy()
    heat = colormaps["jet"](np.clip(cam, 0.0, 1.0))[..., :3]
    blend = (0.5 * rgb + 0.5 * heat) * 255.0
    Image.fromarray(blend.round().astype(np.uint8)).save(path)


@torch.no_grad()
def write_cams(model: nn.Module, dataset, out_dir: str, *, scales: Sequence[float] = (1.0,), flip: bool = True,
               device: Optional[torch.device] = None, overlays: int = 0, rank: int = 0, world_size: int = 1,
               progress: bool = True, flip_after_pad: Optional[bool] = None) -> int:
    """Write ``<out_dir>/<name>.npy`` for items ``rank::world_size`` of ``dataset``; returns the count written.

    flip_after_pad: ``inference_cam``'s option; None = True for a Conformer (infer_conformer.py; docs/semantics.md, Inference CAMs:
    ``conformer_inference_cam``), False otherwise.

    dataset items: {"image": (3, H, W) normalised, "label": (K,), "name": str} (native size, any H, W).
    overlays: also write PNG overlays for the first ``overlays`` items of this shard.
    """
    from tqdm import tqdm

    from aream_fast.pseudo_labels.cam import inference_cam
    from aream_fast.pseudo_labels.seeds import save_cam_npy

    if device is None:
        device = next(model.parameters()).device
    if flip_after_pad is None:
        from aream_fast.models.conformer import Conformer

        flip_after_pad = isinstance(model, Conformer)
    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    written = 0
    indices = range(rank, len(dataset), world_size)
    for n, index in enumerate(tqdm(indices, desc=f"CAMs -> {out_dir}", disable=not progress, leave=False,
                                   dynamic_ncols=True)):
        item = dataset[index]
        image = item["image"].to(device)
        label = torch.as_tensor(item["label"]).to(device)
        keys, cam = inference_cam(model, image, label, scales=tuple(scales), flip=flip, flip_after_pad=flip_after_pad)
        if keys.size == 0:
            continue  # official: images without labels get no file
        name = item["name"]
        save_cam_npy(os.path.join(out_dir, f"{name}.npy"), keys, cam)
        written += 1
        if n < overlays:
            for k, c in zip(keys.tolist(), cam):
                _overlay(item["image"], c, os.path.join(out_dir, f"{name}_cls{k}.png"))
    return written


def score_cams(cam_dir: str, dataset, *, thresholds: Optional[Sequence[float]] = None,
               log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """mIoU of the CAM files in ``cam_dir`` against ``dataset``'s masks, for every background threshold in one
    pass (``aream_fast.evaluation.metrics.ThresholdSweep``; default thresholds 0.01 .. 0.79 as officially).

    dataset: native-size items with "mask" (H, W) (0 bg, k+1 class k, 255 ignore), "label" and "name".
    Returns {"mIoU", "threshold", "per_class" {name: IoU}, "num_images", "miou_curve" [(t, mIoU)]}; logs a
    per-class table through ``log``.
    """
    from tqdm import tqdm

    from aream_fast.pseudo_labels.seeds import load_cam_npy
    from aream_fast.evaluation.metrics import ThresholdSweep

    if not getattr(dataset, "has_masks", True):
        raise ValueError(f"split {getattr(dataset, 'split', '?')!r} has no masks: CAMs cannot be scored")
    names = ["background"] + list(dataset.class_names)
    sweep = ThresholdSweep(len(names), thresholds)
    for index in tqdm(range(len(dataset)), desc="scoring CAMs", leave=False, dynamic_ncols=True):
        item = dataset[index]
        path = os.path.join(cam_dir, f"{item['name']}.npy")
        if not os.path.isfile(path):
            if float(torch.as_tensor(item["label"]).sum()) == 0:
                keys = np.zeros(0, dtype=np.int64)  # no labels -> no file (official); all background
                cam = np.zeros((0,) + tuple(item["mask"].shape), dtype=np.float32)
            else:
                raise FileNotFoundError(f"CAM file missing for {item['name']!r}: {path} (no ground-truth "
                                        f"substitution, unlike the official evaluate.py)")
        else:
            keys, cam = load_cam_npy(path)
        sweep.update(keys, cam, item["mask"])
    res = sweep.results()
    per_class = {n: float(v) for n, v in zip(names, res["best_iou"])}
    out = {"mIoU": res["best_miou"], "threshold": res["best_threshold"], "per_class": per_class,
           "num_images": sweep.num_images, "miou_curve": list(zip(res["thresholds"], res["miou"]))}
    if log is not None:
        width = max(len(n) for n in names)
        lines = [f"CAM mIoU {100 * out['mIoU']:.2f} at background threshold {out['threshold']:.2f} "
                 f"({sweep.num_images} images, {cam_dir})", f"  {'class':<{width}}  IoU"]
        lines += [f"  {n:<{width}}  {100 * v:6.2f}" for n, v in per_class.items()]
        log("\n".join(lines))
    return out
