"""Per-patch pseudo labels for the AReAM affinity loss.

Official rule (Jessie459/AReAM ``seg_to_aff``, spec §3.4): the pixel label map is downsampled with legacy
``nearest`` interpolation, whose source index is ``floor(i * patch_size)``, so each patch takes the label of
its **top-left pixel** ``(patch_size * i, patch_size * j)`` -- not a majority vote, not the centre.

Pair counts (DESIGN "The one idea", item 2): the official loss divides by the batch-global numbers of
positive (same label, both valid) and negative (different labels, both valid) ordered patch pairs, diagonal
included, each plus one. With ``m_bc`` valid patches of class c in image b and ``V_b = sum_c m_bc``::

    n_pos = sum_b sum_c m_bc**2 + 1
    n_neg = sum_b V_b**2 - (n_pos - 1) + 1

which a bincount gives without any P x P mask.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["seg_to_patch_labels", "pair_counts"]


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
    if not isinstance(seg, Tensor):
        raise ValueError(f"seg must be a torch.Tensor of shape (B, H, W), got {type(seg).__name__}")
    if seg.dim() != 3:
        raise ValueError(f"seg must have shape (B, H, W), got shape {tuple(seg.shape)}")
    if seg.dtype.is_floating_point or seg.dtype.is_complex or seg.dtype == torch.bool:
        raise ValueError(f"seg must be an integer tensor, got dtype {seg.dtype}")
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


def pair_counts(
    patch_labels: Tensor, num_labels: Optional[int] = None, ignore_index: int = 255
) -> Tuple[Tensor, Tensor]:
    """Batch-global positive / negative pair counts of the official loss, each with its +1.

    Args:
        patch_labels: (B, P) integer labels, values in [0, num_labels) or ``ignore_index``.
        num_labels: number of distinct label values (K + 1 with background); inferred from the data if None.
        ignore_index: label of ignored patches.

    Returns:
        (n_pos, n_neg): 0-dim int64 tensors on ``patch_labels.device``:
        ``n_pos = |{(b, i, j): y_bi == y_bj, both valid}| + 1`` and
        ``n_neg = |{(b, i, j): y_bi != y_bj, both valid}| + 1`` (ordered pairs, diagonal included).
    """
    if not isinstance(patch_labels, Tensor) or patch_labels.dim() != 2:
        shape = tuple(patch_labels.shape) if isinstance(patch_labels, Tensor) else type(patch_labels).__name__
        raise ValueError(f"patch_labels must be a (B, P) tensor, got {shape}")
    if patch_labels.dtype.is_floating_point or patch_labels.dtype.is_complex or patch_labels.dtype == torch.bool:
        raise ValueError(f"patch_labels must be an integer tensor, got dtype {patch_labels.dtype}")
    labels = patch_labels.to(torch.int64)
    batch = labels.shape[0]
    valid = labels != ignore_index
    if bool(((labels < 0) & valid).any()):
        raise ValueError(
            f"patch_labels must hold values >= 0 or ignore_index={ignore_index}, got min {int(labels[valid].min())}"
        )
    max_label = int(labels[valid].max()) if bool(valid.any()) else -1
    if num_labels is None:
        num_labels = max_label + 1 if max_label >= 0 else 1
    elif max_label >= num_labels:
        # A label >= num_labels would share a bincount bin with another image's label: wrong counts.
        raise ValueError(f"patch_labels hold label {max_label} >= num_labels={num_labels}")
    # One bin per (image, label); ignored patches are dropped before the bincount.
    image = torch.arange(batch, device=labels.device).unsqueeze(1).expand_as(labels)
    keys = (image * num_labels + labels)[valid]
    per_class = torch.bincount(keys, minlength=batch * num_labels)  # m_bc, flattened
    per_image = valid.sum(dim=1)  # V_b
    same = (per_class * per_class).sum()
    total = (per_image * per_image).sum()
    return same + 1, total - same + 1
