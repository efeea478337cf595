"""What a ViT forward hands to AReAM, instead of any N x N attention matrix.

These small containers are the contract between the model (``aream_fast.models``), the loss
(``aream_fast.losses.aream``) and the CAM / pseudo-label code (``aream_fast.pseudo_labels.cam``). They are NamedTuples so that
``torch.compile`` traces them without graph breaks.

Shapes: B batch, H heads, N = C + P tokens (C prefix/class tokens, P = h * w patches), d head width,
K number of foreground classes.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from aream_fast.kernels import acc_dtype  # noqa: F401 - re-exported: the torch paths import it from here


class AttentionRequest(NamedTuple):
    """Which per-layer attention statistics a forward should export (layer indices are 0-based).

    supervised_layers: layers whose q, k are kept **with grad** for ``aream_loss`` (official: 7..11).
    refine_layers: layers whose q, k are kept **detached** for CAM refinement by attention-apply
        (official training pseudo labels: 0..6; inference CAMs: all 12).
    class_attention_layers: layers whose head-mean class->patch softmax rows are averaged into
        ``AttentionRecords.class_attention`` (official: all 12). Ignored by single-class-token models.
    """

    supervised_layers: Tuple[int, ...] = ()
    refine_layers: Tuple[int, ...] = ()
    class_attention_layers: Tuple[int, ...] = ()


#: ``qk_hook(layer, q, k) -> (q, k)``: what a model's ``forward(images, request, qk_hook)`` applies to each
#: supervised layer's q, k (B, H, N, d) before its attention consumes them. The caller owns it (the model never
#: imports a loss): ``aream_fast.losses.deferred.DeferredGrads.attach`` adds each layer's affinity-loss gradient
#: inside that layer's backward.
QKHook = Callable[[int, Tensor, Tensor], Tuple[Tensor, Tensor]]


class AttentionRecords(NamedTuple):
    """Per-layer O(N d) attention statistics of one forward.

    qs, ks: layer -> (B, H, N, d) query / key tensors (pre-scale). With grad for supervised layers,
        detached for refine-only layers. A layer in both keeps the grad version.
    class_attention: (B, C, P) mean over ``class_attention_layers`` and heads of
        softmax(scale * q k^T)[:, :, :C, C:], no grad; None if not requested or C == 1.
    num_prefix_tokens: C.
    scale: the softmax scale (d ** -0.5).
    grid: (h, w) patch grid, P = h * w, patches in row-major order.
    """

    qs: Dict[int, Tensor]
    ks: Dict[int, Tensor]
    class_attention: Optional[Tensor]
    num_prefix_tokens: int
    scale: float
    grid: Tuple[int, int]


class ViTOutput(NamedTuple):
    """class_logits (B, K); patch_logits (B, K); cam (B, K, h, w) detached; records or None."""

    class_logits: Tensor
    patch_logits: Tensor
    cam: Tensor
    records: Optional[AttentionRecords] = None


OFFICIAL_DEPTH = 12
OFFICIAL_LAYER_INDEX = 7  # official MCTformer path: layers 0..6 refine, 7..11 get the affinity loss


class LayerSplit(NamedTuple):
    """Which blocks do what, for a model of ``depth`` blocks split at ``layer_index`` (official 7 of 12).

    Layers ``0 .. layer_index-1`` refine the CAMs (``refine_layers``); layers ``layer_index .. depth-1`` get the
    affinity loss (``supervised_layers``). ``loss_weights`` (one per supervised layer, e_l) and
    ``refine_weights`` (one per refine layer, 1 - e_l) are the entropy 'E' weights, None for uniform 'U'
    (``aream_fast.analysis.entropy.entropy_to_layer_weights`` makes them).
    """

    depth: int
    layer_index: int
    loss_weights: Optional[Tuple[float, ...]] = None
    refine_weights: Optional[Tuple[float, ...]] = None

    @classmethod
    def from_depth(cls, depth: int, layer_index: Optional[int] = None, *,
                   loss_weights: Optional[Sequence[float]] = None,
                   refine_weights: Optional[Sequence[float]] = None) -> "LayerSplit":
        """The split of a ``depth``-block model. ``layer_index`` None: ``round(depth * 7 / 12)``, the official
        7-of-12 fraction. ``ValueError`` unless 1 <= layer_index <= depth - 1 and the weights fit."""
        depth = int(depth)
        if layer_index is None:
            layer_index = int(math.floor(depth * OFFICIAL_LAYER_INDEX / OFFICIAL_DEPTH + 0.5))
        if not 1 <= layer_index <= depth - 1:
            raise ValueError(f"layer_index must be in [1, depth - 1] = [1, {depth - 1}], got {layer_index}")
        lw = None if loss_weights is None else tuple(float(w) for w in loss_weights)
        rw = None if refine_weights is None else tuple(float(w) for w in refine_weights)
        if lw is not None and len(lw) != depth - layer_index:
            raise ValueError(f"loss_weights must have one value per supervised layer ({depth - layer_index}), "
                             f"got {len(lw)}")
        if rw is not None and len(rw) != layer_index:
            raise ValueError(f"refine_weights must have one value per refine layer ({layer_index}), got {len(rw)}")
        return cls(depth, int(layer_index), lw, rw)

    @property
    def supervised_layers(self) -> Tuple[int, ...]:
        return tuple(range(self.layer_index, self.depth))

    @property
    def refine_layers(self) -> Tuple[int, ...]:
        return tuple(range(self.layer_index))

    @property
    def all_layers(self) -> Tuple[int, ...]:
        return tuple(range(self.depth))


def refuse_double_backward(what: str) -> None:
    """Call at the top of an AReAM loss backward: a backward with ``create_graph=True`` (double backward, e.g.
    a gradient penalty) raises instead of silently returning first-order gradients whose own gradient is
    zero (the loss's gradients are computed in closed form, not by differentiable ops). Under torch.compile
    the traced backward is never a double backward, so nothing is checked there."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{what}: double backward (create_graph=True) is not supported: its q / k gradients "
                           f"are computed in closed form and have no gradient themselves; use "
                           f"aream_fast.official.loss.aream_loss_reference on materialised logits for "
                           f"higher-order gradients")


