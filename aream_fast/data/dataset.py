"""Map-style dataset over a resolved split (VOC layout, COCO in VOC style, the synthetic cache)."""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .classes import dataset_info
from .image_io import CorruptImageError, check_image, read_image, read_mask
from .layout import SplitFiles


def labels_from_mask(mask: np.ndarray, num_classes: int, where: str = "mask") -> np.ndarray:
    """Image-level multi-hot (K,) float32 from an id mask: the classes present, ignoring 0 and 255.
    Ids in (K, 255) are a data error and raise ValueError naming ``where``."""
    ids = np.unique(mask)
    ids = ids[(ids != 0) & (ids != 255)]
    bad = ids[ids > num_classes]
    if bad.size:
        raise ValueError(f"{where} holds class ids {bad.tolist()} outside 1..{num_classes} (and not 255)")
    out = np.zeros(num_classes, dtype=np.float32)
    out[ids.astype(np.int64) - 1] = 1.0
    return out


class SegmentationDataset(Dataset):
    """Items: {"image": (3, H, W) float32 normalised, "label": (K,) float32 multi-hot (of the full image),
    "mask": (H, W) int64 (when masks are used; 0 bg, k+1 class k, 255 ignore), "name": str,
    "size": (2,) int64 native (H, W)}.

    transform(image uint8 (H, W, 3), mask uint8 (H, W) | None) -> (image tensor, mask tensor | None), or a third
        element, a dict of extra item entries (``ConformerTrainTransform``'s ``{"img_box": (4,) int64}``).
    skip_bad_images: scan every image once at construction and drop undecodable ones with a warning
        (they are listed in ``self.bad_images``); otherwise a corrupt image raises CorruptImageError naming it
        when it is loaded.
    preload: decode every image and mask once at construction and keep them in memory (small datasets such
        as the synthetic one: ~3 bytes/pixel; DataLoader workers share it copy-on-write).
    """

    def __init__(self, files: SplitFiles, transform: Callable, *, skip_bad_images: bool = False,
                 preload: bool = False, progress: bool = False):
        info = dataset_info(files.dataset)
        self.files = files
        self.transform = transform
        self.num_classes = info.num_classes
        self.class_names = info.class_names
        self.dataset = files.dataset
        self.split = files.split
        self.bad_images: List[str] = []
        keep = list(range(len(files.names)))
        if skip_bad_images:
            keep = self._scan(progress)
        self.names = [files.names[i] for i in keep]
        self.image_paths = [files.image_paths[i] for i in keep]
        self.mask_paths = None if files.mask_paths is None else [files.mask_paths[i] for i in keep]
        self.has_masks = self.mask_paths is not None
        self._cache: Optional[List[Dict[str, object]]] = None
        if preload:
            from tqdm import tqdm

            self._cache = [self._read(i) for i in tqdm(range(len(self.names)), desc="preloading images",
                                                        disable=not progress, leave=False)]

    def _scan(self, progress: bool) -> List[int]:
        from tqdm import tqdm

        keep = []
        it = range(len(self.files.names))
        for i in tqdm(it, desc=f"checking {self.dataset}/{self.split} images", disable=not progress,
                      leave=False):
            try:
                check_image(self.files.image_paths[i])
            except CorruptImageError as e:
                self.bad_images.append(str(self.files.image_paths[i]))
                warnings.warn(f"skipping unreadable image: {e}", stacklevel=3)
            else:
                keep.append(i)
        if not keep:
            raise CorruptImageError(f"every image of {self.dataset}/{self.split} is unreadable")
        return keep

    def __len__(self) -> int:
        return len(self.names)

    def _check_header(self, index: int) -> None:
        """Header only (no decoding): the image opens; its mask opens, is a palette / grayscale PNG of the
        image's size. Raises CorruptImageError / ValueError naming the file."""
        from PIL import Image

        def opened(path, what):
            try:
                with Image.open(path) as im:
                    return im.size, im.mode
            except FileNotFoundError:
                raise FileNotFoundError(f"{what} file not found: {path}") from None
            except (OSError, ValueError, SyntaxError) as e:  # PIL: not an image / unknown or cut header
                raise CorruptImageError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e

        size, _ = opened(self.image_paths[index], "image")
        if self.mask_paths is not None:
            mask_path = self.mask_paths[index]
            mask_size, mode = opened(mask_path, "mask")
            if mode not in ("P", "L", "I", "I;16"):
                raise CorruptImageError(f"mask {mask_path} has PIL mode {mode!r}; expected a palette ('P') or "
                                        f"grayscale ('L') PNG of class ids")
            if mask_size != size:
                raise ValueError(f"mask {mask_path} has size {mask_size[::-1]}, but image "
                                 f"{self.image_paths[index]} has size {size[::-1]}")

    def preflight(self, *, full: bool = False, progress: bool = False) -> None:
        """Check every listed image (and mask) before training starts, so a bad file stops the run before its
        folder is made instead of mid-epoch: by default each file's header (it opens; a mask's mode, and its
        size equals the image's); ``full`` (``--full-image-check``) decodes every image and mask and derives
        its labels. Raises one CorruptImageError naming the first bad files and how many there are."""
        from tqdm import tqdm

        if self._cache is not None:  # preloaded: every file was decoded in full already
            return
        bad: List[str] = []
        for i in tqdm(range(len(self.names)), desc=f"checking {self.dataset}/{self.split} files",
                      disable=not progress, leave=False):
            try:
                self._read(i) if full else self._check_header(i)
            except (CorruptImageError, ValueError, OSError) as e:
                bad.append(str(e))
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise CorruptImageError(
                f"{len(bad)} of the {len(self.names)} listed files of {self.dataset}/{self.split} fail the "
                f"{'full decoding' if full else 'header'} check: {'; '.join(bad[:3])}{more} (--skip-bad-images "
                f"drops undecodable images)")

    def load_raw(self, index: int) -> Dict[str, object]:
        """The untransformed sample: image uint8 (H, W, 3), mask uint8 (H, W) or None, label (K,), name."""
        if self._cache is not None:
            return self._cache[index]
        return self._read(index)

    def _read(self, index: int) -> Dict[str, object]:
        name = self.names[index]
        image = read_image(self.image_paths[index])
        mask = None
        if self.mask_paths is not None:
            mask = read_mask(self.mask_paths[index])
            if mask.shape != image.shape[:2]:
                raise ValueError(f"mask {self.mask_paths[index]} has size {mask.shape}, but image "
                                 f"{self.image_paths[index]} has size {image.shape[:2]}")
        if self.files.labels is not None:
            label = self.files.labels[name]
        else:
            label = labels_from_mask(mask, self.num_classes, where=str(self.mask_paths[index]))
        return {"image": image, "mask": mask, "label": label, "name": name}

    def label_of(self, index: int) -> np.ndarray:
        """(K,) float32 image-level label of item ``index`` (reads the mask if there is no cls_labels file)."""
        if self.files.labels is not None:
            return self.files.labels[self.names[index]]
        return labels_from_mask(read_mask(self.mask_paths[index]), self.num_classes,
                                where=str(self.mask_paths[index]))

    def __getitem__(self, index: int) -> Dict[str, object]:
        raw = self.load_raw(index)
        image, mask, *extra = self.transform(raw["image"], raw["mask"])  # extra: ({"img_box": ...},) or ()
        h, w = raw["image"].shape[:2]
        item = {"image": image, "label": torch.from_numpy(np.array(raw["label"], dtype=np.float32)),
                "name": raw["name"], "size": torch.tensor([h, w], dtype=torch.int64)}
        for entries in extra:
            item.update(entries)
        if mask is not None:
            item["mask"] = mask
        return item
