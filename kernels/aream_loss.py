"""Fused AReAM affinity loss in Triton: forward and backward without any P x P matrix.

Layout follows Liger-Kernel (kernels + launchers + autograd registration in one file).

Math (official AReAM, Jessie459/AReAM ``main_voc_mctformer.py`` / ``losses.py``; spec §2, DESIGN "The one
idea"). For every supervised layer l, image b, patches i, j (token index C + i, C = num_prefix_tokens)::

    S_ij   = sigmoid((scale / H) * sum_h q_h[C+i] . k_h[C+j])            head-mean logits, then sigmoid
    coef_ij = -a  if y_i == y_j (both valid),  +b if y_i != y_j (both valid),  0 if either is ignore_index
    a = 0.5 / n_pos,  b = 0.5 / n_neg                                   batch-global counts with the +1
    n_pos = sum_b sum_c m_bc^2 + 1,  n_neg = sum_b V_b^2 - (n_pos - 1) + 1
    L_l   = a * (n_pos - 1) + sum_{b,i,j} coef_ij * S_ij                 = 0.5 * mean_Pos(1-S) + 0.5 * mean_Neg(S)
    loss  = mean_l (w_l * L_l)

Gradient of the head-mean logit ij: G_ij = coef_ij * S_ij (1 - S_ij) * dloss/dL_l, and
``dq_h[C+i] = (scale/H) sum_j G_ij k_h[C+j]``, ``dk_h[C+j] = (scale/H) sum_i G_ij q_h[C+i]``; prefix rows get 0.

Kernels:
- ``_aream_fwd_kernel``: grid (L*B, row tiles). Each program loops over column tiles, accumulates the merged-head
  logits as sum_h dot(q_h tile, k_h tile^T) in fp32, rebuilds the pair coefficients from the label vector and
  writes one partial sum. torch sums the partials (deterministic, no atomics). All layers in one launch.
- ``_aream_grad_kernel``: grid (L*B, tiles of the "owned" side X, 2). Loops over tiles of the other side Y,
  recomputes S, and accumulates dX_h += G @ Y_h for every head into an fp32 buffer the program owns
  (load-add-store, one writer per address: deterministic, no atomics). Because coef is symmetric and
  logit_ij = q_i . k_j, dK is the same computation with (q, k) swapped (dK = G^T Q): grid axis 2 picks
  (X, Y) = (q, k) -> dQ or (k, q) -> dK, so dQ and dK come from one launch (dQ/dK programs, Triton-tutorial
  style, never write the same address).

The pair coefficients are passed normalised by m = max(a, b) so that G fits fp16/bf16 before the second dot
(a is ~1e-7 at realistic batch sizes and would underflow fp16); m and dloss/dL_l are folded in on the last tile.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["aream_loss_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SKIP_AUTOTUNE = _INTERPRET or os.environ.get("AREAM_FAST_SKIP_AUTOTUNE", "0") == "1"


def _configs() -> list[triton.Config]:
    """Autotune space. Under the interpreter (slow, no benchmarking possible) or with
    AREAM_FAST_SKIP_AUTOTUNE=1 a single small config is used."""
    if _INTERPRET:
        # 16 is the smallest tile tl.dot accepts; small tiles exercise ragged/multi-tile paths on tiny N.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if _SKIP_AUTOTUNE:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (32, 64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3, 4)
        # 128x128 tiles with 4 warps spill registers; 32x32 tiles with 8 warps leave warps idle.
        if not (bm * bn >= 128 * 128 and w == 4) and not (bm * bn <= 32 * 32 and w == 8)
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose tiles are larger than the (padded) problem; keep at least the smallest one."""
    p = named_args["P"]

    def fits(block):  # block <= max(32, next_pow2(P)); plain comparisons so dynamo can trace it
        return block <= 32 or block // 2 < p

    kept = [c for c in configs if fits(c.kwargs["BLOCK_M"]) and fits(c.kwargs["BLOCK_N"])]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _configs())
