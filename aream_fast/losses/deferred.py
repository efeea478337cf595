"""The AReAM loss with its q / k gradients computed inside each supervised layer's own backward.

Why. ``aream_loss`` (torch backend) computes dL/dq, dL/dk in the forward and keeps them until the backward:
2·L tensors of shape (B, H, N, d) (47 MiB for ViT-S, 448 px, B = 4, 5 layers) held across the start of the
backward, which is exactly when a training step's memory peaks (every activation is still saved). Recomputing
them inside the loss's own backward node would not help: that node runs first in the backward, so all 2·L
gradients would again exist at the peak.

How. While the model runs its forward, each supervised layer passes its q, k through an identity node
(``_DeferredGrad``) that also emits a 0-dim *anchor*. After the forward, once the per-patch pseudo labels
are known, :func:`deferred_aream_loss` computes the loss value under ``no_grad`` (one tiled q kᵀ matmul per
layer) and returns it connected to the anchors only. In the backward, the anchor of layer l receives
dTotal/dLoss; the identity node of layer l runs when the attention backward of layer l has produced the
gradients of q, k (autograd runs a node once all its outputs' gradients are in), recomputes layer l's
loss gradient with the tiled torch kernel (``aream_fast.losses.tiled``, three matmuls) and adds it. Only one
layer's dL/dq, dL/dk exists at a time, and never before the backward has freed the deeper layers'
activations. Cost: one extra q kᵀ matmul per supervised layer (the value), against ``aream_loss``.

Same value and gradients as ``aream_loss`` (tests). Eager only: the identity node reads the labels set
after the forward, which ``torch.compile`` cannot trace; the trainer uses ``aream_loss`` when compiling.

Use with our models: ``grads = DeferredGrads(); out = model(images, request, qk_hook=grads.attach)``, then
``deferred_aream_loss(grads, patch_labels, scale=out.records.scale, num_prefix_tokens=...)``
is the loss. In other ViT code: ``q, k = grads.attach(layer, q, k)`` at each supervised layer (before q, k
are used), then ``deferred_aream_loss(grads, patch_labels, ...)``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from aream_fast.models.records import acc_dtype, refuse_double_backward

__all__ = ["DeferredGrads", "deferred_aream_loss"]


class _LossConfig:
    """What the identity nodes need in the backward; set by ``deferred_aream_loss``. Holds no graph tensor
    (the patch labels are plain int64 data), so no reference cycle keeps a step's activations alive."""

    def __init__(self, patch_labels: Tensor, weights: Dict[int, float], scale: float, num_prefix_tokens: int,
                 ignore_index: int) -> None:
        self.patch_labels = patch_labels
        self.weights = weights  # layer -> w_l / L
        self.scale = scale
        self.num_prefix_tokens = num_prefix_tokens
        self.ignore_index = ignore_index


class _Slot:
    """Mutable holder shared by one forward's identity nodes and its loss call."""

    def __init__(self) -> None:
        self.config: Optional[_LossConfig] = None


def _layer_grads(q: Tensor, k: Tensor, config: _LossConfig, layer: int) -> Tuple[Tensor, Tensor]:
    """(w_l / L) · dL_l/dq, dL_l/dk of one layer, each (B, H, N, d) in q's dtype (tiled torch kernel)."""
    from aream_fast.losses.tiled import _aream_loss_tiled_fwd

    weight = torch.tensor([config.weights[layer]], dtype=torch.float64)
    _, dqs, dks = _aream_loss_tiled_fwd([q], [k], config.patch_labels, weight, config.scale,
                                        config.num_prefix_tokens, config.ignore_index, True)
    return dqs[0], dks[0]


