"""The Conformer-S training augmentation of the official code (docs/semantics.md, Training details), returning the crop's ``img_box``.

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


def conformer_random_crop(image: Tensor, crop_size: int = 384) -> Tuple[Tensor, Tensor]:
    """datasets/transforms.py ``RandomCrop`` of the official code (no label): the crop and its ``img_box``.

    The image is placed at a random offset inside a zero (black) canvas of max(crop, H) x max(crop, W), then a
    random crop_size x crop_size window is taken (torch's global RNG, as ``aream_fast.data.transforms``).
    image (3, H, W) float **before** normalisation (black = 0; the official canvas is black uint8 pixels).
    Returns crop (3, crop_size, crop_size) and img_box (4,) int64 (i1, i2, j1, j2): the rows / columns of the
    crop that hold image pixels (the rest is padding), for ``apply_crop_box`` / ``conformer_patch_labels``.
    """
    if not isinstance(image, Tensor) or image.dim() != 3:
        raise ValueError(f"image must be a (3, H, W) tensor, got {getattr(image, 'shape', type(image))}")
    if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size <= 0:
        raise ValueError(f"crop_size must be a positive int, got {crop_size!r}")
    _, img_h, img_w = image.shape
    hh, ww = max(crop_size, img_h), max(crop_size, img_w)
    h_pad = int(torch.randint(0, hh - img_h + 1, (1,)))
    w_pad = int(torch.randint(0, ww - img_w + 1, (1,)))
    canvas = image.new_zeros(image.shape[0], hh, ww)
    canvas[:, h_pad:h_pad + img_h, w_pad:w_pad + img_w] = image
    h0 = int(torch.randint(0, hh - crop_size + 1, (1,)))
    w0 = int(torch.randint(0, ww - crop_size + 1, (1,)))
    crop = canvas[:, h0:h0 + crop_size, w0:w0 + crop_size]
    box = torch.tensor([max(h_pad - h0, 0), min(crop_size, img_h + h_pad - h0),
                        max(w_pad - w0, 0), min(crop_size, img_w + w_pad - w0)], dtype=torch.int64)
    return crop, box
