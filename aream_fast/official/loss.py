"""The official AReAM affinity loss on materialised attention logits: the ground truth for every backend.

Transcribes Jessie459/AReAM (``losses.py``, ``tools/camutils.py: seg_to_aff`` and the loss loop of
``main_voc_mctformer.py``; docs/semantics.md, "Affinity loss") deliberately in its own memory-hungry form: it takes
the full (B, H, N, N) pre-softmax logits of each supervised layer and materialises the B x P x P pair label T,
exactly as the official code does. Use it for parity tests and as the baseline in benchmarks, never for training.

One implementation, :func:`_affinity_loss` on (B, P, P) positive / negative pair masks, serves both entry points:
:func:`aream_loss_reference` (patch labels in, our API) and :func:`official_affinity_loss` (the official coded
affinity map from :func:`official_seg_to_aff` in, the official API).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from aream_fast.models.records import check_int_tensor

__all__ = ["aream_loss_reference", "patch_labels_to_affinity", "official_seg_to_aff", "official_affinity_loss"]


def patch_labels_to_affinity(patch_labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Official ``seg_to_aff`` after the nearest downsampling (docs/semantics.md, "Affinity loss").

    Args:
        patch_labels: (B, P) integer patch labels.

    Returns:
        (B, P, P) int64 T with T[b, m, n] = 1 if labels m and n agree, 0 if they differ, and ``ignore_index``
        wherever label m or label n is ``ignore_index``. The diagonal stays 1 for valid patches.
    """
    if ignore_index in (0, 1):
        raise ValueError(
            f"ignore_index must differ from the pair codes 0 and 1 of the affinity map, got {ignore_index}"
        )
    labels = patch_labels.to(torch.int64)
    num_patches = labels.shape[1]
    rows = labels.unsqueeze(2).expand(-1, -1, num_patches)
    cols = labels.unsqueeze(1).expand(-1, num_patches, -1)
    aff = (rows == cols).to(torch.int64)
    aff[rows == ignore_index] = ignore_index
    aff[cols == ignore_index] = ignore_index
    return aff


def aream_loss_reference(
    attn_logits: Union[Sequence[Tensor], Tensor],
    patch_labels: Tensor,
    *,
    num_prefix_tokens: int = 0,
    layer_weights: Optional[Union[Sequence[float], Tensor]] = None,
    ignore_index: int = 255,
) -> Tensor:
    """Official AReAM affinity loss (docs/semantics.md, "Affinity loss") on materialised pre-softmax logits.

    Args:
        attn_logits: one (B, H, N, N) tensor of **pre-softmax** logits ``Z = scale * q k^T`` per supervised
            layer (a sequence, or a stacked (L, B, H, N, N) tensor).
        patch_labels: (B, P) integer labels, P = N - num_prefix_tokens; ``ignore_index`` marks ignored patches.
        num_prefix_tokens: C, the number of class / prefix tokens in front of the patches.
        layer_weights: None (uniform, official 'U') or L weights (official 'E'); multiplied in but not
            renormalised: the result is still divided by L.
        ignore_index: label of ignored patches.

    Returns:
        0-dim tensor: ``mean_l w_l * (0.5 * sum_pos (1 - S_l) / (|pos| + 1) + 0.5 * sum_neg S_l / (|neg| + 1))``
        with ``S_l = sigmoid(mean_h Z_l[:, :, C:, C:])`` and batch-global counts. Computed in float32 for
        float16 / bfloat16 logits, otherwise in the logits' dtype.
    """
    check_int_tensor(patch_labels, "patch_labels", "B, P")
    logits = list(attn_logits.unbind(0)) if isinstance(attn_logits, Tensor) else list(attn_logits)
    if len(logits) == 0:
        raise ValueError("attn_logits must hold at least one (B, H, N, N) tensor, got an empty sequence")
    num_layers = len(logits)
    if layer_weights is None:
        weights = [1.0] * num_layers
    else:
        weights = list(layer_weights)
        if len(weights) != num_layers:
            raise ValueError(
                f"layer_weights must have one weight per supervised layer ({num_layers}), got {len(weights)}"
            )
    # seg_to_aff: the B x P x P pair label, materialised as in the official code. The positive / negative
    # masks come from label equality and validity directly, not from the 0 / 1 / ignore_index coded T:
    # with ignore_index 0 or 1 that code would make ignored pairs count as negatives / positives.
    labels = patch_labels.to(torch.int64)
    valid = labels != ignore_index
    both_valid = valid.unsqueeze(2) & valid.unsqueeze(1)
    same = labels.unsqueeze(2) == labels.unsqueeze(1)
    return _affinity_loss(logits, both_valid & same, both_valid & ~same, weights, num_prefix_tokens)