class _DeferredGrad(torch.autograd.Function):
    """Identity on (q, k) plus a 0-dim anchor; the backward adds the layer's AReAM gradient."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, slot: _Slot, layer: int):
        ctx.slot = slot
        ctx.layer = layer
        ctx.save_for_backward(q, k)  # views of the qkv projection that the attention saves anyway
        ctx.set_materialize_grads(False)
        return q.view_as(q), k.view_as(k), q.new_zeros((), dtype=acc_dtype(q.dtype))  # the loss's dtype

    @staticmethod
    def backward(ctx, grad_q: Optional[Tensor], grad_k: Optional[Tensor], grad_anchor: Optional[Tensor]):
        config = ctx.slot.config
        if grad_anchor is None or config is None:  # the deferred loss was not used in this backward
            return grad_q, grad_k, None, None
        refuse_double_backward("deferred AReAM loss (--loss-grad layer / defer_loss_grad)")
        q, k = ctx.saved_tensors
        dq, dk = _layer_grads(q.detach(), k.detach(), config, ctx.layer)
        dq.mul_(grad_anchor.to(dq.dtype))
        dk.mul_(grad_anchor.to(dk.dtype))
        if grad_q is not None:
            dq.add_(grad_q)
        if grad_k is not None:
            dk.add_(grad_k)
        return dq, dk, None, None


class _AnchoredValue(torch.autograd.Function):
    """Returns the (no-grad) loss value; its backward hands the incoming gradient to every anchor."""

    @staticmethod
    def forward(ctx, value: Tensor, *anchors: Tensor) -> Tensor:
        ctx.num_anchors = len(anchors)
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None,) + (grad,) * ctx.num_anchors


class DeferredGrads:
    """One forward's deferred-gradient state: per supervised layer the q, k (detached, for the loss value)
    and the anchor of its identity node.

    ``attach(layer, q, k) -> (q, k)``: call once per supervised layer during the forward, q, k (B, H, N, d)
    the tensors the attention then consumes; returns identity views to use in their place.
    """

    def __init__(self) -> None:
        self._slot = _Slot()
        self.qs: Dict[int, Tensor] = {}
        self.ks: Dict[int, Tensor] = {}
        self.anchors: Dict[int, Tensor] = {}

    def attach(self, layer: int, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        if layer in self.anchors:
            raise ValueError(f"layer {layer} is already attached in this forward")
        if not (q.requires_grad or k.requires_grad) or not torch.is_grad_enabled():
            self.qs[layer], self.ks[layer] = q.detach(), k.detach()
            return q, k  # nothing to differentiate (no_grad forward): no identity node
        q2, k2, anchor = _DeferredGrad.apply(q, k, self._slot, int(layer))
        self.qs[layer], self.ks[layer] = q.detach(), k.detach()
        self.anchors[layer] = anchor
        return q2, k2

    @property
    def layers(self) -> Tuple[int, ...]:
        return tuple(self.qs)


def deferred_aream_loss(grads, patch_labels: Tensor, *, scale: Optional[float] = None,
                        num_prefix_tokens: Optional[int] = None,
                        layer_weights: Optional[Union[Sequence[float], Tensor]] = None, ignore_index: int = 255,
                        backend: str = "auto") -> Tensor:
    """AReAM loss (the value of ``aream_loss``) whose q / k gradients are added in each layer's backward.

    Args:
        grads: the :class:`DeferredGrads` whose ``attach`` was the forward's ``qk_hook``.
        scale, num_prefix_tokens: the attention's softmax scale and C (``records.scale``,
            ``records.num_prefix_tokens``).
        patch_labels: (B, P) integer per-patch labels (see ``aream_loss``).
        layer_weights: None or one weight per attached layer, in attach (layer) order.
        backend: of the value computation ("auto": Triton on CUDA, torch otherwise); the gradients use the
            tiled torch kernel.

    Returns a 0-dim tensor (float32; float64 for float64 q, k). Backpropagating through it adds
    ``dTotal/dLoss · dLoss/dq_l`` (and k) to the gradients of the attached q_l, k_l.
    """
    from aream_fast.losses.aream import aream_loss

    if not isinstance(grads, DeferredGrads):
        raise ValueError(f"deferred_aream_loss needs the DeferredGrads whose attach was the forward's qk_hook, "
                         f"got {type(grads).__name__}")
    if scale is None or num_prefix_tokens is None:
        raise ValueError("scale and num_prefix_tokens are required (e.g. records.scale, records.num_prefix_tokens)")
    layers = grads.layers
    if not layers:
        raise ValueError("no supervised layer was attached in this forward")
    qs: List[Tensor] = [grads.qs[layer] for layer in layers]
    ks: List[Tensor] = [grads.ks[layer] for layer in layers]
    with torch.no_grad():  # validates every argument (shapes, dtypes, labels, weights, finiteness)
        value = aream_loss(qs, ks, patch_labels, scale=scale, num_prefix_tokens=num_prefix_tokens,
                           layer_weights=layer_weights, ignore_index=ignore_index, backend=backend)
    anchors = [grads.anchors[layer] for layer in layers if layer in grads.anchors]
    if not anchors:
        return value
    labels = patch_labels.to(torch.int64)
    weights = [1.0] * len(layers) if layer_weights is None else \
        torch.as_tensor(layer_weights, dtype=torch.float64).reshape(-1).tolist()
    per_layer = [float(w) / len(layers) for w in weights]
    grads._slot.config = _LossConfig(labels, dict(zip(layers, per_layer)), float(scale), int(num_prefix_tokens),
                                     int(ignore_index))
    return _AnchoredValue.apply(value, *anchors)
