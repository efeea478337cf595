"""Finding the files of a dataset split on disk (VOC layout, COCO in VOC style, the synthetic cache).

Expected layouts (``root`` is what ``--data-root`` points at)::

    VOC 2012 + SBD ("voc"; root may also be VOCdevkit/ or its parent, VOCdevkit/VOC2012 is found):
      root/JPEGImages/<name>.jpg
      root/SegmentationClassAug/<name>.png    (SBD-augmented masks; else root/SegmentationClass/)
      root/ImageSets/Segmentation/<split>.txt (train 1,464 / train_aug 10,582 / val 1,449; or root/<split>.txt)
      root/cls_labels.npy                     (optional: pickled dict name -> float32[20];
                                               else labels are derived from the masks)

    COCO 2014 converted to VOC style ("coco"):
      root/JPEGImages/<name>.jpg              (or JPEGImages/train2014/<name>.jpg, JPEGImages/val2014/...)
      root/SegmentationClass/<name>.png       (or SegmentationClass/train2014/..., .../val2014/...);
                                               ids 0 bg, k+1 = COCO_CLASSES[k] (1..80), 255 ignore
      root/ImageSets/Segmentation/<split>.txt (or root/ImageSets/<split>.txt or root/<split>.txt);
                                               names like COCO_train2014_000000000009
      root/cls_labels.npy                     (optional: name or "<name>.jpg" -> float32[80])

    synthetic (written by ``ensure_synthetic``): the VOC layout plus ``synthetic_meta.json``.

List files hold one name per line; the PSA format ("/JPEGImages/x.jpg /SegmentationClassAug/x.png") is also
accepted (the first token's file stem is the name). ``split`` may also be a path to such a list file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .classes import dataset_info

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
SYNTHETIC_META = "synthetic_meta.json"
CLS_LABEL_FILES = ("cls_labels.npy", "cls_labels_onehot.npy")


class DatasetLayoutError(FileNotFoundError):
    """The folder does not hold the expected dataset layout. The message lists everything that is missing."""


@dataclass
class SplitFiles:
    """Resolved files of one split. ``mask_paths`` is None when masks are not used; ``labels`` is None when
    no cls_labels file exists (labels are then derived from the masks)."""

    dataset: str
    root: Path
    split: str
    names: List[str]
    image_paths: List[Path]
    mask_paths: Optional[List[Path]]
    labels: Optional[Dict[str, np.ndarray]]
    mask_dir: Optional[Path]
    list_file: Path


def _scan(folder: Path, exts: Sequence[str]) -> Dict[str, Path]:
    """Map file stem -> path for files in ``folder`` and in its direct sub-folders (e.g. train2014/)."""
    found: Dict[str, Path] = {}
    subdirs = []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_dir():
                subdirs.append(e.path)
            else:
                stem, ext = os.path.splitext(e.name)
                if ext in exts:
                    found.setdefault(stem, Path(e.path))
    for sub in sorted(subdirs):
        with os.scandir(sub) as it:
            for e in it:
                stem, ext = os.path.splitext(e.name)
                if ext in exts and not e.is_dir():
                    found.setdefault(stem, Path(e.path))
    return found


def read_list_file(path: Path) -> List[str]:
    """Names from a split list file (plain names, or PSA-style lines whose first token is an image path)."""
    names = []
    with open(path) as f:
        for line in f:
            tok = line.split()
            if not tok:
                continue
            first = tok[0]
            if "/" in first or os.path.splitext(first)[1].lower() in (".jpg", ".jpeg", ".png"):
                first = os.path.splitext(os.path.basename(first))[0]
            names.append(first)
    if not names:
        raise DatasetLayoutError(f"split list {path} is empty")
    return names


def _find_voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    return root


def _list_candidates(root: Path, split: str) -> List[Path]:
    return [root / "ImageSets" / "Segmentation" / f"{split}.txt", root / "ImageSets" / f"{split}.txt",
            root / f"{split}.txt"]


def load_cls_labels(path: Path, num_classes: int) -> Dict[str, np.ndarray]:
    """Read a pickled dict name -> float[K] (``np.save`` of a dict, as MCTformer/AReAM ship it)."""
    try:
        obj = np.load(path, allow_pickle=True)
        obj = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read class labels {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"class labels {path} must hold a pickled dict name -> float[{num_classes}], "
                         f"got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        v = np.asarray(v, dtype=np.float32).reshape(-1)
        if v.shape[0] != num_classes:
            raise ValueError(f"class labels {path}: entry {k!r} has {v.shape[0]} values, expected {num_classes}")
        out[str(k)] = v
    return out


def resolve_split(dataset: str, root: str | os.PathLike, split: str, *, with_masks: Optional[bool] = None,
                  mask_dir: Optional[str] = None, cls_labels: Optional[str | os.PathLike] = None) -> SplitFiles:
    """Locate images, masks, the list file and class labels of ``split``; raise ONE
    :class:`DatasetLayoutError` that lists every missing piece if the layout is wrong.

    with_masks: True = masks required for every listed name; False = not used (labels must then come from a
        cls_labels file); None = used when the mask folder exists.
    mask_dir: mask folder name under root (default: SegmentationClassAug if present else SegmentationClass).
    cls_labels: explicit path of the class-label dict (default: root/cls_labels.npy if present).
    """
    info = dataset_info(dataset)
    root = Path(root).expanduser()
    if dataset == "voc":
        root = _find_voc_root(root)
    title = {"voc": "VOC", "coco": "COCO (VOC-style)", "synthetic": "synthetic"}[dataset]
    missing: List[str] = []
    if not root.is_dir():
        raise DatasetLayoutError(f"{title} layout not found: data root {root} does not exist or is not a folder")
    if dataset == "synthetic" and not (root / SYNTHETIC_META).is_file():
        missing.append(f"{SYNTHETIC_META} (a complete synthetic cache has it; create the data with "
                       f"aream_fast.data.ensure_synthetic(root))")
    img_dir = root / "JPEGImages"
    if not img_dir.is_dir():
        missing.append(f"JPEGImages/ (expected {img_dir}/<name>.jpg)")

    # masks
    if mask_dir is not None:
        mdirs = [root / mask_dir]
    elif dataset == "coco":
        mdirs = [root / "SegmentationClass"]
    else:
        mdirs = [root / "SegmentationClassAug", root / "SegmentationClass"]
    mdir = next((d for d in mdirs if d.is_dir()), None)
    if with_masks and mdir is None:
        missing.append(" or ".join(f"{d.name}/" for d in mdirs) + f" (expected {mdirs[0]}/<name>.png)")

    # list file
    split_path = Path(split).expanduser()
    if split_path.suffix == ".txt" or os.sep in split:
        list_file = split_path if split_path.is_file() else None
        tried = [split_path]
    else:
        tried = _list_candidates(root, split)
        list_file = next((p for p in tried if p.is_file()), None)
    if list_file is None:
        missing.append(f"split list for {split!r} (tried {', '.join(str(p) for p in tried)})")

    # class labels
    if cls_labels is not None:
        lab_path: Optional[Path] = Path(cls_labels).expanduser()
        if not lab_path.is_file():
            missing.append(f"class labels file {lab_path}")
            lab_path = None
    else:
        lab_path = next((root / n for n in CLS_LABEL_FILES if (root / n).is_file()), None)
    use_masks = (mdir is not None) if with_masks is None else with_masks
    if not use_masks and lab_path is None and cls_labels is None:
        missing.append("cls_labels.npy (needed for image-level labels when masks are not used; "
                       f"expected {root / 'cls_labels.npy'})")
    if missing:
        raise DatasetLayoutError(f"{title} layout not found under {root}: missing " + "; missing ".join(missing))

    names = read_list_file(list_file)
    images = _scan(img_dir, IMAGE_EXTS)
    miss_img = [n for n in names if n not in images]
    if miss_img:
        raise DatasetLayoutError(
            f"{len(miss_img)} image(s) listed in {list_file} are missing under {img_dir}: "
            f"{', '.join(miss_img[:5])}{' ...' if len(miss_img) > 5 else ''} (expected {img_dir / miss_img[0]}.jpg)")
    mask_paths = None
    if use_masks:
        masks = _scan(mdir, (".png",))
        miss_m = [n for n in names if n not in masks]
        if miss_m:
            raise DatasetLayoutError(
                f"{len(miss_m)} mask(s) for names listed in {list_file} are missing under {mdir}: "
                f"{', '.join(miss_m[:5])}{' ...' if len(miss_m) > 5 else ''} (expected {mdir / miss_m[0]}.png)"
                + ("; masks are optional for training when a cls_labels file exists: pass with_masks=False"
                   if with_masks is None and lab_path is not None else ""))
        mask_paths = [masks[n] for n in names]
    labels = None
    if lab_path is not None:
        raw = load_cls_labels(lab_path, info.num_classes)
        labels = {}
        miss_l = []
        for n in names:
            v = raw.get(n)
            if v is None:
                v = raw.get(n + ".jpg")  # COCO cls_labels keys are "<name>.jpg" (docs/semantics.md, "Training details")
            if v is None:
                miss_l.append(n)
            else:
                labels[n] = v
        if miss_l:
            raise DatasetLayoutError(
                f"{len(miss_l)} name(s) listed in {list_file} have no entry in {lab_path}: "
                f"{', '.join(miss_l[:5])}{' ...' if len(miss_l) > 5 else ''}")
    return SplitFiles(dataset=dataset, root=root, split=split, names=names,
                      image_paths=[images[n] for n in names], mask_paths=mask_paths, labels=labels,
                      mask_dir=mdir if use_masks else None, list_file=list_file)
