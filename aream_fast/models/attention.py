"""Fused multi-head self-attention that exports O(N d) statistics instead of N x N attention.

docs/semantics.md, "Fast path", items 5 and 6:

* the model's blocks run a fused attention (``F.scaled_dot_product_attention`` on CPU; SDPA, xformers or
  our Triton flash kernel on CUDA) and hand their q, k to the caller; no (B, H, N, N) tensor is kept;
* the head-mean class->patch attention rows of MCTformer's C class tokens are computed from the C query
  rows only: softmax over a (B, H, C, N) block, which is small;
* CAM refinement by attention is in ``aream_fast.pseudo_labels.refine`` (``attention_apply``).

Shapes: B batch, H heads, N = C + P tokens (C prefix/class tokens first, then P patches row-major),
d head width, K value channels (classes). q, k, v layout (B, H, N, d), as SDPA takes them.

Backends (``backend`` argument): "sdpa" (default, everywhere), "auto" (= "sdpa"), "triton" (our flash kernel
``aream_fast.kernels.flash_attention``, CUDA tensors only) and "xformers" (CUDA tensors only). Triton and
xformers are imported lazily, only when a CUDA tensor reaches them, so importing this module (and running
on CPU) never imports triton (CPU tensors never reach a ``triton_op``; docs/semantics.md, "Fast path").
"""
from __future__ import annotations

import importlib
from typing import Callable, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aream_fast.models.records import acc_dtype

ATTENTION_BACKENDS = ("auto", "sdpa", "triton", "xformers")


def check_backend(backend: str) -> str:
    """Validate an attention backend name and return it."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    return backend


def _triton_flash_attention():
    # Lazy: importing triton (and its interpreter switch) must not happen at module import time.
    return importlib.import_module("aream_fast.kernels.flash_attention").flash_attention


def fused_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, num_prefix_tokens: int = 0,
                    backend: str = "sdpa") -> Tensor:
    """softmax(scale * q k^T) v without keeping the N x N matrix.

    q, k, v: (B, H, N, d). Returns (B, H, N, d). ``backend`` "triton" / "xformers" apply to CUDA tensors
    only; on CPU every backend runs SDPA.
    """
    if q.is_cuda and backend == "triton":
        return _triton_flash_attention()(q, k, v, scale=scale, num_prefix_tokens=num_prefix_tokens)
    if q.is_cuda and backend == "xformers":
        xops = importlib.import_module("xformers.ops")
        # xformers takes (B, N, H, d)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def class_patch_attention(q: Tensor, k: Tensor, num_prefix_tokens: int, scale: float) -> Tensor:
    """Head-mean softmax rows of the class tokens, restricted to the patch columns.

    Equals ``mean_h softmax(scale * q k^T)[:, :, :C, C:]`` of the official code (docs/semantics.md, "CAM refinement"),
    computed
    from the C class rows only: a (B, H, C, N) block, never N x N.

    q, k: (B, H, N, d). Returns (B, C, P) float32 where P = N - C.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, H, N, d) with equal shapes, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    c = int(num_prefix_tokens)
    if not 0 < c < q.shape[2]:
        raise ValueError(f"num_prefix_tokens must be in [1, N) with N={q.shape[2]}, got {num_prefix_tokens}")
    dtype = acc_dtype(q.dtype)
    logits = torch.matmul(q[:, :, :c].to(dtype) * scale, k.to(dtype).transpose(-2, -1))  # (B, H, C, N)
    return logits.softmax(dim=-1)[..., c:].mean(dim=1)


class Attention(nn.Module):
    """timm-compatible attention (parameter names ``qkv``, ``proj``) running a fused kernel.

    forward(x (B, N, D), num_prefix_tokens, class_attention: bool, qk_hook=None) -> (out (B, N, D), q, k
    (B, H, N, d), class_attn (B, C, P) or None). q and k are the pre-scale projections as SDPA takes them;
    keeping them costs O(N d) (they are views of the qkv projection, which autograd saves anyway).
    ``qk_hook(q, k) -> (q, k)`` replaces q, k before the attention uses them (``DeferredGrads.attach``).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = check_backend(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x (B, N, D) -> q, k, v each (B, H, N, d)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def forward(self, x: Tensor, num_prefix_tokens: int = 0, class_attention: bool = False,
                qk_hook: Optional[Callable] = None) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        b, n, dim = x.shape
        q, k, v = self.qkv_heads(x)
        if qk_hook is not None:
            q, k = qk_hook(q, k)
        backend = "sdpa" if self.backend == "auto" else self.backend
        cls_attn = None
        if q.is_cuda and backend == "triton" and class_attention:
            # the flash kernel writes the head-mean class rows from its LSE (docs/semantics.md, "Fast path", item 6)
            o, _, cls_attn = _triton_flash_attention()(q, k, v, scale=self.scale, num_prefix_tokens=num_prefix_tokens,
                                                       return_class_attention=True)
        else:
            o = fused_attention(q, k, v, scale=self.scale, num_prefix_tokens=num_prefix_tokens, backend=backend)
        out = self.proj(o.transpose(1, 2).reshape(b, n, dim))
        if class_attention and cls_attn is None:
            with torch.no_grad():
                cls_attn = class_patch_attention(q.detach(), k.detach(), num_prefix_tokens, self.scale)
        return out, q, k, cls_attn
