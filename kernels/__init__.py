"""Triton kernels (installed as aream_fast.kernels). Each file: kernels + launcher + torch.library op.

This file also holds the three small definitions the kernels share with the package's torch paths, which import
them from here (the lowest layer), so each exists once; importing this file imports neither torch nor triton
(``aream_fast/__init__.py`` runs it to map a plain checkout), the functions import torch when called:

* :func:`interpreting`: whether Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``);
* :func:`acc_dtype`: the accumulation dtype for an input dtype;
* :func:`pair_counts_sorted`: the batch-global positive / negative pair counts of the AReAM loss.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Tuple

if TYPE_CHECKING:
    import torch


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (it must be set before triton is imported to take effect)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs (gradcheck), float32 otherwise (fp16 / bf16 / fp32 inputs accumulate in fp32)."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def pair_counts_sorted(patch_labels: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(n_pos, n_neg) 0-dim int64 tensors with the +1 of the official loss (docs/semantics.md, Fast path item 2)
    for (B, P) int64 ``patch_labels``: sum_c m_bc^2 = sum over valid i of #{j in image b: y_j == y_i}, counted with
    a per-image sort and two searchsorted calls (static shapes, no host sync, no bincount whose size depends on
    the label values, which also keeps huge label ids cheap), and no P x P mask. No input checks (callers do)."""
    import torch

    valid = patch_labels != ignore_index
    sorted_labels, _ = torch.sort(patch_labels, dim=1)
    same_count = (torch.searchsorted(sorted_labels, patch_labels, right=True)
                  - torch.searchsorted(sorted_labels, patch_labels, right=False))
    n_pos_pairs = (same_count * valid).sum()
    n_valid = valid.sum(dim=1)
    n_all_pairs = (n_valid * n_valid).sum()
    return n_pos_pairs + 1, n_all_pairs - n_pos_pairs + 1