def _affinity_loss(logits: List[Tensor], pos: Tensor, neg: Tensor, weights: Sequence, c: int) -> Tensor:
    """mean_l w_l (0.5 sum_pos (1 - S_l) / (|pos| + 1) + 0.5 sum_neg S_l / (|neg| + 1)), S_l = sigmoid(head-mean
    Z_l[:, :, C:, C:]). logits: L tensors (B, H, N, N); pos, neg: (B, P, P) bool pair masks; weights: L numbers."""
    batch, num_patches = pos.shape[0], pos.shape[-1]
    pos_label = pos.to(torch.int16)
    neg_label = neg.to(torch.int16)
    pos_count = pos_label.sum() + 1
    neg_count = neg_label.sum() + 1
    total = None
    for z, w in zip(logits, weights):
        if z.dim() != 4 or z.shape[-1] != z.shape[-2]:
            raise ValueError(f"each attn_logits entry must have shape (B, H, N, N), got {tuple(z.shape)}")
        if z.shape[0] != batch:
            raise ValueError(
                f"patch_labels has batch size {batch} but attn_logits entries have shape "
                f"{tuple(z.shape)} (B={z.shape[0]})"
            )
        if z.shape[-1] - c != num_patches:
            raise ValueError(
                f"patch_labels has P={num_patches} patches but attn_logits has N={z.shape[-1]} tokens "
                f"with num_prefix_tokens={c}"
            )
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()
        # Head mean of the pre-softmax logits on the patch-patch block, then the sigmoid.
        attn = torch.sigmoid(z[:, :, c:, c:].mean(dim=1))
        pos_loss = torch.sum(pos_label * (1 - attn)) / pos_count
        neg_loss = torch.sum(neg_label * attn) / neg_count
        loss_l = 0.5 * pos_loss + 0.5 * neg_loss
        term = w * loss_l
        total = term if total is None else total + term
    return total / len(logits)


def official_seg_to_aff(seg: Tensor, patch_size: int = 16, ignore_index: int = 255) -> Tensor:
    """Official ``seg_to_aff`` (Jessie459/AReAM: tools/camutils.py): (B, H, W) segmentation -> (B, P, P) int64
    pseudo affinity, 1 same / 0 different / ``ignore_index`` where either patch is ignored. The patch label is the
    pixel at (patch_size i, patch_size j) (legacy ``nearest`` downsampling), then :func:`patch_labels_to_affinity`.
    """
    if seg.dim() != 3:
        raise ValueError(f"seg must be a (B, H, W) label map, got shape {tuple(seg.shape)}")
    b, H, W = seg.shape
    small = F.interpolate(seg.unsqueeze(1).float(), size=(H // patch_size, W // patch_size), mode="nearest")
    return patch_labels_to_affinity(small.reshape(b, -1).long(), ignore_index=ignore_index)


def official_affinity_loss(attn_logits: Union[Sequence[Tensor], Tensor], aff: Tensor, *, num_prefix_tokens: int,
                           supervised_layers: Sequence[int],
                           layer_weights: Optional[Union[Sequence[float], Tensor]] = None) -> Tensor:
    """The official loss call: L_aff = mean over l in ``supervised_layers`` of w_l * L_aff,l.

    attn_logits: (L, B, H, N, N) stacked pre-softmax logits of all blocks (or a sequence indexable by layer);
    aff: (B, P, P) int64 from :func:`official_seg_to_aff` (1 positive, 0 negative, anything else ignored);
    layer_weights: None (uniform) or one e_l per supervised layer, not renormalised. Returns a 0-dim tensor.
    """
    if len(supervised_layers) == 0:
        raise ValueError("supervised_layers must not be empty")
    if aff.dim() != 3 or aff.shape[-1] != aff.shape[-2]:
        raise ValueError(f"aff must be a (B, P, P) affinity map, got shape {tuple(aff.shape)}")
    weights = [1.0] * len(supervised_layers) if layer_weights is None else list(layer_weights)
    if len(weights) != len(supervised_layers):
        raise ValueError(f"layer_weights must have one weight per supervised layer ({len(supervised_layers)}), "
                         f"got {len(weights)}")
    logits = [attn_logits[layer] for layer in supervised_layers]
    return _affinity_loss(logits, aff == 1, aff == 0, weights, num_prefix_tokens)
