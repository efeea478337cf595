"""AdamW with the official parameter groups (docs/semantics.md, Training details): weight decay on weight matrices only.

No decay on 1-D parameters (norm weights, biases), on any ``*.bias``, and on the names the model lists in
``no_weight_decay()`` (timm convention; ``pos_embed`` when the model has no such method). Note (docs/semantics.md, Oddities): the
official MCTformer ``no_weight_decay`` omits ``cls_token``, so class tokens *are* decayed on the MCT models;
the single-token ViT/DeiT models exempt ``cls_token`` as timm does.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed",)


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two AdamW groups: decayed (>= 2-D weights) and not decayed (1-D, biases, pos_embed)."""
    decay, no_decay = [], []
    module = getattr(model, "module", model)  # DDP / compiled wrappers
    module = getattr(module, "_orig_mod", module)
    exempt = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set(NO_DECAY_NAMES)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        bare = name.replace("module.", "").replace("_orig_mod.", "")
        if param.ndim <= 1 or leaf == "bias" or bare in exempt or leaf in exempt:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """timm-style AdamW (eps 1e-8, betas 0.9/0.999) over :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8)


@contextlib.contextmanager
def preserve_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``model`` (BatchNorm running mean / var / num_batches_tracked) on exit, so a
    train-mode probe forward leaves the model's statistics as they were (the Conformer's BN layers)."""
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in saved:
                    buf.copy_(saved[name])


def freeze_unused_parameters(model: nn.Module, image_size: int, device: torch.device) -> List[str]:
    """Set ``requires_grad=False`` on parameters no training loss can reach, and return their names.

    Probe: one forward + backward of the classification logits on a (1, 3, S, S) input (under
    ``fork_rng``, so the training RNG stream is untouched). Example: MCTformer loads but never applies the
    final LayerNorm (docs/semantics.md, Model); DDP would otherwise fail on parameters that never get a gradient. AdamW skips
    parameters without a gradient anyway, so freezing them changes no value; it keeps the optimizer state the
    same with and without DDP (resume across world sizes). Buffers (BN running statistics) are restored.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), preserve_buffers(model):
        x = torch.randn(1, 3, image_size, image_size, device=device)
        was_training = model.training
        model.train()
        out = model(x)
        (out.class_logits.sum() + out.patch_logits.sum()).backward()
        model.train(was_training)
    unused = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is None:
            param.requires_grad_(False)
            unused.append(name)
        param.grad = None
    return unused
