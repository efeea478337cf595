"""Drop-in AReAM for any timm ``VisionTransformer``: patch its attention to SDPA and record q, k.

In the spirit of Liger-Kernel's ``apply_liger_kernel_to_<model>()`` monkey patchers. Usage::

    recorder = apply_aream_to_timm(model, supervised_layers=range(7, 12))
    logits = model(images)                                   # records q, k of layers 7..11 (with grad)
    loss = criterion(logits, labels) + 0.1 * recorder.loss(patch_labels)   # patch_labels (B, P)

The patched ``Attention.forward`` computes exactly what timm's fused path computes (qkv projection, optional
q/k norm, ``F.scaled_dot_product_attention`` with the module's scale, optional gate, norm, projection), so the
model output is unchanged; it only keeps a reference to q and k of the supervised layers. SDPA never
materialises the N x N attention on the flash path and the loss needs only q and k (docs/semantics.md, "Fast path"), so
nothing
N x N is kept for AReAM.

``apply_aream_to_timm(model, layers, defer_loss_grad=True)`` (eager only) passes the supervised q, k through
the identity nodes of ``aream_fast.losses.deferred``: ``recorder.loss`` then returns the same loss, whose q / k
gradients are made inside each supervised block's backward instead of being held from the loss forward to the
backward (lower peak memory, one extra q kᵀ matmul per layer).
"""
from __future__ import annotations

import types
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["apply_aream_to_timm", "AReAMRecorder"]


def _attention_forward(self: nn.Module, x: Tensor, attn_mask=None, is_causal: bool = False) -> Tensor:
    """timm 1.0 ``Attention.forward`` (fused path), recording q, k when ``self._aream_recorder`` is set.

    x: (B, N, dim) -> (B, N, dim_out). Recorded q, k: (B, H, N, d), pre-scale, with grad.
    """
    batch, tokens, _ = x.shape
    gate = getattr(self, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    recorder = self._aream_recorder
    if recorder is not None:
        q, k = recorder._record(self._aream_layer, q, k)
    x = F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=attn_mask,
        dropout_p=self.attn_drop.p if self.training else 0.0,
        is_causal=is_causal,
        scale=self.scale,
    )
    x = x.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
    x = self.norm(x) if hasattr(self, "norm") else x
    if gate is not None:
        x = x * gate
    x = self.proj(x)
    x = self.proj_drop(x)
    return x


