"""Class names and counts of the supported datasets.

``num_classes`` counts foreground classes only (K); segmentation ids are 0 = background, k + 1 = class k,
255 = ignore (the VOC convention, also used by the COCO-in-VOC-layout conversion and the synthetic set).
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

VOC_CLASSES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# The 80 COCO 2014 categories in their usual (category-id sorted) order: mask id k + 1 = COCO_CLASSES[k].
COCO_CLASSES: Tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# Built-in procedural dataset (aream_fast.data.synthetic): one class per shape.
SYNTHETIC_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")


class DatasetInfo(NamedTuple):
    """name, K (foreground classes) and the K class names (index k <-> segmentation id k + 1)."""

    name: str
    num_classes: int
    class_names: Tuple[str, ...]


_INFO = {
    "voc": DatasetInfo("voc", len(VOC_CLASSES), VOC_CLASSES),
    "coco": DatasetInfo("coco", len(COCO_CLASSES), COCO_CLASSES),
    "synthetic": DatasetInfo("synthetic", len(SYNTHETIC_CLASSES), SYNTHETIC_CLASSES),
}

DATASET_NAMES: Tuple[str, ...] = tuple(_INFO)


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of ``name`` ("voc", "coco" or "synthetic")."""
    try:
        return _INFO[name]
    except KeyError:
        raise ValueError(f"dataset name must be one of {DATASET_NAMES}, got {name!r}") from None


def num_classes(name: str) -> int:
    """Number of foreground classes K of dataset ``name`` (VOC 20, COCO 80, synthetic 6)."""
    return dataset_info(name).num_classes


def class_names(name: str) -> Tuple[str, ...]:
    """The K foreground class names of dataset ``name``."""
    return dataset_info(name).class_names