def check_int_tensor(x: object, name: str, dims: str) -> None:
    """Raise a one-line ``ValueError`` unless ``x`` is an integer (not bool) tensor with one axis per letter of
    ``dims`` (e.g. ``"B, P"``): the check every label argument (patch labels, pixel labels) goes through."""
    ndim = len(dims.split(","))
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a ({dims}) int64 tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape ({dims}), got {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer (int64) tensor, got dtype {x.dtype}")


def as_layer_list(xs: Union[Tensor, Sequence[Tensor]], name: str, *, allow_single: bool = False) -> Tuple[Tensor, ...]:
    """A per-layer argument as a tuple of (B, H, N, d) tensors.

    Accepts a stacked (L, B, H, N, d) tensor or a list/tuple of tensors (and, with ``allow_single``, one
    (B, H, N, d) tensor). Only the container is checked here; the caller checks shapes. ``ValueError`` naming
    ``name`` otherwise (an empty sequence is returned empty, for the caller's own message).
    """
    if isinstance(xs, Tensor):
        if xs.dim() == 5:
            return tuple(xs.unbind(0))
        if xs.dim() == 4 and allow_single:
            return (xs,)
        raise ValueError(f"{name} must be a stacked (L, B, H, N, d) tensor or a sequence of (B, H, N, d) "
                         f"tensors, got a tensor of shape {tuple(xs.shape)}")
    if isinstance(xs, Mapping) or not isinstance(xs, (list, tuple)):
        raise ValueError(f"{name} must be a stacked (L, B, H, N, d) tensor or a list/tuple of (B, H, N, d) "
                         f"tensors, got {type(xs).__name__}")
    for i, t in enumerate(xs):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}[{i}] must be a torch.Tensor of shape (B, H, N, d), got {type(t).__name__}")
    return tuple(xs)
