"""Fused AReAM affinity loss in Triton: forward and backward without any P x P matrix.

Layout follows Liger-Kernel (kernels + launchers + autograd registration in one file).

Math (official AReAM, Jessie459/AReAM ``main_voc_mctformer.py`` / ``losses.py``; docs/semantics.md,
"Affinity loss" and "Fast path"). For every supervised layer l, image b, patches i, j (token index C + i, C = num_prefix_tokens)::

    S_ij   = sigmoid((scale / H) * sum_h q_h[C+i] . k_h[C+j])            head-mean logits, then sigmoid
    coef_ij = -a  if y_i == y_j (both valid),  +b if y_i != y_j (both valid),  0 if either is ignore_index
    a = 0.5 / n_pos,  b = 0.5 / n_neg                                   batch-global counts with the +1
    n_pos = sum_b sum_c m_bc^2 + 1,  n_neg = sum_b V_b^2 - (n_pos - 1) + 1
    L_l   = a * (n_pos - 1) + sum_{b,i,j} coef_ij * S_ij                 = 0.5 * mean_Pos(1-S) + 0.5 * mean_Neg(S)
    loss  = mean_l (w_l * L_l)

Gradient of the head-mean logit ij: G_ij = coef_ij * S_ij (1 - S_ij) * dloss/dL_l, and
``dq_h[C+i] = (scale/H) sum_j G_ij k_h[C+j]``, ``dk_h[C+j] = (scale/H) sum_i G_ij q_h[C+i]``; prefix rows get 0.

Kernels (grids put the row tile on axis 0, so the row tiles of one image run together and share its K / Y
slab in L2; review P1):
- ``_aream_fwd_kernel``: grid (row tiles, L*B). Each program loops over column tiles, accumulates the merged-head
  logits as sum_h dot(q_h tile, k_h tile^T) in fp32, rebuilds the pair coefficients from the label vector and
  keeps one per-row partial sum; it writes one scalar. torch sums the partials (deterministic, no atomics).
  All layers in one launch.
- ``_aream_grad_kernel``: grid (tiles of the "owned" side X, L*B, 2 * head groups). Loops over tiles of the
  other side Y, recomputes S from all heads, and accumulates dX += G @ Y_g for one group of heads g in
  registers, with the heads of the group folded into the column axis: Y_g is the (BLOCK_N, heads-of-g * d)
  slice, so one dot serves the whole group (G is shared by all heads because the logit is the head mean).
  dX is written once, in the input dtype (review P2: no fp32 scratch, no load-add-store per column tile).
  Because coef is symmetric and logit_ij = q_i . k_j, dK is the same computation with (q, k) swapped
  (dK = G^T Q): grid axis 2 picks (X, Y) = (q, k) -> dQ or (k, q) -> dK. Each output address has one writer.
  With n_groups > 1 the logits are recomputed once per group (ViT-S: H=6, d=64 -> 2 groups of 3 heads,
  accumulator 64 or 128 rows x 256 folded columns).

Only the ragged last column tile pays for masks (the column loop runs full tiles unmasked, then one masked tail,
as in flash-attn's ``EVEN_N``); rows are masked only when P is not a multiple of BLOCK_M (``MASK_M``); the head
dim is a constexpr and masked only when it is below its power-of-two block.

The pair coefficients are passed normalised by m = max(a, b) so that G fits bf16 before the second dot
(a is ~1e-7 at realistic batch sizes); m and dloss/dL_l are folded in at the store. fp16 inputs run the second dot
with G in fp32 (tf32 on a GPU, review C1): the minority coefficient n_small / n_large can fall below fp16's
normal range (6e-5) when one pair class dominates the batch, and would lose its gradient.

Precision (review P5): fp16/bf16 dots use tensor cores with fp32 accumulation; fp32 dots follow the attention
kernels' policy (``kernels/flash_attention.py::_dot_precision``): TF32 tensor cores when
``torch.backends.cuda.matmul.allow_tf32`` is set, else exact IEEE fp32 on FMA units with small 8-warp tiles only.

Reproducibility (review C3): no atomics, so a fixed config is bit-deterministic; the fp32 summation order
depends on the autotune winner. ``AREAM_FAST_LOSS_CONFIG="BM,BN,warps,stages"`` (read at import) pins one config
for both kernels (e.g. ``64,64,8,2``) for bit-reproducible runs across machines and between eager and
torch.compile; ``AREAM_FAST_SKIP_AUTOTUNE=1`` pins the default config ``_DEFAULT_CONFIG``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import acc_dtype as _acc_dtype, interpreting, pair_counts_sorted as _pair_counts
from .flash_attention import _dot_precision as _attention_dot_precision

__all__ = ["aream_loss_triton", "aream_layer_grads_triton"]

_INTERPRET = interpreting()
_SKIP_AUTOTUNE = _INTERPRET or os.environ.get("AREAM_FAST_SKIP_AUTOTUNE", "0") == "1"
_PIN_ENV = "AREAM_FAST_LOSS_CONFIG"
# (BLOCK_M, BLOCK_N, num_warps, num_stages) used with AREAM_FAST_SKIP_AUTOTUNE=1 on a GPU
_DEFAULT_CONFIG = (64, 64, 8, 2)
# Folded accumulator width of one head group in the backward (columns = heads of the group x BLOCK_D).
_MAX_GROUP_COLS = 256


def _config(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _parse_pinned(text: str) -> triton.Config:
    try:
        bm, bn, warps, stages = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{_PIN_ENV} must be 'BLOCK_M,BLOCK_N,num_warps,num_stages' integers; got {text!r}") from None
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"{_PIN_ENV} blocks must be powers of two >= 16; got {text!r}")
    return _config(bm, bn, warps, stages)


# Tensor-core tiles (fp16/bf16, TF32): BM, BN in {64, 128}, 8 warps from 64x128 up, stages 2-3 (review P3: the
# BM=32 tiles cannot use wgmma and the 4-warp large tiles spill). Exact-fp32 (FMA) tiles: BM=32, 8 warps.
# The kept sets are checked for spills and wgmma at the training shape by tests/kernels/test_kernel_compile_sm90.py.
_TENSOR_CORE_FWD = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2), (64, 128, 8, 3),
                    (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3)]
# The backward's folded accumulator (BLOCK_M x 256 fp32) leaves room for 64x64 tiles only: 64x128 and 128x64
# reach 255 registers and spill (sm_90 sweep).
_TENSOR_CORE_GRAD = [(64, 64, 8, 2), (64, 64, 8, 3)]
_EXACT_FWD = [(32, 64, 8, 2)]  # 32x32 spills 4 bytes (forward), 32x64 12 bytes (backward)
_EXACT_GRAD = [(32, 32, 8, 2)]


def _configs(tensor_core, exact) -> list[triton.Config]:
    """Autotune space. Under the interpreter (slow, no benchmarking possible) one 16x16 config; with
    AREAM_FAST_LOSS_CONFIG one pinned config; with AREAM_FAST_SKIP_AUTOTUNE=1 ``_DEFAULT_CONFIG``."""
    if _INTERPRET:
        # 16 is the smallest tile tl.dot accepts; small tiles exercise ragged/multi-tile paths on tiny N.
        return [_config(16, 16, 4, 1)]
    if os.environ.get(_PIN_ENV):
        return [_parse_pinned(os.environ[_PIN_ENV])]
    if _SKIP_AUTOTUNE:
        return [_config(*_DEFAULT_CONFIG)]
    return [_config(*c) for c in tensor_core + exact]


def _prune_configs(configs, named_args, **kwargs):
    """Exact fp32 dots keep the small FMA tiles, tensor-core dots the BM >= 64 tiles; then drop tiles larger than
    the (power-of-two padded) problem. Always keeps at least one config."""
    if len(configs) == 1:
        return configs
    exact = kwargs.get("DOT_PRECISION") == "ieee"
    n_pow2 = max(16, triton.next_power_of_2(int(named_args["P"])))
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"] == 32) == exact
            and c.kwargs["BLOCK_M"] <= n_pow2 and c.kwargs["BLOCK_N"] <= n_pow2]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps))]


def _ragged_m(args) -> bool:
    return args["P"] % args["BLOCK_M"] != 0


_AUTOTUNE_KEY = ["P", "H", "D", "DOT_PRECISION"]
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _configs(_TENSOR_CORE_FWD, _EXACT_FWD))


@triton.jit
def _load_tile(base, offs_r, offs_d, stride_r, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_R: tl.constexpr):
    """(len(offs_r), BLOCK_D) tile with unit column stride; out-of-range rows / padded head dims read 0."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    if MASK_R:
        if D == BLOCK_D:
            x = tl.load(ptrs, mask=(offs_r < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_r < n_rows)[:, None] & (offs_d < D)[None, :], other=0.0)
    else:
        if D == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return x


