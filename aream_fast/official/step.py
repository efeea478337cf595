"""One official training step, slow on purpose (Jessie459/AReAM: main_voc_mctformer.py, the loop of
``train_one_epoch``; docs/semantics.md, "Training step").

Forward with every block's logits materialised, the two classification losses, the pseudo affinity from a
separate no-grad forward (:func:`~aream_fast.official.pseudo_labels.official_pseudo_affinity`), the affinity loss
(:func:`~aream_fast.official.loss.official_affinity_loss`), backward and the optimizer step.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aream_fast.official.loss import official_affinity_loss
from aream_fast.official.pseudo_labels import official_pseudo_affinity

__all__ = ["official_training_step"]


def official_training_step(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], images: Tensor,
                           labels: Tensor, *, par: nn.Module, supervised_layers: Sequence[int] = (7, 8, 9, 10, 11),
                           aream_weight: float = 0.1, aff: Optional[Tensor] = None,
                           backward: bool = True) -> Dict[str, Tensor]:
    """forward -> L_cls -> pseudo affinity from a separate no-grad forward (unless ``aff`` is given) ->
    L = L_cls + aream_weight L_aff -> backward -> optimizer step. Returns the (detached) loss terms.

    ``supervised_layers`` must be the deep layers [layer_index, L): the refinement uses the layers before the
    first of them, as in the official code.
    """
    layer_index = min(supervised_layers)
    class_logits, patch_logits, _cam, attn_logits = model(images)
    loss_cls = F.multilabel_soft_margin_loss(class_logits, labels) + F.multilabel_soft_margin_loss(patch_logits,
                                                                                                   labels)
    if aff is None:
        _seg, aff = official_pseudo_affinity(model, images, labels, par=par, layer_index=layer_index)
    loss_aff = official_affinity_loss(attn_logits, aff, num_prefix_tokens=model.num_prefix_tokens,
                                      supervised_layers=supervised_layers)
    loss = loss_cls + aream_weight * loss_aff
    if backward:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    return {"loss": loss.detach(), "loss_cls": loss_cls.detach(), "loss_aff": loss_aff.detach()}
