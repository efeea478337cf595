"""Training data of the segmentation network: dataset images + pseudo masks (PNG) from a ``--masks`` folder.

    ds = build_pseudo_mask_dataset("voc", "~/data/VOC2012", "train_aug", masks="out/pseudo_masks",
                                   train=True, crop_size=448)
    item = ds[0]   # {"image": (3, 448, 448) float32 normalised, "mask": (448, 448) int64, "label", "name", "size"}

Images come from the dataset layouts of :mod:`aream_fast.data.layout`; ``masks/<name>.png`` holds ids 0
(background), k + 1 (class k) and 255 (ignore). A mask folder that is ground truth is refused: any folder
named like a VOC ground-truth folder (SegmentationClass, SegmentationClassAug, SegmentationObject), the
dataset's own mask folders (the synthetic set writes its ground truth to SegmentationClassAug), and a folder
whose first masks are pixel-identical to the ground truth (a copy of it).

Training augmentation (joint on image and mask, ``SegTrainTransform``): random rescale by a factor in
``scale_range`` (image bilinear + antialias, mask nearest), zero padding to at least ``crop_size`` (image pad
0 = the ImageNet mean after normalisation, mask pad 255 = ignored), a random ``crop_size`` crop and a
horizontal flip with probability ``hflip`` (as DeepLab / ToCo ``imutils`` random_scaling + random_crop).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from aream_fast.data.dataset import SegmentationDataset
from aream_fast.data.image_io import read_mask
from aream_fast.data.layout import resolve_split
from aream_fast.data.transforms import EvalTransform, normalize

GT_FOLDER_NAMES = ("SegmentationClass", "SegmentationClassAug", "SegmentationObject", "SegmentationClassRaw")
IGNORE_INDEX = 255


class SegTrainTransform:
    """Joint random scale + pad + crop + flip of image uint8 (H, W, 3) and mask uint8 (H, W) ->
    (image (3, crop, crop) float32 normalised, mask (crop, crop) int64 with 255 in the padding)."""

    def __init__(self, crop_size: int = 448, scale_range: Tuple[float, float] = (0.5, 2.0), hflip: float = 0.5):
        if int(crop_size) <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        self.crop_size, self.scale_range, self.hflip = int(crop_size), tuple(scale_range), float(hflip)

    def __call__(self, image: np.ndarray, mask: Optional[np.ndarray]) -> Tuple[Tensor, Tensor]:
        if mask is None:
            raise ValueError("SegTrainTransform needs a mask")
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        m = torch.from_numpy(np.ascontiguousarray(mask)).long()
        s = float(torch.empty(1).uniform_(*self.scale_range))
        h, w = img.shape[-2:]
        size = (max(1, round(h * s)), max(1, round(w * s)))
        if size != (h, w):
            img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False,
                                antialias=True)[0].clamp_(0.0, 1.0)
            m = F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0].long()
        img = normalize(img)
        c = self.crop_size
        ph, pw = max(c - size[0], 0), max(c - size[1], 0)
        if ph or pw:
            img = F.pad(img, (0, pw, 0, ph), value=0.0)
            m = F.pad(m, (0, pw, 0, ph), value=IGNORE_INDEX)
        hh, ww = img.shape[-2:]
        y = int(torch.randint(0, hh - c + 1, (1,)))
        x = int(torch.randint(0, ww - c + 1, (1,)))
        img, m = img[:, y:y + c, x:x + c], m[y:y + c, x:x + c]
        if float(torch.rand(1)) < self.hflip:
            img, m = img.flip(-1), m.flip(-1)
        return img.contiguous(), m.contiguous()


class PseudoMaskDataset(SegmentationDataset):
    """``SegmentationDataset`` whose masks are pseudo masks; every mask is checked when read: same size as
    its image (else ValueError naming both files) and ids in {0..K, 255} (else ValueError naming the file).
    Items as ``SegmentationDataset`` (``mask`` always present)."""

    def _read(self, index: int) -> Dict[str, object]:
        raw = super()._read(index)
        ids = np.unique(raw["mask"])
        bad = ids[(ids > self.num_classes) & (ids != IGNORE_INDEX)]
        if bad.size:
            raise ValueError(f"pseudo mask {self.mask_paths[index]} holds ids {bad.tolist()} outside "
                             f"0..{self.num_classes} (background 0, class k+1) and not {IGNORE_INDEX}")
        return raw


def _gt_dirs(root: Path) -> list:
    return [root / n for n in GT_FOLDER_NAMES if (root / n).is_dir()]


def refuse_ground_truth_masks(masks: Path, files, *, check: int = 4) -> None:
    """Raise ValueError if ``masks`` is, resolves to, or copies a ground-truth folder of the dataset at
    ``files.root`` (``files``: a :class:`aream_fast.data.layout.SplitFiles` with ``mask_paths`` in ``masks``).
    ``check``: how many masks are compared pixel by pixel with the ground truth (all equal = a copy)."""
    if masks.resolve().name in GT_FOLDER_NAMES or masks.name in GT_FOLDER_NAMES:
        raise ValueError(f"--masks {masks} is named like a ground-truth folder ({masks.name}); pseudo masks "
                         f"must not come from ground truth (weak supervision)")
    gt_dirs = _gt_dirs(files.root)
    for g in gt_dirs:
        if os.path.samefile(masks, g):
            raise ValueError(f"--masks {masks} is the ground-truth folder {g}; refusing to train a weakly "
                             f"supervised segmenter on ground-truth masks")
    compared = identical = 0
    for name, pseudo in zip(files.names, files.mask_paths):
        gt = next((g / f"{name}.png" for g in gt_dirs if (g / f"{name}.png").is_file()), None)
        if gt is None:
            continue
        compared += 1
        a, b = read_mask(pseudo), read_mask(gt)
        identical += int(a.shape == b.shape and np.array_equal(a, b))
        if compared >= check:
            break
    if compared and identical == compared:
        raise ValueError(f"--masks {masks}: the first {compared} masks are pixel-identical to the ground truth "
                         f"under {files.root}; this looks like a copy of a ground-truth folder, refusing it")


def build_pseudo_mask_dataset(dataset: str, root: str | os.PathLike, split: str, *, masks: str | os.PathLike,
                              train: bool, crop_size: int = 448, scale_range: Tuple[float, float] = (0.5, 2.0),
                              hflip: float = 0.5, cls_labels: Optional[str | os.PathLike] = None,
                              preload: bool = False, progress: bool = False) -> PseudoMaskDataset:
    """Split ``split`` of ``dataset`` ("voc", "coco", "synthetic") under ``root`` with the pseudo masks in
    ``masks``: train=True applies :class:`SegTrainTransform` (crop_size, scale_range, hflip); train=False
    keeps the native size (batch 1). Raises FileNotFoundError (``DatasetLayoutError``) listing missing masks,
    ValueError for a ground-truth mask folder; bad masks raise ValueError when read."""
    masks = Path(masks).expanduser()
    if not masks.is_dir():
        raise FileNotFoundError(f"--masks folder {masks} does not exist")
    files = resolve_split(dataset, root, split, with_masks=True, mask_dir=str(masks.resolve()),
                          cls_labels=cls_labels)
    refuse_ground_truth_masks(masks, files)
    transform = SegTrainTransform(crop_size, scale_range, hflip) if train else EvalTransform(None)
    return PseudoMaskDataset(files, transform, preload=preload, progress=progress)


def build_upper_bound_dataset(dataset: str, root: str | os.PathLike, split: str, *, train: bool,
                              crop_size: int = 448, scale_range: Tuple[float, float] = (0.5, 2.0),
                              hflip: float = 0.5, cls_labels: Optional[str | os.PathLike] = None,
                              preload: bool = False, progress: bool = False) -> SegmentationDataset:
    """Split ``split`` of ``dataset`` under ``root`` with its **ground-truth** masks and the same transform as
    :func:`build_pseudo_mask_dataset`: the fully supervised upper bound's training data (``scripts/train_seg.py
    --gt-upper-bound``). Items as :class:`SegmentationDataset`; raises ``DatasetLayoutError`` for missing masks."""
    files = resolve_split(dataset, root, split, with_masks=True, cls_labels=cls_labels)
    transform = SegTrainTransform(crop_size, scale_range, hflip) if train else EvalTransform(None)
    return SegmentationDataset(files, transform, preload=preload, progress=progress)
