"""CAMs -> fused pixel pseudo labels -> per-patch labels for the AReAM loss (docs/semantics.md, "Pseudo labels", "Patch
labels").

Official ``cam_to_seg`` (tools/camutils.py) is called twice (bg scores 0.35 and 0.55) with a Python loop over
images. Here both scores and every image go through ONE batched PAR call: the bg score is a constant channel,
each image's present classes are packed into the first channels and padding channels get −inf before the
softmax (exactly the official per-image channel selection: their probability is 0 and PAR keeps zero channels
at zero), and PAR is linear in the masks with weights fixed by the image, so the (B, 2·M, h, w) stack shares one
affinity. M = 1 + the largest number of present classes in the batch (VOC: typically 3-5, not 21).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .cam import PresentCAMs, present_classes
from aream_fast.data.transforms import denormalize
from .par import PAR
from .patch_labels import seg_to_patch_labels


CAMs = Union[Tensor, PresentCAMs]


def _check(images: Tensor, cams: CAMs, labels: Tensor) -> None:
    present = isinstance(cams, PresentCAMs)
    maps = cams.cams if present else cams
    for name, x in (("images", images), ("cams", maps), ("labels", labels)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be a float (B, 3, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
    if maps.dim() != 4 or not maps.is_floating_point():
        raise ValueError(f"cams must be a float (B, K, H, W) tensor, got {tuple(maps.shape)} {maps.dtype}")
    if maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"cams {tuple(maps.shape)} must match images {tuple(images.shape)} in B, H and W")
    if labels.dim() != 2 or labels.shape[0] != maps.shape[0] or (not present and labels.shape != maps.shape[:2]):
        want = f"(B, K) = {tuple(maps.shape[:2])}" if not present else f"(B, K) with B = {maps.shape[0]}"
        raise ValueError(f"labels must be {want}, got {tuple(labels.shape)}")
    if present and (cams.classes.shape != maps.shape[:2] or cams.valid.shape != maps.shape[:2]):
        raise ValueError(f"PresentCAMs: classes and valid must be (B, M) = {tuple(maps.shape[:2])}, got "
                         f"{tuple(cams.classes.shape)} and {tuple(cams.valid.shape)}")


def _half_res(images: Tensor, cams: Tensor) -> Tuple[Tensor, Tensor]:
    """Official ×0.5 bilinear (align_corners False; = 2×2 average pool for even sizes) of both inputs."""
    h, w = int(images.shape[-2] / 2), int(images.shape[-1] / 2)
    imgs = F.interpolate(images.float(), size=(h, w), mode="bilinear", align_corners=False)
    if cams.shape[1] == 0:  # no present class in the whole batch
        return imgs, cams.float().new_zeros(cams.shape[0], 0, h, w)
    cam = F.interpolate(cams.float(), size=(h, w), mode="bilinear", align_corners=False)
    return imgs, cam


def refined_probs(images: Tensor, cams: CAMs, labels: Tensor, *, par: PAR,
                  bg_scores: Tuple[float, ...] = (0.35, 0.55), denormalized: bool = False) -> Tuple[Tensor, Tensor]:
    """PAR-refined half-resolution probabilities for every bg score, on a compact channel list.

    Only background + each image's present classes are propagated (the official per-image channel
    selection), packed into M = 1 + max_b(#present classes of image b) channels; padding channels of images
    with fewer classes get −inf before the softmax, so they are exactly 0 and never win an argmax.

    Args: images (B, 3, H, W) ImageNet-normalised unless ``denormalized``; cams (B, K, H, W), or a
    :class:`aream_fast.pseudo_labels.cam.PresentCAMs` already holding only the present classes (``present_only=True``);
    labels (B, K).
    Returns: refined (B, S, M, H/2, W/2) float32 with S = len(bg_scores), and ids (B, M) int64: the
    segmentation id of each channel (0 = background, k + 1 = class k; padding channels repeat 0). Channel
    order per image is bg, then present classes ascending, as the official key list.
    """
    _check(images, cams, labels)
    imgs = images if denormalized else denormalize(images.float())
    s = len(bg_scores)
    if isinstance(cams, PresentCAMs):
        fg, order, valid = cams
        b, n_fg, H, W = fg.shape
    else:
        b, k, H, W = cams.shape
        order, valid = present_classes(labels)
        n_fg = order.shape[1]
        # pack the present classes first (resizing is per channel, so packing before it changes nothing)
        fg = cams.gather(1, order.view(b, n_fg, 1, 1).expand(b, n_fg, H, W))
    imgs, fg = _half_res(imgs, fg)
    h, w = fg.shape[-2:]
    fg = fg.masked_fill(~valid.view(b, n_fg, 1, 1), float("-inf"))
    fg = fg.unsqueeze(1).expand(b, s, n_fg, h, w)
    bg = torch.tensor(bg_scores, dtype=fg.dtype, device=fg.device).view(1, s, 1, 1, 1).expand(b, s, 1, h, w)
    probs = torch.cat([bg, fg], dim=2).softmax(dim=2)  # (B, S, M, h, w)
    m = n_fg + 1
    refined = par(imgs, probs.reshape(b, s * m, h, w)).view(b, s, m, h, w)
    ids = torch.cat([torch.zeros(b, 1, dtype=torch.int64, device=fg.device),
                     torch.where(valid, order + 1, torch.zeros_like(order))], dim=1)
    return refined, ids


def _bilinear_points(x: Tensor, out_size: Tuple[int, int], rows: Tensor, cols: Tensor) -> Tensor:
    """Values of F.interpolate(x, out_size, bilinear, align_corners=False) at output rows x cols only.
    x (..., h, w) -> (..., len(rows), len(cols)); same source-index rule as PyTorch (clamped at 0)."""
    h, w = x.shape[-2:]

    def index(dst: Tensor, n_in: int, n_out: int):
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = ((dst.float() + 0.5) * scale - 0.5).clamp_min(0.0)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        lam = src - i0.float()
        return i0, i1, lam

    r0, r1, lr = index(rows, h, out_size[0])
    c0, c1, lc = index(cols, w, out_size[1])
    lr = lr.view(-1, 1).to(x.device)
    lc = lc.to(x.device)
    top = x[..., r0.to(x.device), :]
    bot = x[..., r1.to(x.device), :]
    row = (1 - lr) * top + lr * bot  # (..., R, w)
    return (1 - lc) * row[..., c0.to(x.device)] + lc * row[..., c1.to(x.device)]


def fuse_segs(seg_l: Tensor, seg_h: Tensor, ignore_index: int = 255) -> Tensor:
    """Official fusion: seg = seg_h; seg[seg_h == 0] = ignore; seg[seg_h == 0 & seg_l == 0] = 0."""
    seg = seg_h.clone()
    seg[seg_h == 0] = ignore_index
    seg[(seg_h == 0) & (seg_l == 0)] = 0
    return seg


@torch.no_grad()
def cams_to_patch_labels(images: Tensor, cams: CAMs, labels: Tensor, *, par: PAR, patch_size: int = 16,
                         bg_low: float = 0.35, bg_high: float = 0.55, ignore_index: int = 255,
                         sample_only: bool = False) -> Tuple[Optional[Tensor], Tensor]:
    """Pseudo labels of the AReAM loss from CAMs (official ``cam_to_seg`` ×2 + fusion + ``seg_to_aff`` rule).

    Args:
        images: (B, 3, H, W) ImageNet-normalised float; H, W multiples of ``patch_size``.
        cams: (B, K, H, W) float CAMs in [0, 1] (absent classes are ignored whatever their value), or a
            :class:`aream_fast.pseudo_labels.cam.PresentCAMs` of the present classes only (the same labels).
        labels: (B, K) multi-hot image labels (present = nonzero).
        par: a :class:`aream_fast.pseudo_labels.par.PAR` module.
        bg_low / bg_high: the two constant background scores (official score_l 0.35, score_h 0.55).
        sample_only: evaluate the upsampled map only at the P pixels (patch_size·i, patch_size·j) that
            ``seg_to_patch_labels`` reads (docs/semantics.md, "Patch labels"); same patch labels (up to
            float rounding of
            exact ties), and ``seg`` is returned as None.

    Returns:
        seg: (B, H, W) int64 fused pixel labels (0 bg, k+1 class k, ``ignore_index`` where seg_h is bg but
        seg_l is fg), or None when ``sample_only``; patch_labels: (B, P) int64, P = (H/ps)·(W/ps).
    """
    _check(images, cams, labels)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    H, W = images.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"images H, W must be multiples of patch_size={patch_size}, got {tuple(images.shape)}")
    refined, ids = refined_probs(images, cams, labels, par=par, bg_scores=(bg_low, bg_high))  # (B, 2, M, h, w)
    b, s, c, h, w = refined.shape
    if sample_only:
        rows = torch.arange(0, H, patch_size)
        cols = torch.arange(0, W, patch_size)
        up = _bilinear_points(refined, (H, W), rows, cols)  # (B, 2, K+1, H/ps, W/ps)
    else:
        up = F.interpolate(refined.view(b, s * c, h, w), size=(H, W), mode="bilinear", align_corners=False)
        up = up.view(b, s, c, H, W)
    best = up.argmax(dim=2)  # (B, 2, ...) ties -> lowest channel: bg first, then classes ascending
    seg2 = ids.gather(1, best.reshape(b, -1)).view(best.shape)
    seg = fuse_segs(seg2[:, 0], seg2[:, 1], ignore_index)
    if sample_only:
        return None, seg.reshape(b, -1).to(torch.int64)
    return seg, seg_to_patch_labels(seg, patch_size, ignore_index)
