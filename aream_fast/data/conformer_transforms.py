"""The Conformer-S training augmentation of the official code (spec §7), returning the crop's ``img_box``.

main_voc_conformer.py of Jessie459/AReAM trains on RandomScale U(0.5, 2.0) (PIL bicubic), a horizontal flip
(p 0.5), ColorJitter(0.4, 0.4, 0.2, 0.1) applied with p 0.8, then a random 384 crop on a black canvas that
returns the box of the crop holding image pixels (``img_box``), then the ImageNet normalisation. The box is
what ``aream_fast.pseudo_labels.conformer.apply_crop_box`` uses to ignore the padding's patches.

Same protocol as ``aream_fast.data.transforms``: image uint8 (H, W, 3), mask uint8 (H, W) or None in; torch's
global RNG (``aream_fast.engine.sampling.SeededSampleDataset`` seeds it per sample).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .transforms import _to_tensors, normalize

IGNORE_INDEX = 255


class ConformerTrainTransform:
    """``(image, mask) -> (image (3, S, S) normalised, mask (S, S) int64 or None, {"img_box": (4,) int64})``,
    S = ``crop_size``. The mask follows the image (nearest scale, same flip and crop) and is 255 on the padding.

    scale_range: the random scale factor's interval (official (0.5, 2.0)); the scaled size is
    (round(sH), round(sW)), bicubic with antialias, clamped to [0, 1]. color_jitter: torchvision
    ``ColorJitter(brightness, contrast, saturation, hue)`` arguments, or None for no jitter.
    """

    def __init__(self, crop_size: int = 384, *, scale_range: Tuple[float, float] = (0.5, 2.0), hflip: float = 0.5,
                 color_jitter: Optional[Tuple[float, float, float, float]] = (0.4, 0.4, 0.2, 0.1),
                 jitter_p: float = 0.8):
        if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size <= 0:
            raise ValueError(f"crop_size must be a positive int, got {crop_size!r}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        if not (0.0 <= hflip <= 1.0 and 0.0 <= jitter_p <= 1.0):
            raise ValueError(f"hflip and jitter_p must be probabilities, got {hflip}, {jitter_p}")
        self.crop_size = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.hflip = float(hflip)
        self.jitter_p = float(jitter_p)
        self.jitter = None
        if color_jitter is not None:
            from torchvision.transforms import ColorJitter

            self.jitter = ColorJitter(*color_jitter)

    def __call__(self, image: np.ndarray, mask: Optional[np.ndarray]
                 ) -> Tuple[Tensor, Optional[Tensor], Dict[str, Tensor]]:
        from aream_fast.pseudo_labels.conformer import conformer_random_crop

        img, m = _to_tensors(image, mask)
        s = float(torch.empty(1).uniform_(*self.scale_range))
        h, w = img.shape[-2:]
        size = (max(1, int(round(s * h))), max(1, int(round(s * w))))
        if size != (h, w):
            img = F.interpolate(img[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
            img = img.clamp_(0.0, 1.0)
            if m is not None:
                m = F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0].long()
        if float(torch.rand(1)) < self.hflip:
            img = img.flip(-1)
            m = None if m is None else m.flip(-1)
        if self.jitter is not None and float(torch.rand(1)) < self.jitter_p:
            img = self.jitter(img)
        # the mask rides along as a 4th channel holding id + 1, so the black canvas (0) marks its padding
        stacked = img if m is None else torch.cat([img, (m.float() + 1.0)[None]])
        crop, box = conformer_random_crop(stacked, self.crop_size)
        out_mask = None
        if m is not None:
            ids = crop[3].round().long() - 1
            out_mask = ids.masked_fill(ids < 0, IGNORE_INDEX).contiguous()
        return normalize(crop[:3].contiguous()), out_mask, {"img_box": box}
