"""Validation for model selection: multi-label mAP of sigmoid(class_logits) (docs/semantics.md, "Training details"
"selection": per-image
sklearn AP averaged, ``aream_fast.evaluation.metrics.multilabel_map``). Runs in eval mode on the raw (not compiled, not
DDP) model; the model's previous mode is restored."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def classification_map(model: nn.Module, dataset, *, batch_size: int, device: torch.device,
                       autocast: Optional[Callable] = None) -> Dict[str, float]:
    """{"mAP": float, "num_images": int} over ``dataset`` (items with "image" (3, S, S) and "label" (K,))."""
    from aream_fast.evaluation.metrics import multilabel_map

    was_training = model.training
    model.eval()
    scores, labels = [], []
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        for batch in loader:
            with (autocast() if autocast is not None else contextlib.nullcontext()):
                out = model(batch["image"].to(device))
            scores.append(torch.sigmoid(out.class_logits.float()).cpu())
            labels.append(batch["label"].float())
    finally:
        model.train(was_training)
    m, _ = multilabel_map(torch.cat(labels), torch.cat(scores))
    return {"mAP": m, "num_images": int(sum(len(s) for s in scores))}
