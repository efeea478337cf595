"""``build_dataset``: one entry point for "synthetic", "voc" and "coco"."""
from __future__ import annotations

import os
from typing import Optional, Tuple

from .dataset import SegmentationDataset
from .layout import resolve_split
from .transforms import EvalTransform, SizeLike, TrainTransform


def build_dataset(name: str, root: str | os.PathLike, split: str, *, train: bool, image_size: SizeLike,
                  with_masks: Optional[bool] = None, mask_dir: Optional[str] = None,
                  cls_labels: Optional[str | os.PathLike] = None, skip_bad_images: bool = False,
                  preload: bool = False,
                  crop_scale: Tuple[float, float] = (0.3, 1.0), hflip: float = 0.5, jitter: float = 0.3,
                  progress: bool = False) -> SegmentationDataset:
    """Build a split of dataset ``name`` ("synthetic", "voc", "coco") found under ``root``.

    train=True: RandomResizedCrop(image_size, crop_scale) + hflip + colour jitter; train=False: resize to
    ``image_size`` (mask nearest), or the native size when ``image_size`` is None (CAM inference; batch size 1).
    Items: {"image": (3, H, W) float32 ImageNet-normalised, "label": (K,) float32, "mask": (H, W) int64
    (when masks are used), "name": str, "size": native (H, W) int64}. ``dataset.num_classes`` (K) and
    ``dataset.class_names`` describe the classes. For "synthetic", ``root`` is the folder returned by
    :func:`aream_fast.data.ensure_synthetic`. See :mod:`aream_fast.data.layout` for the folder layouts and the
    meaning of ``with_masks``, ``mask_dir`` and ``cls_labels``; :class:`SegmentationDataset` for
    ``skip_bad_images`` (drop undecodable images with a warning) and ``preload`` (keep decoded images in RAM).
    """
    files = resolve_split(name, root, split, with_masks=with_masks, mask_dir=mask_dir, cls_labels=cls_labels)
    if train:
        transform = TrainTransform(image_size, scale=crop_scale, hflip=hflip, jitter=jitter)
    else:
        transform = EvalTransform(image_size)
    return SegmentationDataset(files, transform, skip_bad_images=skip_bad_images, preload=preload,
                               progress=progress)