_AUTOTUNE_KEY = ["P", "H", "BLOCK_D"]


@triton.autotune(configs=_configs(), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _aream_fwd_kernel(
    Q, K, LABELS, COEF, PARTIAL,
    stride_ql, stride_qb, stride_qh, stride_qn,
    stride_kl, stride_kb, stride_kh, stride_kn,
    stride_lab_b, stride_part,
    B, H, P, D, C, ignore_index, scale_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """One program: layer l, image b, a tile of BLOCK_M patch rows; writes sum_{i in tile, j} coef_ij S_ij
    (with coef normalised by m) to PARTIAL[l*B + b, pid_m]."""
    pid_lb = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    layer = pid_lb // B
    img = pid_lb % B

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < P
    mask_d = offs_d < D

    # patch rows start after the C prefix tokens
    q_base = Q + layer * stride_ql + img * stride_qb + C * stride_qn
    k_base = K + layer * stride_kl + img * stride_kb + C * stride_kn
    lab_base = LABELS + img * stride_lab_b

    y_i = tl.load(lab_base + offs_m, mask=mask_m, other=ignore_index)
    valid_i = mask_m & (y_i != ignore_index)
    coef_same = tl.load(COEF)      # -a / m
    coef_diff = tl.load(COEF + 1)  # +b / m

    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for start_n in range(0, P, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < P
        y_j = tl.load(lab_base + offs_n, mask=mask_n, other=ignore_index)
        valid_j = mask_n & (y_j != ignore_index)

        # merged-head logits: sum_h q_h k_h^T, fp32 accumulation
        logits = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for h in range(H):
            q = tl.load(q_base + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            k = tl.load(k_base + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            logits = tl.dot(q, tl.trans(k), logits, input_precision=DOT_PRECISION)
        s = tl.sigmoid(logits * scale_h)

        # pair label recomputed per tile: same class -> -a, different -> +b, ignored side (or padding) -> 0
        pair_valid = valid_i[:, None] & valid_j[None, :]
        same = y_i[:, None] == y_j[None, :]
        coef = tl.where(pair_valid, tl.where(same, coef_same, coef_diff), 0.0)
        total += coef * s

    tl.store(PARTIAL + pid_lb * stride_part + pid_m, tl.sum(tl.sum(total, axis=1), axis=0))


@triton.autotune(configs=_configs(), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _aream_grad_kernel(
    Q, K, LABELS, COEF, GSCALE, DQ, DK,
    stride_l, stride_b, stride_h, stride_n,
    stride_dl, stride_db, stride_dh, stride_dn,
    stride_lab_b,
    B, H, P, D, C, ignore_index, scale_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """One program: layer l, image b, side s (program_id 2), BLOCK_M patch rows of X. Side 0: (X, Y, DX) =
    (Q, K, DQ); side 1: (K, Q, DK) (coef is symmetric and logit_ij = q_i . k_j, so dK = G^T Q is the same
    computation with the roles swapped). Writes, for every head h,
    DX_h[C+i] = GSCALE[l] * sum_j coef_ij S_ij (1 - S_ij) Y_h[C+j]   (coef normalised by m),
    with S_ij = sigmoid(scale_h * sum_h X_h[C+i] . Y_h[C+j]). Q and K share strides, so do DQ and DK.
    DX (fp32, fp64 for fp64 inputs) is owned row-block-wise by this program; prefix rows are not touched."""
    pid_lb = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    side = tl.program_id(2)
    layer = pid_lb // B
    img = pid_lb % B
    if side == 0:
        X = Q
        Y = K
        DX = DQ
    else:
        X = K
        Y = Q
        DX = DK

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < P
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]

    x_base = X + layer * stride_l + img * stride_b + C * stride_n
    y_base = Y + layer * stride_l + img * stride_b + C * stride_n
    d_base = DX + layer * stride_dl + img * stride_db + C * stride_dn
    lab_base = LABELS + img * stride_lab_b

    y_i = tl.load(lab_base + offs_m, mask=mask_m, other=ignore_index)
    valid_i = mask_m & (y_i != ignore_index)
    coef_same = tl.load(COEF)
    coef_diff = tl.load(COEF + 1)
    gscale = tl.load(GSCALE + layer)  # dloss/dL_l * m * scale / H

    for start_n in range(0, P, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < P
        mask_nd = mask_n[:, None] & mask_d[None, :]
        y_j = tl.load(lab_base + offs_n, mask=mask_n, other=ignore_index)
        valid_j = mask_n & (y_j != ignore_index)

        # recompute S for this tile (flash-attention style)
        logits = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for h in range(H):
            x = tl.load(x_base + h * stride_h + offs_m[:, None] * stride_n + offs_d[None, :],
                        mask=mask_md, other=0.0)
            y = tl.load(y_base + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :],
                        mask=mask_nd, other=0.0)
            logits = tl.dot(x, tl.trans(y), logits, input_precision=DOT_PRECISION)
        s = tl.sigmoid(logits * scale_h)
        pair_valid = valid_i[:, None] & valid_j[None, :]
        same = y_i[:, None] == y_j[None, :]
        coef = tl.where(pair_valid, tl.where(same, coef_same, coef_diff), 0.0)
        g = (coef * s * (1.0 - s)).to(Y.dtype.element_ty)  # |g| <= 0.25: safe in fp16/bf16

        # first tile stores (so the kernel is idempotent under autotune re-runs), last tile applies the scale
        not_first = start_n > 0
        out_scale = tl.where(start_n + BLOCK_N >= P, gscale, 1.0)
        for h in range(H):
            y = tl.load(y_base + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :],
                        mask=mask_nd, other=0.0)
            d_ptrs = d_base + h * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :]
            acc = tl.load(d_ptrs, mask=mask_md & not_first, other=0.0)
            acc = tl.dot(g, y, acc, input_precision=DOT_PRECISION)
            tl.store(d_ptrs, acc * out_scale, mask=mask_md)
        # the next column tile re-reads these rows: make this tile's stores visible to the whole CTA whatever
        # the load/store layouts are (one writer per address, so still deterministic and atomic-free)
        tl.debug_barrier()


def _dot_precision(dtype: torch.dtype):
    # exact fp32/fp64 dots (parity with the reference, also under the interpreter); fp16/bf16 use tensor cores
    return "ieee" if dtype in (torch.float32, torch.float64) else None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation for fp16/bf16/fp32; fp64 inputs (gradcheck under the interpreter) accumulate in fp64
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@triton_op("aream_fast::aream_loss_fwd", mutates_args={})
def _aream_loss_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    patch_labels: torch.Tensor,
    coefs: torch.Tensor,
    scale: float,
    num_prefix_tokens: int,
    ignore_index: int,
) -> torch.Tensor:
    """Per-layer sum_{b,i,j} coef_ij S_ij, shape (L,), fp32 (fp64 for fp64 q). q, k (L, B, H, N, d)
    contiguous, same dtype; patch_labels (B, P) int64 contiguous; coefs (3,) = [-a/m, b/m, m] in the
    accumulation dtype (fp32, or fp64 for fp64 q)."""
    n_layers, batch, heads, _, dim = q.shape
    num_patches = patch_labels.shape[1]
    n_row_tiles = triton.cdiv(num_patches, _MIN_BLOCK_M)
    # sized for the smallest BLOCK_M; larger tiles leave trailing zeros (sum unaffected)
    partial = torch.zeros((n_layers * batch, n_row_tiles), device=q.device, dtype=_acc_dtype(q.dtype))

    def grid(meta):
        return (n_layers * batch, triton.cdiv(num_patches, meta["BLOCK_M"]))

    wrap_triton(_aream_fwd_kernel)[grid](
        q, k, patch_labels, coefs, partial,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        patch_labels.stride(0), partial.stride(0),
        batch, heads, num_patches, dim, num_prefix_tokens, ignore_index, scale / heads,
        BLOCK_D=_block_d(dim), DOT_PRECISION=_dot_precision(q.dtype), ACC_DTYPE=_tl_acc_dtype(q.dtype),
    )
    return partial.view(n_layers, -1).sum(dim=1) * coefs[2]


@triton_op("aream_fast::aream_loss_bwd", mutates_args={})
def _aream_loss_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    patch_labels: torch.Tensor,
    coefs: torch.Tensor,
    grad_layers: torch.Tensor,
    scale: float,
    num_prefix_tokens: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk), each (L, B, H, N, d) in q's dtype, from grad_layers (L,) = dloss / d(per-layer sum)."""
    n_layers, batch, heads, _, dim = q.shape
    num_patches = patch_labels.shape[1]
    acc_dtype = _acc_dtype(q.dtype)
    gscale = (grad_layers.to(acc_dtype) * (coefs[2] * (scale / heads))).contiguous()
    # fp32 (fp64 for fp64 inputs) accumulators; prefix-token rows stay 0
    dq = torch.zeros(q.shape, device=q.device, dtype=acc_dtype)
    dk = torch.zeros(k.shape, device=k.device, dtype=acc_dtype)

    def grid(meta):  # axis 2: side 0 writes dQ, side 1 writes dK (one launch, no shared outputs)
        return (n_layers * batch, triton.cdiv(num_patches, meta["BLOCK_M"]), 2)

    wrap_triton(_aream_grad_kernel)[grid](
        q, k, patch_labels, coefs, gscale, dq, dk,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        dq.stride(0), dq.stride(1), dq.stride(2), dq.stride(3),
        patch_labels.stride(0),
        batch, heads, num_patches, dim, num_prefix_tokens, ignore_index, scale / heads,
        BLOCK_D=_block_d(dim), DOT_PRECISION=_dot_precision(q.dtype), ACC_DTYPE=_tl_acc_dtype(q.dtype),
    )
    return dq.to(q.dtype), dk.to(k.dtype)


def _setup_context(ctx, inputs, output):
    q, k, patch_labels, coefs, scale, num_prefix_tokens, ignore_index = inputs
    ctx.save_for_backward(q, k, patch_labels, coefs)
    ctx.scale = scale
    ctx.num_prefix_tokens = num_prefix_tokens
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_layers):
    q, k, patch_labels, coefs = ctx.saved_tensors
    dq, dk = _aream_loss_bwd(q, k, patch_labels, coefs, grad_layers.contiguous(), ctx.scale,
                             ctx.num_prefix_tokens, ctx.ignore_index)
    return dq, dk, None, None, None, None, None


_aream_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def _pair_counts(patch_labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-global (n_pos, n_neg) with the +1 of the official code (DESIGN "The one idea" item 2), as int64
    0-dim tensors. sum_c m_bc^2 = sum over valid i of (#j in image b with y_j == y_i), counted with a sort and
    two searchsorted calls: static shapes, no host sync, no bincount with a data-dependent output size
    (which torch.compile(fullgraph=True) cannot trace), and no P x P mask."""
    valid = patch_labels != ignore_index
    sorted_labels, _ = torch.sort(patch_labels, dim=1)
    same_count = (torch.searchsorted(sorted_labels, patch_labels, right=True)
                  - torch.searchsorted(sorted_labels, patch_labels, right=False))
    n_pos_pairs = (same_count * valid).sum()
    n_valid = valid.sum(dim=1)
    n_all_pairs = (n_valid * n_valid).sum()
    return n_pos_pairs + 1, n_all_pairs - n_pos_pairs + 1


def _check_inputs(q, k, patch_labels, num_prefix_tokens, layer_weights):
    if q.dim() != 5:
        raise ValueError(f"q must be stacked (L, B, H, N, d); got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}; got {tuple(k.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"q must be float16, bfloat16, float32 or float64; got {q.dtype}")
    if k.dtype != q.dtype:
        raise ValueError(f"k must have q's dtype {q.dtype}; got {k.dtype}")
    if q.device != k.device or patch_labels.device != q.device:
        raise ValueError(f"q, k, patch_labels must share a device; got {q.device}, {k.device}, "
                         f"{patch_labels.device}")
    if q.device.type == "cpu" and not _INTERPRET:
        raise ValueError("q is on CPU: the Triton AReAM loss needs CUDA tensors (or TRITON_INTERPRET=1 set "
                         "before triton is imported); use backend='torch' on CPU")
    n_layers, batch, _, n_tokens, _ = q.shape
    if not 0 <= num_prefix_tokens < n_tokens:
        raise ValueError(f"num_prefix_tokens must be in [0, N={n_tokens}); got {num_prefix_tokens}")
    if patch_labels.dtype != torch.int64:
        raise ValueError(f"patch_labels must be int64; got {patch_labels.dtype}")
    if patch_labels.shape != (batch, n_tokens - num_prefix_tokens):
        raise ValueError(f"patch_labels must have shape (B, P) = ({batch}, {n_tokens - num_prefix_tokens}); "
                         f"got {tuple(patch_labels.shape)}")
    if layer_weights is not None:
        if not isinstance(layer_weights, torch.Tensor) or layer_weights.shape != (n_layers,):
            shape = tuple(layer_weights.shape) if isinstance(layer_weights, torch.Tensor) else type(layer_weights)
            raise ValueError(f"layer_weights must be None or a ({n_layers},) tensor; got {shape}")
        if not layer_weights.is_floating_point():
            raise ValueError(f"layer_weights must be floating point; got {layer_weights.dtype}")


def aream_loss_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    patch_labels: torch.Tensor,
    *,
    scale: float,
    num_prefix_tokens: int,
    layer_weights: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Fused AReAM affinity loss (official formulation, spec §2) from stacked queries and keys.

    Args:
        q, k: (L, B, H, N, d) queries / keys of the L supervised layers, float16/bfloat16/float32 (float64 too,
            for gradcheck under the interpreter), on CUDA, or on CPU under TRITON_INTERPRET=1. Made contiguous.
        patch_labels: (B, P) int64, P = N - num_prefix_tokens, values 0..K or ignore_index.
        scale: attention scale (d ** -0.5); logits are (scale / H) * sum_h q_h k_h^T on the patch block.
        num_prefix_tokens: C, number of class/prefix tokens at the front of the sequence.
        layer_weights: None (uniform) or (L,) float tensor; not renormalised: loss = mean_l(w_l * L_l).
        ignore_index: label of ignored patches (pairs with an ignored side are skipped).

    Returns:
        0-dim tensor, float32 (float64 for float64 inputs), differentiable w.r.t. q and k (and, through plain
        torch ops, w.r.t. layer_weights if it requires grad).
    """
    _check_inputs(q, k, patch_labels, num_prefix_tokens, layer_weights)
    n_layers = q.shape[0]
    q = q.contiguous()
    k = k.contiguous()
    patch_labels = patch_labels.contiguous()

    n_pos, n_neg = _pair_counts(patch_labels, ignore_index)
    a = 0.5 / n_pos.to(torch.float64)
    b = 0.5 / n_neg.to(torch.float64)
    m = torch.maximum(a, b)
    acc_dtype = _acc_dtype(q.dtype)
    coefs = torch.stack([-a / m, b / m, m]).to(acc_dtype)

    layer_sums = _aream_loss_fwd(q, k, patch_labels, coefs, float(scale), int(num_prefix_tokens),
                                 int(ignore_index))
    # constant a * (n_pos - 1) = 0.5 * |Pos| / (|Pos| + 1): the "1 -" part of sum_Pos (1 - S)
    per_layer = layer_sums + (a * (n_pos - 1)).to(acc_dtype)
    if layer_weights is not None:
        per_layer = per_layer * layer_weights.to(device=per_layer.device, dtype=acc_dtype)
    return per_layer.sum() / n_layers