@triton.jit
def _pair_tile(x_base, y_base, lab_base, y_i, offs_m, offs_n, offs_d, stride_h, stride_n, coef_same, coef_diff,
               H, P, ignore_index, scale_h,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_M: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
               ACC_DTYPE: tl.constexpr):
    """S_ij = sigmoid(scale_h * sum_h x_h[i] . y_h[j]) and the (normalised) pair coefficient of one
    (BLOCK_M, BLOCK_N) tile: -a/m same label, +b/m different, 0 if either side is ignored or out of range."""
    logits = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for h in range(H):
        x = _load_tile(x_base + h * stride_h, offs_m, offs_d, stride_n, P, D, BLOCK_D, MASK_M)
        y = _load_tile(y_base + h * stride_h, offs_n, offs_d, stride_n, P, D, BLOCK_D, MASK_N)
        logits = tl.dot(x, tl.trans(y), logits, input_precision=DOT_PRECISION)
    s = tl.sigmoid(logits * scale_h)
    if MASK_N:
        y_j = tl.load(lab_base + offs_n, mask=offs_n < P, other=ignore_index)
    else:
        y_j = tl.load(lab_base + offs_n)
    pair_valid = (y_i != ignore_index)[:, None] & (y_j != ignore_index)[None, :]
    coef = tl.where(pair_valid, tl.where(y_i[:, None] == y_j[None, :], coef_same, coef_diff), 0.0)
    return s, coef


