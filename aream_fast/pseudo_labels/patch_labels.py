"""Per-patch pseudo labels for the AReAM affinity loss.

Official rule (Jessie459/AReAM ``seg_to_aff``, docs/semantics.md, "Patch labels"): the pixel label map is downsampled
with legacy
``nearest`` interpolation, whose source index is ``floor(i * patch_size)``, so each patch takes the label of
its **top-left pixel** ``(patch_size * i, patch_size * j)`` -- not a majority vote, not the centre.
"""
from __future__ import annotations

import torch
from torch import Tensor

from aream_fast.models.records import check_int_tensor

__all__ = ["seg_to_patch_labels"]


def seg_to_patch_labels(seg: Tensor, patch_size: int, ignore_index: int = 255) -> Tensor:
    """Pixel labels -> per-patch labels with the official nearest rule.

    Args:
        seg: (B, H, W) integer pixel labels (0 background, k + 1 foreground class k, ``ignore_index`` ignored).
            H and W must be multiples of ``patch_size``.
        patch_size: patch side in pixels (16 for ViT-S/B).
        ignore_index: the ignore value; kept as is (it is only used to document the contract; pixel values
            are copied unchanged).

    Returns:
        (B, P) int64 with P = (H / patch_size) * (W / patch_size), patches in row-major order; entry
        ``[b, i * (W / patch_size) + j]`` is ``seg[b, patch_size * i, patch_size * j]``.
    """
    check_int_tensor(seg, "seg", "B, H, W")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    _, height, width = seg.shape
    if height % patch_size or width % patch_size or height == 0 or width == 0:
        raise ValueError(
            f"seg height and width must be positive multiples of patch_size={patch_size}, "
            f"got seg shape {tuple(seg.shape)}"
        )
    # Legacy nearest downsampling by an integer factor: source index floor(i * patch_size).
    return seg[:, ::patch_size, ::patch_size].reshape(seg.shape[0], -1).to(torch.int64)