class AReAMRecorder:
    """Holds the q, k recorded by a patched timm ViT and computes the AReAM loss from them.

    Attributes:
        supervised_layers: the recorded block indices (0-based), in loss order.
        num_prefix_tokens: the model's C (class + register tokens).
        scale: the attention scale of the supervised blocks (head_dim ** -0.5).
    """

    def __init__(self, model: nn.Module, supervised_layers: List[int], defer_loss_grad: bool = False) -> None:
        self.model = model
        self.supervised_layers = tuple(supervised_layers)
        self.defer_loss_grad = bool(defer_loss_grad)
        self._grads = None  # DeferredGrads of the last forward (defer_loss_grad)
        self._with_grad = False  # the records come from a grad-enabled forward
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self._q: Dict[int, Tensor] = {}
        self._k: Dict[int, Tensor] = {}
        self._patched: List[nn.Module] = []
        scales = {float(model.blocks[i].attn.scale) for i in self.supervised_layers}
        if len(scales) != 1:
            raise ValueError(f"supervised_layers have different attention scales {sorted(scales)}")
        self.scale = scales.pop()

    def _record(self, layer: int, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        """Keep q, k of a supervised block; returns the q, k the block's attention must use.

        A forward without autograd (``torch.no_grad()``: pseudo labels, evaluation) does not replace the records
        of a grad-enabled forward, so ``loss()`` after it still differentiates into the training forward."""
        with_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if not with_grad and self._with_grad:
            return q, k
        self._with_grad = with_grad
        self._q[layer] = q
        self._k[layer] = k
        if not self.defer_loss_grad:
            return q, k
        if self._grads is None or layer == min(self.supervised_layers):  # a new forward starts
            from aream_fast.losses.deferred import DeferredGrads

            self._grads = DeferredGrads()
        return self._grads.attach(layer, q, k)

    def _recorded(self, store: Dict[int, Tensor], name: str) -> List[Tensor]:
        missing = [i for i in self.supervised_layers if i not in store]
        if missing:
            raise RuntimeError(
                f"no {name} recorded for supervised layers {missing}: run the model forward after "
                f"apply_aream_to_timm (and after clear()) before asking for {name} or the loss"
            )
        return [store[i] for i in self.supervised_layers]

    @property
    def qs(self) -> List[Tensor]:
        """Recorded queries of the last (grad-enabled) forward, one (B, H, N, d) tensor per supervised layer."""
        return self._recorded(self._q, "qs")

    @property
    def ks(self) -> List[Tensor]:
        """Recorded keys of the last (grad-enabled) forward, one (B, H, N, d) tensor per supervised layer."""
        return self._recorded(self._k, "ks")

    def clear(self) -> None:
        """Drop the recorded tensors (and the autograd graph they keep alive)."""
        self._q.clear()
        self._k.clear()
        self._grads = None
        self._with_grad = False

    def loss(self, patch_labels: Tensor, **kwargs) -> Tensor:
        """``aream_loss(self.qs, self.ks, patch_labels, scale=model scale, num_prefix_tokens=model C, **kwargs)``.

        patch_labels: (B, P) int64, P = number of patches of the last forward. kwargs: ``layer_weights``,
        ``ignore_index``, ``backend``. Returns the 0-dim loss, differentiable into the model's qkv weights
        (with ``defer_loss_grad``: ``deferred_aream_loss``, the same value and gradients).
        """
        from aream_fast.losses.aream import aream_loss

        if (torch.is_grad_enabled() and not self._with_grad and self._q
                and any(p.requires_grad for p in self.model.parameters())):
            raise RuntimeError("the recorded q, k come from a forward without autograd (torch.no_grad() or "
                               "inference_mode), so the AReAM loss would have no gradient: run the training "
                               "forward with grad enabled before recorder.loss() (a no-grad forward after it is "
                               "fine: it keeps the training forward's records)")
        if self.defer_loss_grad:
            from aream_fast.losses.deferred import deferred_aream_loss

            self._recorded(self._q, "qs")  # same error as the plain path when nothing was recorded
            return deferred_aream_loss(self._grads, patch_labels, scale=self.scale,
                                       num_prefix_tokens=self.num_prefix_tokens, **kwargs)
        return aream_loss(
            self.qs, self.ks, patch_labels, scale=self.scale, num_prefix_tokens=self.num_prefix_tokens, **kwargs
        )

    def remove(self) -> None:
        """Undo the patch: restore every attention block's own forward and drop the records."""
        for attn in self._patched:
            if "forward" in attn.__dict__:
                del attn.forward
            del attn._aream_recorder
            del attn._aream_layer
        self._patched = []
        self.clear()

    def __enter__(self) -> "AReAMRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_aream_to_timm(model: nn.Module, supervised_layers: Iterable[int],
                        defer_loss_grad: bool = False) -> AReAMRecorder:
    """Patch a timm ``VisionTransformer`` in place for AReAM and return its recorder.

    Every block's ``attn`` (a ``timm.layers.Attention``) is switched to an SDPA forward with the same output;
    blocks in ``supervised_layers`` also record their q, k (B, H, N, d) on each forward (the last
    grad-enabled forward wins: a ``torch.no_grad()`` forward in between does not replace its records). Undo with ``recorder.remove()``.

    Args:
        model: a ``timm.models.VisionTransformer`` (any size, class / register tokens allowed).
        supervised_layers: 0-based block indices whose attention the AReAM loss supervises (official: the
            5 deepest of 12, ``range(7, 12)``).
        defer_loss_grad: make each supervised layer's loss gradient inside that block's backward
            (``aream_fast.losses.deferred``; lower peak memory; eager only, not under ``torch.compile``).

    Raises:
        ValueError: ``model`` is not a timm VisionTransformer with ``timm.layers.Attention`` blocks, the layer
            list is empty, has duplicates or indices outside [0, depth), or the model is already patched.
    """
    import timm
    from timm.layers import Attention

    if not isinstance(model, timm.models.VisionTransformer):
        raise ValueError(f"model must be a timm.models.VisionTransformer, got {type(model).__name__}")
    depth = len(model.blocks)
    try:
        layers = [int(i) for i in supervised_layers]
    except TypeError as err:
        raise ValueError(f"supervised_layers must be an iterable of ints, got {supervised_layers!r}") from err
    if not layers:
        raise ValueError("supervised_layers must name at least one block, got an empty list")
    if len(set(layers)) != len(layers) or any(i < 0 or i >= depth for i in layers):
        raise ValueError(f"supervised_layers must be distinct block indices in [0, {depth}), got {layers}")
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, Attention):
            raise ValueError(
                f"model.blocks[{i}].attn must be a timm.layers.Attention, got {type(attn).__name__}"
            )
        if hasattr(attn, "_aream_recorder"):
            raise ValueError(f"model.blocks[{i}].attn is already patched; call recorder.remove() first")

    recorder = AReAMRecorder(model, layers, defer_loss_grad=defer_loss_grad)
    chosen = set(layers)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        attn._aream_recorder = recorder if i in chosen else None
        attn._aream_layer = i
        attn.forward = types.MethodType(_attention_forward, attn)
        recorder._patched.append(attn)
    return recorder
