"""The classification loss of the official training step (docs/semantics.md, "Training step")."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def classification_loss(class_logits: Tensor, patch_logits: Tensor, labels: Tensor) -> Tensor:
    """L_cls = MLSM(class_logits, labels) + MLSM(patch_logits, labels) (both MCTformer-V2 heads); all (B, K); fp32."""
    return (F.multilabel_soft_margin_loss(class_logits.float(), labels)
            + F.multilabel_soft_margin_loss(patch_logits.float(), labels))
