"""Image/mask transforms (torch ops on one sample; image and mask are transformed consistently).

Inputs: image uint8 (H, W, 3) numpy, mask uint8 (H, W) numpy or None. Outputs: image float32 (3, h, w)
normalised with the ImageNet mean/std, mask int64 (h, w) or None. Randomness comes from torch's global RNG,
so DataLoader workers (seeded by torch per worker) draw different augmentations.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SizeLike = Union[int, Sequence[int], None]


def as_size(size: SizeLike) -> Optional[Tuple[int, int]]:
    """int -> (s, s); (h, w) -> (h, w); None -> None (native size). Raises ValueError for non-positive sizes."""
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be a positive int or (H, W), got {size!r}")
    return size  # type: ignore[return-value]


def normalize(image: Tensor) -> Tensor:
    """(3, H, W) or (B, 3, H, W) float in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean) / std


def denormalize(images: Tensor) -> Tensor:
    """Inverse of :func:`normalize` (official ``imutils.denormalize``): x * std + mean, any (..., 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return images * std + mean


def _to_tensors(image: np.ndarray, mask: Optional[np.ndarray]) -> Tuple[Tensor, Optional[Tensor]]:
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    m = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask)).long()
    return img, m


def _resize(img: Tensor, mask: Optional[Tensor], size: Tuple[int, int]) -> Tuple[Tensor, Optional[Tensor]]:
    if tuple(img.shape[-2:]) != tuple(size):
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        img = img.clamp_(0.0, 1.0)
        if mask is not None:
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return img, mask


class EvalTransform:
    """Resize to ``image_size`` (bilinear + antialias; mask nearest), or keep the native size when
    ``image_size`` is None (for CAM inference), then normalise."""

    def __init__(self, image_size: SizeLike):
        self.size = as_size(image_size)

    def __call__(self, image: np.ndarray, mask: Optional[np.ndarray]) -> Tuple[Tensor, Optional[Tensor]]:
        img, m = _to_tensors(image, mask)
        if self.size is not None:
            img, m = _resize(img, m, self.size)
        return normalize(img), m


class TrainTransform:
    """RandomResizedCrop(image_size, scale, ratio) + horizontal flip (p=0.5) + colour jitter
    (brightness/contrast/saturation factors U[1-j, 1+j], applied with probability ``jitter_p``), normalise.

    The crop box follows torchvision's RandomResizedCrop sampling (10 tries, then a centre crop of the clamped
    ratio). The mask gets the same crop/flip (nearest resize).
    """

    def __init__(self, image_size: SizeLike, scale: Tuple[float, float] = (0.3, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, jitter: float = 0.3,
                 jitter_p: float = 0.8):
        self.size = as_size(image_size)
        if self.size is None:
            raise ValueError("TrainTransform needs an image_size (got None)")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.scale, self.ratio, self.hflip, self.jitter, self.jitter_p = scale, ratio, hflip, jitter, jitter_p

    def _box(self, h: int, w: int) -> Tuple[int, int, int, int]:
        area = h * w
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(self.scale[0], self.scale[1]))
            ar = math.exp(float(torch.empty(1).uniform_(*log_r)))
            cw = int(round(math.sqrt(target * ar)))
            ch = int(round(math.sqrt(target / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                y = int(torch.randint(0, h - ch + 1, (1,)))
                x = int(torch.randint(0, w - cw + 1, (1,)))
                return y, x, ch, cw
        in_ratio = w / h
        if in_ratio < min(self.ratio):
            cw, ch = w, int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            ch, cw = h, int(round(h * max(self.ratio)))
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def __call__(self, image: np.ndarray, mask: Optional[np.ndarray]) -> Tuple[Tensor, Optional[Tensor]]:
        img, m = _to_tensors(image, mask)
        y, x, ch, cw = self._box(img.shape[1], img.shape[2])
        img = img[:, y:y + ch, x:x + cw]
        m = None if m is None else m[y:y + ch, x:x + cw]
        img, m = _resize(img, m, self.size)
        if float(torch.rand(1)) < self.hflip:
            img = img.flip(-1)
            m = None if m is None else m.flip(-1)
        if self.jitter > 0 and float(torch.rand(1)) < self.jitter_p:
            f = torch.empty(3).uniform_(1 - self.jitter, 1 + self.jitter)
            img = img * f[0]  # brightness
            gray = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])
            img = (img - gray.mean()) * f[1] + gray.mean()  # contrast
            gray = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])
            img = (img - gray) * f[2] + gray  # saturation
            img = img.clamp(0.0, 1.0)
        return normalize(img), (None if m is None else m.contiguous())
