"""Test-time inference of a segmentation network: multi-scale + flip, bounded memory, optional dense CRF.

    probs = multiscale_flip_probs(model, images)        # (B, 3, H, W) -> (B, K, H, W) class probabilities
    probs = crf_refine(image_uint8, probs[0], preset="toco")   # optional CRF, (K, H, W)
    labels = probs.argmax(0)

Rules (stated once, the tests check them against a plain per-scale loop):

* Scale s resizes the (normalised) images bilinearly (align_corners False) to (round(s H), round(s W)).
* At each scale the logits of the image and of its horizontal mirror (flipped back) are averaged, resized
  bilinearly back to (H, W) and turned into probabilities with a softmax over the classes.
* Scales are combined by the per-pixel **maximum** of the probabilities (the ``seg`` test code of
  Jessie459/AReAM and xulianuwa/MCTformer, and rulixiang/ToCo, take the max over scales), then renormalised to
  sum to one over the classes (the argmax is unchanged; a CRF needs a distribution). ``combine="mean"``
  averages instead.
* Memory: a scaled image with more than ``max_pixels`` pixels is run as overlapping ``tile`` x ``tile``
  windows (sliding window). Each window keeps only the part of its logits that is at least overlap / 2 away
  from an interior window edge (window i keeps up to the middle of its overlap with window i + 1), so the
  stitched logits equal the untiled ones exactly for a model whose receptive field reaches at most overlap / 2
  pixels and that is translation-equivariant (no stride); for a ViT or a strided CNN it is an approximation
  used only above the pixel budget.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_SCALES: Tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
DEFAULT_MAX_PIXELS = 1024 * 1024
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 128


def _windows(length: int, tile: int, overlap: int) -> List[Tuple[int, int, int, int]]:
    """Windows along one axis: (start, end, keep_start, keep_end); the keep ranges partition [0, length)."""
    if length <= tile:
        return [(0, length, 0, length)]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    out = []
    for i, s in enumerate(starts):
        keep_lo = 0 if i == 0 else (starts[i - 1] + tile + s) // 2
        keep_hi = length if i == len(starts) - 1 else (s + tile + starts[i + 1]) // 2
        out.append((s, s + tile, keep_lo, keep_hi))
    return out


def sliding_window_logits(model: nn.Module, images: Tensor, *, tile: int = DEFAULT_TILE,
                          overlap: int = DEFAULT_OVERLAP) -> Tensor:
    """Logits (B, K, H, W) of images (B, 3, H, W) computed window by window (see the module docstring).
    Peak memory is that of one ``tile`` x ``tile`` forward plus the (B, K, H, W) output."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    h, w = images.shape[-2:]
    out: Optional[Tensor] = None
    for y0, y1, ky0, ky1 in _windows(h, tile, overlap):
        for x0, x1, kx0, kx1 in _windows(w, tile, overlap):
            logits = model(images[..., y0:y1, x0:x1])
            if out is None:
                out = logits.new_empty(logits.shape[:2] + (h, w))
            out[..., ky0:ky1, kx0:kx1] = logits[..., ky0 - y0:ky1 - y0, kx0 - x0:kx1 - x0]
    return out


def predict_logits(model: nn.Module, images: Tensor, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                   tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Tensor:
    """(B, 3, H, W) -> (B, K, H, W) logits; sliding windows when H * W > max_pixels (None: never)."""
    h, w = images.shape[-2:]
    if max_pixels is not None and h * w > max_pixels:
        return sliding_window_logits(model, images, tile=tile, overlap=overlap)
    return model(images)


def _check(images: Tensor, scales: Sequence[float], combine: str) -> Tuple[float, ...]:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or \
            not images.is_floating_point():
        raise ValueError(f"images must be a floating (B, 3, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    if combine not in ("max", "mean"):
        raise ValueError(f"combine must be 'max' or 'mean', got {combine!r}")
    return scales


@torch.no_grad()
def multiscale_flip_probs(model: nn.Module, images: Tensor, scales: Sequence[float] = DEFAULT_SCALES, *,
                          flip: bool = True, combine: str = "max",
                          max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, tile: int = DEFAULT_TILE,
                          overlap: int = DEFAULT_OVERLAP, progress: bool = False) -> Tensor:
    """Class probabilities (B, K, H, W) float32 of images (B, 3, H, W) (normalised, any size) from
    ``scales`` x (identity, horizontal flip), combined as the module docstring says. The model is used as
    given (call ``model.eval()`` first)."""
    scales = _check(images, scales, combine)
    from tqdm import tqdm

    h, w = images.shape[-2:]
    out: Optional[Tensor] = None
    for s in tqdm(scales, desc="scales", disable=not progress, leave=False):
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        logits = predict_logits(model, x, max_pixels=max_pixels, tile=tile, overlap=overlap).float()
        if flip:
            flipped = predict_logits(model, x.flip(-1), max_pixels=max_pixels, tile=tile, overlap=overlap)
            logits = (logits + flipped.float().flip(-1)) / 2
        if size != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        del logits
        if out is None:
            out = probs
        elif combine == "max":
            torch.maximum(out, probs, out=out)
        else:
            out += probs
    if combine == "max":
        out /= out.sum(dim=1, keepdim=True)
    else:
        out /= len(scales)
    return out


def crf_refine(image: np.ndarray, probs: Tensor, preset: str, **overrides: Any) -> Tensor:
    """Dense-CRF post-processing of one image: image uint8 (H, W, 3) RGB (not normalised), probs (K, H, W)
    -> refined probabilities (K, H, W) from ``aream_fast.stage2.dense_crf(image, probs, preset=preset,
    **overrides)`` (imported here, so inference without CRF never needs it)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    if not isinstance(probs, Tensor) or probs.dim() != 3 or tuple(probs.shape[1:]) != image.shape[:2]:
        raise ValueError(f"probs must be a (K, H, W) tensor with (H, W) = {image.shape[:2]}, got "
                         f"{tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__}")
    from aream_fast.stage2 import dense_crf

    refined = dense_crf(image, probs, preset=preset, **overrides)
    refined = torch.as_tensor(refined)
    if tuple(refined.shape) != tuple(probs.shape):
        raise RuntimeError(f"dense_crf returned shape {tuple(refined.shape)}, expected {tuple(probs.shape)}")
    return refined
