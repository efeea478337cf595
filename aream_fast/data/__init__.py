"""Datasets: PASCAL VOC 2012 (+SBD), COCO 2014 in VOC style, and the built-in synthetic set.

    from aream_fast.data import build_dataset, ensure_synthetic
    root = ensure_synthetic("/tmp/syn", num_train=800, num_val=200, image_size=96)
    ds = build_dataset("synthetic", root, "train", train=True, image_size=96)
    item = ds[0]  # {"image": (3,96,96) float, "label": (6,) float, "mask": (96,96) int64, "name", "size"}

Folder layouts: :mod:`aream_fast.data.layout`.
"""
from .build import build_dataset
from .classes import (COCO_CLASSES, DATASET_NAMES, SYNTHETIC_CLASSES, VOC_CLASSES, DatasetInfo, class_names,
                      dataset_info, num_classes)
from .dataset import SegmentationDataset, labels_from_mask
from .image_io import CorruptImageError, read_image, read_mask, write_mask
from .layout import DatasetLayoutError, resolve_split
from .synthetic import default_synthetic_root, ensure_synthetic, render_scene
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, denormalize, normalize

__all__ = [
    "build_dataset", "ensure_synthetic", "default_synthetic_root", "render_scene", "SegmentationDataset",
    "labels_from_mask", "DatasetInfo", "dataset_info", "num_classes", "class_names", "DATASET_NAMES",
    "VOC_CLASSES", "COCO_CLASSES", "SYNTHETIC_CLASSES", "CorruptImageError", "DatasetLayoutError",
    "read_image", "read_mask", "write_mask", "resolve_split", "IMAGENET_MEAN", "IMAGENET_STD",
    "EvalTransform", "TrainTransform", "normalize", "denormalize",
]
