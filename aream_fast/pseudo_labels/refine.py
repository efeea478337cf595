"""CAM refinement by the shallow layers' attention, without any N x N matrix.

``R @ cam`` with R = mean over layers and heads of softmax(scale q k^T)[C:, C:] is attention with a custom value
matrix V = [0 (C rows); cam (P rows)] (docs/semantics.md, "CAM refinement"), so it runs as SDPA over the saved
q, k of each layer.

Shapes: B batch, H heads, N = C + P tokens (C prefix/class tokens first, then P patches row-major),
d head width, K value channels (classes).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from aream_fast.models.records import acc_dtype, as_layer_list


def attention_apply(qs: Union[Tensor, Sequence[Tensor]], ks: Union[Tensor, Sequence[Tensor]], values: Tensor, *,
                    num_prefix_tokens: int, scale: float,
                    layer_weights: Optional[Union[Tensor, Sequence[float]]] = None) -> Tensor:
    """Apply the patch block of the head-mean softmax attention, averaged over layers, to ``values``.

    out[b, :, m] = (1/L) sum_l w_l * mean_h sum_n softmax(scale q_lh k_lh^T)[b, C+m, C+n] * values[b, :, n]

    This is the official refinement ``cam' = R cam`` (docs/semantics.md, "CAM refinement"): R = mean over layers of
    Ā_l[C:, C:] ('U', w = 1) or (1/L) sum_l (1 - e_l) Ā_l[C:, C:] ('E', pass w_l = 1 - e_l): the weights are
    not renormalised, the sum is divided by the number of layers. It runs as SDPA with the P patch queries,
    all N keys and V = [0 (C rows); values^T (P rows)], so softmax keeps the class columns in its
    denominator and drops them from the product. V's width is padded (or split into chunks) to the head
    width d: with any other width SDPA on CPU silently falls back to its N x N math path
    (docs/semantics.md, "Fast path", item 5).

    qs, ks: sequence over L layers of (B, H, N, d), or one stacked (L, B, H, N, d) tensor.
    values: (B, K, P). layer_weights: None or L floats / (L,) tensor.
    Returns (B, K, P) in float32 (or the dtype of ``values`` if that is float64).
    """
    qs = as_layer_list(qs, "qs", allow_single=True)
    ks = as_layer_list(ks, "ks", allow_single=True)
    if len(qs) != len(ks):
        raise ValueError(f"qs and ks must hold the same number of layers, got {len(qs)} and {len(ks)}")
    if not qs:
        raise ValueError("qs must hold at least one layer, got an empty sequence")
    q0 = qs[0]
    for name, layer_list in (("qs", qs), ("ks", ks)):
        for x in layer_list:
            if x.dim() != 4 or x.shape != q0.shape:
                raise ValueError(f"every tensor of {name} must be (B, H, N, d) = {tuple(q0.shape)}, "
                                 f"got {tuple(x.shape)}")
    b, h, n, d = q0.shape
    c = int(num_prefix_tokens)
    p = n - c
    if c < 0 or p <= 0:
        raise ValueError(f"num_prefix_tokens must be in [0, N) with N={n}, got {num_prefix_tokens}")
    if values.dim() != 3 or values.shape[0] != b or values.shape[2] != p:
        raise ValueError(f"values must be (B, K, P) = ({b}, K, {p}), got {tuple(values.shape)}")
    n_layers = len(qs)
    if layer_weights is None:
        weights = [1.0] * n_layers
    else:
        weights = [float(w) for w in (layer_weights.tolist() if isinstance(layer_weights, Tensor)
                                      else layer_weights)]
        if len(weights) != n_layers:
            raise ValueError(f"layer_weights must have one weight per layer ({n_layers}), got {len(weights)}")

    dtype = torch.float64 if values.dtype == torch.float64 else q0.dtype
    kk = values.shape[1]
    n_chunks = -(-kk // d)
    # V = [0 (C rows); values^T (P rows)], channels padded to n_chunks * d; chunks stacked into the batch.
    v = values.detach().to(dtype).new_zeros(b, n, n_chunks * d)
    v[:, c:, :kk] = values.detach().to(dtype).transpose(1, 2)
    v = v.view(b, n, n_chunks, d).permute(2, 0, 1, 3).reshape(n_chunks * b, 1, n, d).expand(-1, h, -1, -1)
    acc_dt = acc_dtype(dtype)
    acc = None
    for q, k, w in zip(qs, ks, weights):
        if w == 0.0:
            continue
        qp = q[:, :, c:].detach().to(dtype)
        kf = k.detach().to(dtype)
        if n_chunks > 1:
            qp = qp.repeat(n_chunks, 1, 1, 1)
            kf = kf.repeat(n_chunks, 1, 1, 1)
        out = F.scaled_dot_product_attention(qp, kf, v, scale=scale)  # (n_chunks*B, H, P, d)
        term = out.to(acc_dt).mean(dim=1)  # accumulate in fp32 even when q, k are fp16 / bf16 (AMP)
        if w != 1.0:
            term = term * w
        acc = term if acc is None else acc + term
    if acc is None:
        return values.new_zeros(b, kk, p, dtype=acc_dt)
    acc = acc / n_layers  # (n_chunks*B, P, d)
    acc = acc.view(n_chunks, b, p, d).permute(1, 2, 0, 3).reshape(b, p, n_chunks * d)[:, :, :kk]
    return acc.transpose(1, 2).contiguous()