@triton.autotune(configs=_configs(_TENSOR_CORE_FWD, _EXACT_FWD), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.heuristics({"MASK_M": _ragged_m})
@triton.jit
def _aream_fwd_kernel(
    Q, K, LABELS, COEF, PARTIAL,
    stride_ql, stride_qb, stride_qh, stride_qn,
    stride_kl, stride_kb, stride_kh, stride_kn,
    stride_lab_b, stride_part,
    B, H, P, C, ignore_index, scale_h,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Grid (row tiles, L*B). One program: a tile of BLOCK_M patch rows of layer l, image b; writes
    sum_{i in tile, j} coef_ij S_ij (coef normalised by m) to PARTIAL[l*B + b, row tile]. Q, K have unit
    d-stride."""
    pid_m = tl.program_id(0)
    pid_lb = tl.program_id(1).to(tl.int64)
    layer = pid_lb // B
    img = pid_lb % B

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # patch rows start after the C prefix tokens
    q_base = Q + layer * stride_ql + img * stride_qb + C * stride_qn
    k_base = K + layer * stride_kl + img * stride_kb + C * stride_kn
    lab_base = LABELS + img * stride_lab_b
    y_i = tl.load(lab_base + offs_m, mask=offs_m < P, other=ignore_index)
    coef_same = tl.load(COEF)      # -a / m
    coef_diff = tl.load(COEF + 1)  # +b / m

    total = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    n_full = (P // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        s, coef = _pair_tile(q_base, k_base, lab_base, y_i, offs_m, start_n + tl.arange(0, BLOCK_N), offs_d,
                             stride_qh, stride_qn, coef_same, coef_diff, H, P, ignore_index, scale_h,
                             D, BLOCK_M, BLOCK_N, BLOCK_D, MASK_M, False, DOT_PRECISION, ACC_DTYPE)
        total += tl.sum(coef * s, axis=1)
    if n_full < P:  # ragged tail: the only column tile that pays for masks
        s, coef = _pair_tile(q_base, k_base, lab_base, y_i, offs_m, n_full + tl.arange(0, BLOCK_N), offs_d,
                             stride_qh, stride_qn, coef_same, coef_diff, H, P, ignore_index, scale_h,
                             D, BLOCK_M, BLOCK_N, BLOCK_D, MASK_M, True, DOT_PRECISION, ACC_DTYPE)
        total += tl.sum(coef * s, axis=1)
    tl.store(PARTIAL + pid_lb * stride_part + pid_m, tl.sum(total, axis=0))


@triton.jit
def _grad_tile(acc, x_base, y_base, lab_base, y_i, offs_m, offs_n, offs_d, col_off, valid_c, stride_h, stride_n,
               coef_same, coef_diff, H, P, ignore_index, scale_h,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_M: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
               ACC_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    """acc (BLOCK_M, BLOCK_HD) += G_tile @ Y_g for one column tile, G = coef * S * (1 - S)."""
    s, coef = _pair_tile(x_base, y_base, lab_base, y_i, offs_m, offs_n, offs_d, stride_h, stride_n,
                         coef_same, coef_diff, H, P, ignore_index, scale_h,
                         D, BLOCK_M, BLOCK_N, BLOCK_D, MASK_M, MASK_N, DOT_PRECISION, ACC_DTYPE)
    g = (coef * s * (1.0 - s)).to(GRAD_DTYPE)  # |g| <= 0.25
    y_ptrs = y_base + offs_n[:, None] * stride_n + col_off[None, :]
    if MASK_N:
        y = tl.load(y_ptrs, mask=(offs_n < P)[:, None] & valid_c[None, :], other=0.0)
    else:
        y = tl.load(y_ptrs, mask=valid_c[None, :], other=0.0)
    return tl.dot(g, y.to(GRAD_DTYPE), acc, input_precision=GRAD_PRECISION)


@triton.autotune(configs=_configs(_TENSOR_CORE_GRAD, _EXACT_GRAD), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.heuristics({"MASK_M": _ragged_m})
@triton.jit
def _aream_grad_kernel(
    Q, K, LABELS, COEF, GSCALE, DQ, DK,
    stride_l, stride_b, stride_h, stride_n,
    stride_dl, stride_db, stride_dh, stride_dn,
    stride_lab_b,
    B, H, P, C, ignore_index, scale_h, n_groups,
    D: tl.constexpr, HEAD_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_HD: tl.constexpr, MASK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr,
):
    """Grid (row tiles, L*B, 2 * n_groups). One program: BLOCK_M patch rows of X for layer l, image b, side s
    and head group g (program_id 2 = s * n_groups + g). Side 0: (X, Y, DX) = (Q, K, DQ); side 1: (K, Q, DK).
    Writes, for the heads h of group g (HEAD_GROUP consecutive heads),
    DX_h[C+i] = GSCALE[l] * sum_j coef_ij S_ij (1 - S_ij) Y_h[C+j]   (coef normalised by m),
    with S_ij = sigmoid(scale_h * sum_h' X_h'[C+i] . Y_h'[C+j]) over all heads. Q and K share strides, so do
    DQ and DK; all have unit d-stride. Prefix rows are not touched."""
    pid_m = tl.program_id(0)
    pid_lb = tl.program_id(1).to(tl.int64)
    pid_sg = tl.program_id(2)
    layer = pid_lb // B
    img = pid_lb % B
    side = pid_sg // n_groups
    group = pid_sg % n_groups
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
    # heads of this group folded into the column axis: column c -> head group*HEAD_GROUP + c // BLOCK_D, dim c % BLOCK_D
    offs_c = tl.arange(0, BLOCK_HD)
    head_c = group * HEAD_GROUP + offs_c // BLOCK_D
    dim_c = offs_c % BLOCK_D
    valid_c = (offs_c // BLOCK_D < HEAD_GROUP) & (head_c < H) & (dim_c < D)
    x_base = X + layer * stride_l + img * stride_b + C * stride_n
    y_base = Y + layer * stride_l + img * stride_b + C * stride_n
    lab_base = LABELS + img * stride_lab_b
    y_i = tl.load(lab_base + offs_m, mask=offs_m < P, other=ignore_index)
    coef_same = tl.load(COEF)
    coef_diff = tl.load(COEF + 1)
    gscale = tl.load(GSCALE + layer)  # dloss/dL_l * m * scale / H
    col_off = head_c * stride_h + dim_c

    acc = tl.zeros((BLOCK_M, BLOCK_HD), dtype=ACC_DTYPE)
    n_full = (P // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc = _grad_tile(acc, x_base, y_base, lab_base, y_i, offs_m, start_n + tl.arange(0, BLOCK_N), offs_d,
                         col_off, valid_c, stride_h, stride_n, coef_same, coef_diff, H, P, ignore_index, scale_h,
                         D, BLOCK_M, BLOCK_N, BLOCK_D, MASK_M, False, DOT_PRECISION, ACC_DTYPE, GRAD_DTYPE,
                         GRAD_PRECISION)
    if n_full < P:
        acc = _grad_tile(acc, x_base, y_base, lab_base, y_i, offs_m, n_full + tl.arange(0, BLOCK_N), offs_d,
                         col_off, valid_c, stride_h, stride_n, coef_same, coef_diff, H, P, ignore_index, scale_h,
                         D, BLOCK_M, BLOCK_N, BLOCK_D, MASK_M, True, DOT_PRECISION, ACC_DTYPE, GRAD_DTYPE,
                         GRAD_PRECISION)
    d_ptrs = (DX + layer * stride_dl + img * stride_db + C * stride_dn + offs_m[:, None] * stride_dn
              + (head_c * stride_dh + dim_c)[None, :])
    tl.store(d_ptrs, (acc * gscale).to(DX.dtype.element_ty), mask=(offs_m < P)[:, None] & valid_c[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    """Logit dots: the attention kernels' policy (TF32 for fp32 when allowed, review P5); fp64 stays exact."""
    return "ieee" if dtype == torch.float64 else _attention_dot_precision(dtype)


def _grad_operands(dtype: torch.dtype):
    """(dtype of G and Y in the second dot, its input precision). fp16 runs it in fp32 (tf32 on a GPU) so that
    minority-pair gradients below fp16's normal range survive (review C1)."""
    if dtype == torch.float16:
        return tl.float32, ("ieee" if _INTERPRET else "tf32")
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32"
    return _tl_acc_dtype(dtype), _dot_precision(dtype)


def _tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _head_groups(heads: int, block_d: int) -> tuple[int, int]:
    """(heads per group, number of groups) of the backward: the folded accumulator holds at most
    ``_MAX_GROUP_COLS`` columns (2 heads under the interpreter, so tests cover several groups), groups balanced.
    ViT-S (H=6, d=64): (3, 2); ViT-B (H=12, d=64): (4, 3)."""
    per = 2 if _INTERPRET else _MAX_GROUP_COLS // block_d
    per = max(1, min(heads, per))
    n_groups = triton.cdiv(heads, per)
    return triton.cdiv(heads, n_groups), n_groups


def _check_strides(q: torch.Tensor, k: torch.Tensor) -> None:
    """The kernels hard-code a unit d-stride and one stride set for q and k (review C2)."""
    if q.stride() != k.stride() or q.stride(-1) != 1:
        raise ValueError(f"q and k must share strides with unit last stride; got {q.stride()} and {k.stride()}")


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
    """Per-layer sum_{b,i,j} coef_ij S_ij, shape (L,), fp32 (fp64 for fp64 q). q, k (L, B, H, N, d), same dtype
    and strides, unit d-stride; patch_labels (B, P) int64 with unit stride; coefs (3,) = [-a/m, b/m, m] in the
    accumulation dtype (fp32, or fp64 for fp64 q)."""
    _check_strides(q, k)
    n_layers, batch, heads, _, dim = q.shape
    num_patches = patch_labels.shape[1]
    n_row_tiles = triton.cdiv(num_patches, _MIN_BLOCK_M)
    # sized for the smallest BLOCK_M; larger tiles leave trailing zeros (sum unaffected)
    partial = torch.zeros((n_layers * batch, n_row_tiles), device=q.device, dtype=_acc_dtype(q.dtype))

    def grid(meta):
        return (triton.cdiv(num_patches, meta["BLOCK_M"]), n_layers * batch)

    wrap_triton(_aream_fwd_kernel)[grid](
        q, k, patch_labels, coefs, partial,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        patch_labels.stride(0), partial.stride(0),
        batch, heads, num_patches, num_prefix_tokens, ignore_index, scale / heads,
        D=dim, BLOCK_D=_block_d(dim), DOT_PRECISION=_dot_precision(q.dtype), ACC_DTYPE=_tl_acc_dtype(q.dtype),
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
    """(dq, dk), each (L, B, H, N, d) contiguous in q's dtype, from grad_layers (L,) = dloss / d(per-layer sum).
    Same input contract as ``aream_loss_fwd``."""
    _check_strides(q, k)
    n_layers, batch, heads, n_tokens, dim = q.shape
    num_patches = patch_labels.shape[1]
    gscale = (grad_layers.to(_acc_dtype(q.dtype)) * (coefs[2] * (scale / heads))).contiguous()
    # written once by the kernel in q's dtype; only the prefix-token rows need zeros
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dq[:, :, :, :num_prefix_tokens].zero_()
    dk[:, :, :, :num_prefix_tokens].zero_()
    block_d = _block_d(dim)
    head_group, n_groups = _head_groups(heads, block_d)
    grad_dtype, grad_precision = _grad_operands(q.dtype)

    def grid(meta):  # axis 2: side * n_groups + head group; side 0 writes dQ, side 1 writes dK
        return (triton.cdiv(num_patches, meta["BLOCK_M"]), n_layers * batch, 2 * n_groups)

    wrap_triton(_aream_grad_kernel)[grid](
        q, k, patch_labels, coefs, gscale, dq, dk,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        dq.stride(0), dq.stride(1), dq.stride(2), dq.stride(3),
        patch_labels.stride(0),
        batch, heads, num_patches, num_prefix_tokens, ignore_index, scale / heads, n_groups,
        D=dim, HEAD_GROUP=head_group, BLOCK_D=block_d, BLOCK_HD=triton.next_power_of_2(head_group * block_d),
        DOT_PRECISION=_dot_precision(q.dtype), ACC_DTYPE=_tl_acc_dtype(q.dtype), GRAD_DTYPE=grad_dtype,
        GRAD_PRECISION=grad_precision,
    )
    return dq, dk


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
    """Fused AReAM affinity loss (official formulation, docs/semantics.md, "Affinity loss") from stacked queries and keys.

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
    coefs, constant = _loss_coefs(patch_labels, ignore_index, _acc_dtype(q.dtype))
    layer_sums = _aream_loss_fwd(q, k, patch_labels, coefs, float(scale), int(num_prefix_tokens),
                                 int(ignore_index))
    per_layer = layer_sums + constant
    if layer_weights is not None:
        per_layer = per_layer * layer_weights.to(device=per_layer.device, dtype=coefs.dtype)
    return per_layer.sum() / n_layers


def _loss_coefs(patch_labels: torch.Tensor, ignore_index: int, acc_dtype: torch.dtype):
    """(coefs (3,) = [-a/m, b/m, m], constant a * (n_pos - 1)) in ``acc_dtype``, from the batch-global pair
    counts; m = max(a, b). The constant is the "1 -" part of sum_Pos (1 - S): 0.5 * |Pos| / (|Pos| + 1)."""
    n_pos, n_neg = _pair_counts(patch_labels, ignore_index)
    a = 0.5 / n_pos.to(torch.float64)
    b = 0.5 / n_neg.to(torch.float64)
    m = torch.maximum(a, b)
    return torch.stack([-a / m, b / m, m]).to(acc_dtype), (a * (n_pos - 1)).to(acc_dtype)


def aream_layer_grads_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    patch_labels: torch.Tensor,
    *,
    scale: float,
    num_prefix_tokens: int,
    weight: float,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` x (dL_l/dq, dL_l/dk) of one supervised layer, with the Triton backward and no autograd: the
    kernel-side entry point of the deferred per-layer loss gradient (``aream_fast.losses.deferred``).

    Args:
        q, k: (B, H, N, d) queries / keys of one layer; any strides (views of a packed (B, N, 3, H, d) qkv
            output share strides and are used without a copy; otherwise both are made contiguous).
        patch_labels: (B, P) int64, P = N - num_prefix_tokens; the pair counts are batch-global as in the loss.
        weight: dTotal/dL_l, e.g. w_l / L for ``loss = mean_l(w_l L_l)``.

    Returns:
        (dq, dk), each (B, H, N, d) contiguous in q's dtype; prefix-token rows are 0.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be one layer's (B, H, N, d); got shape {tuple(q.shape)}")
    _check_inputs(q.unsqueeze(0), k.unsqueeze(0), patch_labels, num_prefix_tokens, None)
    if q.stride() != k.stride() or q.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    patch_labels = patch_labels.contiguous()
    coefs, _ = _loss_coefs(patch_labels, ignore_index, _acc_dtype(q.dtype))
    grad = torch.full((1,), float(weight), device=q.device, dtype=coefs.dtype)
    dq, dk = _aream_loss_bwd(q[None], k[None], patch_labels, coefs, grad, float(scale), int(num_prefix_tokens),
                             int(ignore_index))
    return dq[0], dk[0]
