"""What a ViT forward hands to AReAM, instead of any N x N attention matrix.

These small containers are the contract between the model (``aream_fast.models``), the loss
(``aream_fast.loss``) and the CAM / pseudo-label code (``aream_fast.cam``). They are NamedTuples so that
``torch.compile`` traces them without graph breaks.

Shapes: B batch, H heads, N = C + P tokens (C prefix/class tokens, P = h * w patches), d head width,
K number of foreground classes.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor


class AttentionRequest(NamedTuple):
    """Which per-layer attention statistics a forward should export (layer indices are 0-based).

    supervised_layers: layers whose q, k are kept **with grad** for ``aream_loss`` (official: 7..11).
    refine_layers: layers whose q, k are kept **detached** for CAM refinement by attention-apply
        (official training pseudo labels: 0..6; inference CAMs: all 12).
    class_attention_layers: layers whose head-mean class->patch softmax rows are averaged into
        ``AttentionRecords.class_attention`` (official: all 12). Ignored by single-class-token models.
    defer_loss_grad: pass the supervised layers' q, k through the identity nodes of
        ``aream_fast.loss_deferred`` (``AttentionRecords.deferred``), so that ``deferred_aream_loss`` adds
        each layer's loss gradient inside that layer's backward (eager only).
    """

    supervised_layers: Tuple[int, ...] = ()
    refine_layers: Tuple[int, ...] = ()
    class_attention_layers: Tuple[int, ...] = ()
    defer_loss_grad: bool = False


class AttentionRecords(NamedTuple):
    """Per-layer O(N d) attention statistics of one forward.

    qs, ks: layer -> (B, H, N, d) query / key tensors (pre-scale). With grad for supervised layers,
        detached for refine-only layers. A layer in both keeps the grad version.
    class_attention: (B, C, P) mean over ``class_attention_layers`` and heads of
        softmax(scale * q k^T)[:, :, :C, C:], no grad; None if not requested or C == 1.
    num_prefix_tokens: C.
    scale: the softmax scale (d ** -0.5).
    grid: (h, w) patch grid, P = h * w, patches in row-major order.
    deferred: ``aream_fast.loss_deferred.DeferredGrads`` of the supervised layers when the request asked for
        ``defer_loss_grad``, else None.
    """

    qs: Dict[int, Tensor]
    ks: Dict[int, Tensor]
    class_attention: Optional[Tensor]
    num_prefix_tokens: int
    scale: float
    grid: Tuple[int, int]
    deferred: Optional[Any] = None


class ViTOutput(NamedTuple):
    """class_logits (B, K); patch_logits (B, K); cam (B, K, h, w) detached; records or None."""

    class_logits: Tensor
    patch_logits: Tensor
    cam: Tensor
    records: Optional[AttentionRecords] = None
