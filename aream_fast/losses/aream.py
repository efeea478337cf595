"""Public AReAM affinity loss from per-layer q, k: no N x N attention matrix (docs/semantics.md, "Fast path").

The official loss (Jessie459/AReAM, docs/semantics.md, "Affinity loss") applies a sigmoid to the head mean of the
pre-softmax
attention logits of each supervised layer, on the patch-patch block, and penalises it linearly against the
pair label of the per-patch pseudo labels (1 same, 0 different, ignored if either side is ignored), with
batch-global counts. ``aream_fast.official.loss.aream_loss_reference`` is that formulation on materialised
logits; this module computes the same value and gradients from q and k only.

Backends:
    "torch"  -- tiled PyTorch (``aream_fast.losses.tiled``), any device; works under torch.compile(fullgraph=True).
    "triton" -- fused Triton kernel (``aream_fast.kernels.aream_loss``), CUDA tensors; CPU tensors only with
                TRITON_INTERPRET=1 (slow, for tests).
    "auto"   -- "triton" for CUDA tensors, "torch" otherwise.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from aream_fast.kernels import interpreting
from aream_fast.models.records import as_layer_list, check_int_tensor, refuse_double_backward

from aream_fast.losses.tiled import aream_loss_tiled

__all__ = ["aream_loss", "AReAMLoss"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = ("auto", "torch", "triton")

TensorOrSeq = Union[Tensor, Sequence[Tensor]]


def _check_finite(t: Tensor, name: str) -> None:
    # Fast path: one reduction pass without temporaries; a non-finite sum (NaN, inf, or an overflow of huge
    # finite values) triggers the exact elementwise check.
    if bool(torch.isfinite(t.sum())):  # (a dtype= argument would make a converted copy of t)
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} (shape {tuple(t.shape)}) contains NaN or infinite values")


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the 0-dim loss whose backward refuses ``create_graph=True`` (both backends compute the q / k
    gradients in closed form, so a double backward would silently see zero second-order terms)."""

    @staticmethod
    def forward(ctx, loss: Tensor) -> Tensor:
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        refuse_double_backward("aream_loss")
        return grad


def _first_order_only(loss: Tensor) -> Tensor:
    # eager only: torch.compile traces the op's registered autograd, and never runs a double backward
    if loss.requires_grad and not torch.compiler.is_compiling():
        return _FirstOrderOnly.apply(loss)
    return loss


