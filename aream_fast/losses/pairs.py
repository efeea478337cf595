"""Pair counts of the official affinity loss, without any P x P mask.

The official loss divides by the batch-global numbers of positive (same label, both valid) and negative
(different labels, both valid) ordered patch pairs, diagonal included, each plus one (docs/semantics.md,
"Affinity loss"). With ``m_bc`` valid patches of class c in image b and ``V_b = sum_c m_bc``::

    n_pos = sum_b sum_c m_bc**2 + 1
    n_neg = sum_b V_b**2 - (n_pos - 1) + 1

The counting itself is ``aream_fast.kernels.pair_counts_sorted`` (one definition, shared with the Triton loss):
a per-image sort and two searchsorted calls, so the work and memory are bounded by the number of patches, whatever
the label values (a bincount over B * (max label + 1) bins is not).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["pair_counts", "check_patch_labels"]


def check_patch_labels(patch_labels: Tensor, ignore_index: int = 255, name: str = "patch_labels") -> Tensor:
    """``ValueError`` unless ``patch_labels`` is a (B, P) integer tensor with values >= 0 or ``ignore_index``;
    returns it as int64."""
    if not isinstance(patch_labels, Tensor) or patch_labels.dim() != 2:
        shape = tuple(patch_labels.shape) if isinstance(patch_labels, Tensor) else type(patch_labels).__name__
        raise ValueError(f"{name} must be a (B, P) tensor, got {shape}")
    if patch_labels.dtype.is_floating_point or patch_labels.dtype.is_complex or patch_labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {patch_labels.dtype}")
    labels = patch_labels.to(torch.int64)
    valid = labels != ignore_index
    if bool(((labels < 0) & valid).any()):
        raise ValueError(f"{name} must hold values >= 0 or ignore_index={ignore_index}, "
                         f"got min {int(labels[valid].min())}")
    return labels


def pair_counts(
    patch_labels: Tensor, num_labels: Optional[int] = None, ignore_index: int = 255
) -> Tuple[Tensor, Tensor]:
    """Batch-global positive / negative pair counts of the official loss, each with its +1.

    Args:
        patch_labels: (B, P) integer labels, values >= 0 or ``ignore_index``.
        num_labels: if given, every valid label must be < num_labels (a check only: the counts do not depend
            on it).
        ignore_index: label of ignored patches.

    Returns:
        (n_pos, n_neg): 0-dim int64 tensors on ``patch_labels.device``:
        ``n_pos = |{(b, i, j): y_bi == y_bj, both valid}| + 1`` and
        ``n_neg = |{(b, i, j): y_bi != y_bj, both valid}| + 1`` (ordered pairs, diagonal included).
    """
    labels = check_patch_labels(patch_labels, ignore_index)
    valid = labels != ignore_index
    if num_labels is not None and bool(valid.any()):
        max_label = int(labels[valid].max())
        if max_label >= num_labels:
            raise ValueError(f"patch_labels hold label {max_label} >= num_labels={num_labels}")
    from aream_fast.kernels import pair_counts_sorted

    return pair_counts_sorted(labels, ignore_index)