def _validate(
    qs: TensorOrSeq,
    ks: TensorOrSeq,
    patch_labels: Tensor,
    scale: float,
    num_prefix_tokens: int,
    layer_weights: Optional[Union[Sequence[float], Tensor]],
    ignore_index: int,
    backend: str,
) -> Tuple[List[Tensor], List[Tensor], Tensor, Tensor]:
    """Check every argument; return (qs list, ks list, int64 labels, (L,) weights tensor)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    q_list = list(as_layer_list(qs, "qs"))
    k_list = list(as_layer_list(ks, "ks"))
    if len(q_list) == 0:
        raise ValueError("qs must hold at least one supervised layer, got an empty sequence")
    if len(q_list) != len(k_list):
        raise ValueError(f"qs and ks must have the same number of layers, got {len(q_list)} and {len(k_list)}")
    ref = q_list[0]
    if ref.dim() != 4:
        raise ValueError(f"qs[0] must have shape (B, H, N, d), got {tuple(ref.shape)}")
    if ref.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"qs[0] must be float16, bfloat16, float32 or float64, got dtype {ref.dtype}")
    for name, seq in (("qs", q_list), ("ks", k_list)):
        for i, t in enumerate(seq):
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(t.shape)}, expected {tuple(ref.shape)} (the shape of qs[0]); "
                    f"all q and k must be (B, H, N, d) with the same B, H, N, d"
                )
            if t.dtype != ref.dtype:
                raise ValueError(f"{name}[{i}] has dtype {t.dtype}, expected {ref.dtype} (the dtype of qs[0])")
            if t.device != ref.device:
                raise ValueError(f"{name}[{i}] is on {t.device}, expected {ref.device} (the device of qs[0])")
    batch, heads, tokens, head_dim = ref.shape
    if batch == 0 or heads == 0 or head_dim == 0:
        raise ValueError(f"qs[0] has an empty dimension: shape {tuple(ref.shape)}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    # numbers.Real: Python and NumPy scalars (np.float32 is not a float subclass); bool and tensors are refused.
    if (isinstance(scale, (Tensor, bool)) or not isinstance(scale, numbers.Real) or not (scale > 0)
            or scale == float("inf")):
        raise ValueError(f"scale must be a positive finite float (d ** -0.5), got {scale!r}")

    check_int_tensor(patch_labels, "patch_labels", "B, P")
    if patch_labels.device != ref.device:
        raise ValueError(f"patch_labels is on {patch_labels.device}, expected {ref.device} (the device of qs)")
    num_patches = tokens - num_prefix_tokens
    if patch_labels.shape[0] != batch or patch_labels.shape[1] != num_patches or num_patches <= 0:
        raise ValueError(
            f"patch_labels must have shape (B, P) = ({batch}, {num_patches}) for q, k of shape "
            f"{tuple(ref.shape)} with num_prefix_tokens={num_prefix_tokens} (P = N - num_prefix_tokens), "
            f"got {tuple(patch_labels.shape)}"
        )

    num_layers = len(q_list)
    if layer_weights is None:
        weights = torch.ones(num_layers, dtype=torch.float64)
    else:
        if isinstance(layer_weights, Tensor):
            weights = layer_weights.detach().reshape(-1)
            if layer_weights.dim() > 1:
                raise ValueError(f"layer_weights must have shape (L,), got {tuple(layer_weights.shape)}")
        else:
            try:
                weights = torch.tensor([float(w) for w in layer_weights], dtype=torch.float64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"layer_weights must be None or a sequence of floats, got {layer_weights!r}") from err
        if weights.numel() != num_layers:
            raise ValueError(
                f"layer_weights must have one weight per supervised layer: expected length {num_layers}, "
                f"got length {weights.numel()}"
            )
        if weights.dtype.is_complex or weights.dtype == torch.bool:
            raise ValueError(f"layer_weights must be real numbers, got dtype {weights.dtype}")

    labels = patch_labels.to(torch.int64)
    if not torch.compiler.is_compiling():
        # Data-dependent checks (they synchronise on CUDA and cannot be traced).
        bad = (labels < 0) & (labels != ignore_index)
        if bool(bad.any()):
            raise ValueError(
                f"patch_labels (shape {tuple(patch_labels.shape)}) must hold values >= 0 or "
                f"ignore_index={ignore_index}, got min {int(labels.min())}"
            )
        if not bool(torch.isfinite(weights.double()).all()):
            raise ValueError(f"layer_weights must be finite, got {weights.tolist()}")
        for name, seq in (("qs", q_list), ("ks", k_list)):
            for i, t in enumerate(seq):
                _check_finite(t.detach(), f"{name}[{i}]")
    return q_list, k_list, labels, weights


def aream_loss(
    qs: TensorOrSeq,
    ks: TensorOrSeq,
    patch_labels: Tensor,
    *,
    scale: float,
    num_prefix_tokens: int = 0,
    layer_weights: Optional[Union[Sequence[float], Tensor]] = None,
    ignore_index: int = 255,
    backend: str = "auto",
) -> Tensor:
    """AReAM affinity loss (official semantics, docs/semantics.md, "Affinity loss") from the q, k of the supervised
    layers.

    Args:
        qs, ks: per supervised layer, the pre-scale queries / keys as SDPA takes them: a sequence of L
            (B, H, N, d) tensors or one stacked (L, B, H, N, d) tensor. float16 / bfloat16 / float32 / float64.
        patch_labels: (B, P) integer per-patch labels, P = N - num_prefix_tokens, values >= 0 (0 background,
            k + 1 class k) or ``ignore_index``. See ``aream_fast.pseudo_labels.patch_labels.seg_to_patch_labels``.
        scale: the attention scale of the model (d ** -0.5): logits are ``scale * q k^T``.
        num_prefix_tokens: C, class / prefix tokens in front of the patches (excluded from the loss).
        layer_weights: None (uniform, official 'U') or L weights (official 'E', entropy); multiplied in,
            not renormalised (the sum is still divided by L), and treated as constants.
        ignore_index: label of ignored patches.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch" or "triton".

    Returns:
        0-dim tensor (float32; float64 for float64 inputs) equal to
        ``aream_loss_reference([scale * q @ k^T per layer], patch_labels, ...)``, differentiable in qs and ks.
        If every label is ignored the loss is exactly 0 with zero gradients.

    Raises:
        ValueError: on mismatched shapes / dtypes / devices, P != N - num_prefix_tokens, an empty layer list,
            a wrong number of layer weights, out-of-range labels or non-finite values (the last two checks are
            skipped while torch.compile traces).
    """
    q_list, k_list, labels, weights = _validate(
        qs, ks, patch_labels, scale, num_prefix_tokens, layer_weights, ignore_index, backend
    )
    device = q_list[0].device
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got tensors on {device}); on CPU it runs only under "
                f"the Triton interpreter (environment variable TRITON_INTERPRET=1, set before triton is "
                f"imported). Use backend='torch' or 'auto' instead."
            )
        from aream_fast.kernels.aream_loss import aream_loss_triton  # lazy: Triton is optional on CPU

        # The kernel takes stacked (L, B, H, N, d) tensors; a list is stacked (one copy).
        q = qs if isinstance(qs, Tensor) else torch.stack(q_list)
        k = ks if isinstance(ks, Tensor) else torch.stack(k_list)
        w = None if layer_weights is None else weights.to(device=device, dtype=torch.float32)
        return _first_order_only(aream_loss_triton(
            q, k, labels, scale=float(scale), num_prefix_tokens=num_prefix_tokens, layer_weights=w,
            ignore_index=ignore_index,
        ))
    return _first_order_only(aream_loss_tiled(
        q_list, k_list, labels, scale=float(scale), num_prefix_tokens=num_prefix_tokens,
        layer_weights=weights, ignore_index=ignore_index,
    ))


class AReAMLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`aream_loss` with fixed hyper-parameters.

    Args:
        scale: attention scale (d ** -0.5).
        num_prefix_tokens: C.
        layer_weights: None or L weights (not renormalised).
        ignore_index: label of ignored patches.
        backend: "auto", "torch" or "triton".

    forward(qs, ks, patch_labels) -> 0-dim loss; qs, ks: L x (B, H, N, d) or (L, B, H, N, d);
    patch_labels: (B, P).
    """

    def __init__(
        self,
        *,
        scale: float,
        num_prefix_tokens: int = 0,
        layer_weights: Optional[Union[Sequence[float], Tensor]] = None,
        ignore_index: int = 255,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.scale = scale
        self.num_prefix_tokens = num_prefix_tokens
        self.layer_weights = layer_weights
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, qs: TensorOrSeq, ks: TensorOrSeq, patch_labels: Tensor) -> Tensor:
        return aream_loss(
            qs, ks, patch_labels, scale=self.scale, num_prefix_tokens=self.num_prefix_tokens,
            layer_weights=self.layer_weights, ignore_index=self.ignore_index, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, num_prefix_tokens={self.num_prefix_tokens}, "
            f"layer_weights={self.layer_weights}, ignore_index={self.ignore_index}, backend={self.backend!r}"
        )
