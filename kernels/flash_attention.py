"""Triton flash attention for ViT (no causal mask) that exports what AReAM needs from attention.

One file holds the kernels, the host launchers and the ``torch.library`` ops (Liger-Kernel layout):

* ``flash_attention(q, k, v, *, scale, num_prefix_tokens=0, return_lse=False, return_class_attention=False)``
  FlashAttention-2 forward (online softmax in the exp2 domain, Triton tutorial 06 "fused attention") that writes
  O (B, H, N, d) and the row log-sum-exp (B, H, N) fp32 (natural log). A cheap second kernel reuses the LSE to
  write the head-mean class-token rows over the patch columns (B, C, P) fp32 (docs/semantics.md, Fast path item 6). The backward
  (w.r.t. q, k, v, and the LSE) recomputes P from the saved LSE: Delta preprocess, one dK/dV kernel (program
  per key block looping over query blocks) and one dQ kernel (program per query block) — no atomics, so the
  gradients are deterministic (tutorial 06 / flash-attn ``_bwd_kernel_one_col_block``).
* ``attention_apply_triton(q, k, lse, values, *, scale, num_prefix_tokens, layer_weights=None)`` -> (B, K, P)
  fp32: the mean over layers (weighted, 1/L, not renormalised) and heads of softmax(scale q kᵀ)[C:, C:] @ valuesᵀ
  computed from the saved LSE in one launch, with no online softmax and no N×N matrix (docs/semantics.md, Fast path item 5, CAM
  refinement).

Ragged sequence lengths (N = 197, 785, odd tiny N) are handled flash-attn style: full tiles run unmasked and only
the ragged tail tile (``EVEN_M`` / ``EVEN_N`` heuristics false) and a head dim below its power-of-two block
(``EVEN_D``) pay for masks. fp16/bf16/fp32 inputs, fp32 accumulation. fp32 dots are exact IEEE
(``input_precision="ieee"``) under ``TRITON_INTERPRET=1`` (so tests match eager PyTorch) and on a GPU unless TF32
matmuls are allowed (``_dot_precision``).

Autotune: per-kernel tile lists (``_FWD_TILES``, ``_DQ_TILES``, ``_DKDV_TILES``) for tensor-core dots
(fp16/bf16, TF32), 32×16 / 32×32 tiles for exact fp32 dots, pruned by sequence length (``_prune_by_length``).
With ``AREAM_FAST_SKIP_AUTOTUNE=1`` or ``TRITON_INTERPRET=1`` (read at import) a single 16×16 config is used.
Every kept config compiles for sm_90 without spills (checked without a GPU: ``make compile-check``,
tests/kernels/test_kernel_compile_sm90.py).

CPU tensors are accepted only under ``TRITON_INTERPRET=1`` (tests). ``torch.compile`` of these ops needs CUDA
(docs/semantics.md, Fast path: backends dispatch on the device): pick the backend in Python before calling them.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import interpreting as _interpreting

__all__ = ["flash_attention", "attention_apply_triton", "class_attention_from_lse"]

# log2(e): exp(x) = exp2(x * log2(e)). Inside the kernels it is written as the literal 1.4426950408889634 and
# ln(2) as 0.6931471805599453 (a plain Python global is not a constexpr there).
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 128


# Read once at import (conftest.py sets both before anything imports triton).
_SKIP_AUTOTUNE = os.environ.get("AREAM_FAST_SKIP_AUTOTUNE", "0") == "1" or _interpreting()


# ----------------------------------------------------------------------------------------------------------------
# Autotune configurations
# ----------------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, from the sm_90 ahead-of-time review
# (benchmarks/RESULTS.md, "sm_90 ahead-of-time compile"; checked for spills and wgmma at the training shape by
# tests/kernels/test_kernel_compile_sm90.py). 128x64 with 4 warps spills in both backward kernels. In dK/dV the
# owned key block is BLOCK_N and must be >= 64 for wgmma (tutorial 06 owns 128 keys and loops over 32 queries).
_FWD_TILES = ([(bm, bn, 4, s) for bm in (64, 128) for bn in (32, 64) for s in (2, 3, 4)]
              + [(128, 64, 8, s) for s in (2, 3, 4)] + [(128, 128, 8, s) for s in (2, 3)])
_DQ_TILES = ([(bm, bn, 4, s) for bm, bn in ((64, 32), (64, 64), (128, 32)) for s in (2, 3, 4)]
             + [(128, 64, 8, s) for s in (2, 3, 4)])
_DKDV_TILES = ([(bm, 64, 4, s) for bm in (32, 64) for s in (2, 3)]
               + [(bm, 128, 8, s) for bm in (32, 64) for s in (2, 3)])
_EXACT_TILES = [(bm, bn, 4, s) for bm, bn in ((32, 16), (32, 32)) for s in (2, 3)]
_TILES = {"fwd": _FWD_TILES, "dq": _DQ_TILES, "dkdv": _DKDV_TILES}


def _configs(kind: str) -> list:
    """GPU configs of kernel ``kind`` ("fwd", "dq", "dkdv"; tensor-core tiles, plus small tiles kept only for
    exact-fp32 dots); one small config under the interpreter / when autotune is skipped."""
    if _SKIP_AUTOTUNE:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _TILES[kind] + _EXACT_TILES]


def _prune_by_length(configs, named_args, kind="fwd", **kwargs):
    """Shape/precision pruning of kernel ``kind``'s configs (tutorial 06 ``keep`` and ``prune_invalid_configs``):
    exact fp32 dots (``DOT_PREC="ieee"`` on fp32 operands run on FMA units and spill on big tiles) keep only the
    small tiles (dK/dV only 32x16), tensor-core dots only the per-kernel tiles, and with fp32 (TF32) operands
    no 4-warp 128-row tile and, in dK/dV, only 32 inner query rows (the others spill: sm_90 sweep); then drop
    blocks beyond the power-of-two rounded sequence length. Always returns at least one config."""
    if len(configs) == 1:
        return configs
    fp32 = named_args["Q"].dtype == torch.float32
    exact = kwargs.get("DOT_PREC") == "ieee" and fp32
    n_pow2 = max(16, triton.next_power_of_2(int(named_args["N_CTX"])))
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        if exact != (bm * bn <= 32 * 32 or bn == 16):
            continue
        if exact and kind == "dkdv" and bn != 16:
            continue
        if not exact and fp32 and ((bm == 128 and cfg.num_warps == 4) or (kind == "dkdv" and bm != 32)):
            continue
        if bm > n_pow2 or bn > n_pow2:
            continue
        kept.append(cfg)
    if not kept:
        kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps))]
    return kept


def _prune_fwd(configs, named_args, **kwargs):
    return _prune_by_length(configs, named_args, "fwd", **kwargs)


def _prune_dq(configs, named_args, **kwargs):
    return _prune_by_length(configs, named_args, "dq", **kwargs)


def _prune_dkdv(configs, named_args, **kwargs):
    return _prune_by_length(configs, named_args, "dkdv", **kwargs)


def _even(name: str, block: str):
    return lambda args: args[name] % args[block] == 0


# ----------------------------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, offs_r, offs_d, stride_r, stride_d, n_rows, head_dim,
               MASK_R: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (len(offs_r), BLOCK_D) tile; out-of-range rows / padded head-dim columns read as 0."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if MASK_R:
        if EVEN_D:
            x = tl.load(ptrs, mask=(offs_r < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_r < n_rows)[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < head_dim)[None, :], other=0.0)
    return x


@triton.jit
def _store_rows(base, x, offs_r, offs_d, stride_r, stride_d, n_rows, head_dim,
                MASK_R: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if MASK_R:
        if EVEN_D:
            tl.store(ptrs, x, mask=(offs_r < n_rows)[:, None])
        else:
            tl.store(ptrs, x, mask=(offs_r < n_rows)[:, None] & (offs_d < head_dim)[None, :])
    else:
        if EVEN_D:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=(offs_d < head_dim)[None, :])


@triton.jit
def _load_vec(base, offs, stride, n, MASK: tl.constexpr):
    if MASK:
        x = tl.load(base + offs * stride, mask=offs < n, other=0.0)
    else:
        x = tl.load(base + offs * stride)
    return x


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               offs_d, start, end, N_CTX, HEAD_DIM, qk_scale,
               BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online-softmax update over key blocks [start, end) in the exp2 domain (tutorial 06 ``_attn_fwd_inner``)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, N_CTX, HEAD_DIM, MASK_N, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK_N:
            qk = tl.where((offs_n < N_CTX)[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, offs_n, offs_d, stride_vn, stride_vd, N_CTX, HEAD_DIM, MASK_N, EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_ij
    return acc, l_i, m_i


@triton.autotune(configs=_configs("fwd"), key=["N_CTX", "HEAD_DIM", "DOT_PREC"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.heuristics({"EVEN_M": _even("N_CTX", "BLOCK_M"), "EVEN_N": _even("N_CTX", "BLOCK_N")})
@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O, LSE, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    NUM_HEADS, N_CTX, HEAD_DIM,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B*H). Writes O rows and the natural-log LSE of this query block."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_HEADS).to(tl.int64)
    h = (pid_bh % NUM_HEADS).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    MASK_M: tl.constexpr = not EVEN_M

    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, N_CTX, HEAD_DIM,
                   MASK_M, EVEN_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = (N_CTX // BLOCK_N) * BLOCK_N
    # Full key tiles: no masks.
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               offs_d, 0, n_full, N_CTX, HEAD_DIM, qk_scale, BLOCK_N, EVEN_D, False, DOT_PREC)
    if not EVEN_N:
        # The ragged last key tile: out-of-range keys get -inf logits.
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   offs_d, n_full, N_CTX, N_CTX, HEAD_DIM, qk_scale, BLOCK_N, EVEN_D, True, DOT_PREC)

    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2-sum-exp2 -> natural log
    _store_rows(O + b * stride_ob + h * stride_oh, acc.to(O.dtype.element_ty), offs_m, offs_d, stride_on,
                stride_od, N_CTX, HEAD_DIM, MASK_M, EVEN_D)
    l_ptrs = LSE + b * stride_lb + h * stride_lh + offs_m * stride_ln
    if MASK_M:
        tl.store(l_ptrs, lse, mask=offs_m < N_CTX)
    else:
        tl.store(l_ptrs, lse)


@triton.jit
def _class_attn_kernel(
    Q, K, LSE, CLS, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_ln,
    stride_cb, stride_cc, stride_cp,
    NUM_HEADS, N_CTX, NUM_PREFIX, HEAD_DIM,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Grid (cdiv(P, BLOCK_N), cdiv(C, BLOCK_C), B). CLS[b, c, j] = mean_h exp(scale q_{h,c}·k_{h,C+j} − lse_{h,c}).

    The head sum runs inside the program (fixed order): deterministic, no atomics. Only C rows per head are
    touched, so this is C×N work, negligible next to the N×N forward."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # patch index j
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    for h in range(0, NUM_HEADS):
        q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_c, offs_d, stride_qn, stride_qd, NUM_PREFIX,
                       HEAD_DIM, True, EVEN_D)
        k = _load_rows(K + b * stride_kb + h * stride_kh, NUM_PREFIX + offs_p, offs_d, stride_kn, stride_kd,
                       N_CTX, HEAD_DIM, True, EVEN_D)
        lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_c * stride_ln, mask=offs_c < NUM_PREFIX, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        acc += tl.math.exp2(qk - (lse * 1.4426950408889634)[:, None])
    acc = acc / NUM_HEADS
    ptrs = CLS + b * stride_cb + offs_c[:, None] * stride_cc + offs_p[None, :] * stride_cp
    tl.store(ptrs, acc, mask=(offs_c < NUM_PREFIX)[:, None] & (offs_p < N_CTX - NUM_PREFIX)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_lb, stride_lh, stride_ln,
    NUM_HEADS, N_CTX, HEAD_DIM,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B*H). DELTA = rowsum(O ∘ dO) − dLSE (fp32, contiguous (B, H, N)).

    Folding the LSE cotangent in here is exact: ∂lse_i/∂s_ij = P_ij, so
    dS_ij = P_ij (dP_ij − Delta_i + dlse_i)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_HEADS).to(tl.int64)
    h = (pid_bh % NUM_HEADS).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_on, stride_od, N_CTX, HEAD_DIM,
                   True, False).to(tl.float32)
    do = _load_rows(DO + b * stride_gb + h * stride_gh, offs_m, offs_d, stride_gn, stride_gd, N_CTX, HEAD_DIM,
                    True, False).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b * stride_lb + h * stride_lh + offs_m * stride_ln, mask=offs_m < N_CTX, other=0.0)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_CTX + offs_m, delta, mask=offs_m < N_CTX)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                    stride_qn, stride_qd, stride_gn, stride_gd, stride_ln,
                    offs_d, start, end, N_CTX, HEAD_DIM, qk_scale,
                    BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, MASK_M: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [start, end) (tutorial 06 ``_attn_bwd_dkdv``)."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, offs_d, stride_qn, stride_qd, N_CTX, HEAD_DIM, MASK_M, EVEN_D)
        do = _load_rows(do_base, offs_m, offs_d, stride_gn, stride_gd, N_CTX, HEAD_DIM, MASK_M, EVEN_D)
        lse2 = _load_vec(lse_base, offs_m, stride_ln, N_CTX, MASK_M) * 1.4426950408889634
        delta = _load_vec(delta_base, offs_m, 1, N_CTX, MASK_M)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT - lse2[None, :])
        if MASK_M:
            pT = tl.where((offs_m < N_CTX)[None, :], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(configs=_configs("dkdv"), key=["N_CTX", "HEAD_DIM", "DOT_PREC"],
                 prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.heuristics({"EVEN_M": _even("N_CTX", "BLOCK_M"), "EVEN_N": _even("N_CTX", "BLOCK_N")})
@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_lb, stride_lh, stride_ln,
    NUM_HEADS, N_CTX, HEAD_DIM,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), B*H): one program per key block, looping over all query blocks. DK/DV are
    contiguous (B, H, N, d); each element has exactly one writer."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_HEADS).to(tl.int64)
    h = (pid_bh % NUM_HEADS).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    MASK_N: tl.constexpr = not EVEN_N

    k = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, N_CTX, HEAD_DIM,
                   MASK_N, EVEN_D)
    v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, stride_vd, N_CTX, HEAD_DIM,
                   MASK_N, EVEN_D)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_gb + h * stride_gh
    lse_base = LSE + b * stride_lb + h * stride_lh
    delta_base = DELTA + pid_bh.to(tl.int64) * N_CTX
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_full = (N_CTX // BLOCK_M) * BLOCK_M
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_qd,
                             stride_gn, stride_gd, stride_ln, offs_d, 0, m_full, N_CTX, HEAD_DIM, qk_scale,
                             BLOCK_M, EVEN_D, False, DOT_PREC)
    if not EVEN_M:
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_qd,
                                 stride_gn, stride_gd, stride_ln, offs_d, m_full, N_CTX, N_CTX, HEAD_DIM, qk_scale,
                                 BLOCK_M, EVEN_D, True, DOT_PREC)
    dk = dk * sm_scale  # s = scale · q·k
    out_off = pid_bh.to(tl.int64) * N_CTX * HEAD_DIM
    _store_rows(DK + out_off, dk.to(DK.dtype.element_ty), offs_n, offs_d, HEAD_DIM, 1, N_CTX, HEAD_DIM,
                MASK_N, EVEN_D)
    _store_rows(DV + out_off, dv.to(DV.dtype.element_ty), offs_n, offs_d, HEAD_DIM, 1, N_CTX, HEAD_DIM,
                MASK_N, EVEN_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  offs_d, start, end, N_CTX, HEAD_DIM, qk_scale,
                  BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, end) (tutorial 06 ``_attn_bwd_dq``)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, N_CTX, HEAD_DIM, MASK_N, EVEN_D)
        v = _load_rows(v_base, offs_n, offs_d, stride_vn, stride_vd, N_CTX, HEAD_DIM, MASK_N, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if MASK_N:
            p = tl.where((offs_n < N_CTX)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=_configs("dq"), key=["N_CTX", "HEAD_DIM", "DOT_PREC"],
                 prune_configs_by={"early_config_prune": _prune_dq})
@triton.heuristics({"EVEN_M": _even("N_CTX", "BLOCK_M"), "EVEN_N": _even("N_CTX", "BLOCK_N")})
@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, sm_scale, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_lb, stride_lh, stride_ln,
    NUM_HEADS, N_CTX, HEAD_DIM,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B*H): one program per query block, looping over all key blocks. DQ is contiguous
    (B, H, N, d)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_HEADS).to(tl.int64)
    h = (pid_bh % NUM_HEADS).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    MASK_M: tl.constexpr = not EVEN_M

    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, N_CTX, HEAD_DIM,
                   MASK_M, EVEN_D)
    do = _load_rows(DO + b * stride_gb + h * stride_gh, offs_m, offs_d, stride_gn, stride_gd, N_CTX, HEAD_DIM,
                    MASK_M, EVEN_D)
    lse2 = _load_vec(LSE + b * stride_lb + h * stride_lh, offs_m, stride_ln, N_CTX, MASK_M) * 1.4426950408889634
    delta = _load_vec(DELTA + pid_bh.to(tl.int64) * N_CTX, offs_m, 1, N_CTX, MASK_M)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N_CTX // BLOCK_N) * BLOCK_N
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_d, 0, n_full, N_CTX, HEAD_DIM, qk_scale, BLOCK_N, EVEN_D, False, DOT_PREC)
    if not EVEN_N:
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                           offs_d, n_full, N_CTX, N_CTX, HEAD_DIM, qk_scale, BLOCK_N, EVEN_D, True, DOT_PREC)
    dq = dq * sm_scale
    _store_rows(DQ + pid_bh.to(tl.int64) * N_CTX * HEAD_DIM, dq.to(DQ.dtype.element_ty), offs_m, offs_d,
                HEAD_DIM, 1, N_CTX, HEAD_DIM, MASK_M, EVEN_D)


# ----------------------------------------------------------------------------------------------------------------
# Attention-apply from the saved LSE (CAM refinement)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _apply_inner(acc, q, lse2, k_base, val_base, stride_kn, stride_kd, stride_vk, stride_vp, offs_d, offs_v,
                 start, end, NUM_PREFIX, NUM_PATCHES, NUM_VALUES, HEAD_DIM, qk_scale,
                 BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASK_N: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    for start_j in range(start, end, BLOCK_N):
        offs_j = start_j + tl.arange(0, BLOCK_N)  # patch columns
        k = _load_rows(k_base, NUM_PREFIX + offs_j, offs_d, stride_kn, stride_kd, NUM_PREFIX + NUM_PATCHES,
                       HEAD_DIM, MASK_N, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])  # softmax row over ALL N columns, restricted to patch columns
        val_ptrs = val_base + offs_j[:, None] * stride_vp + offs_v[None, :] * stride_vk  # (BLOCK_N, BLOCK_K)
        if MASK_N:
            p = tl.where((offs_j < NUM_PATCHES)[None, :], p, 0.0)
            vals = tl.load(val_ptrs, mask=(offs_j < NUM_PATCHES)[:, None] & (offs_v < NUM_VALUES)[None, :], other=0.0)
        else:
            vals = tl.load(val_ptrs, mask=(offs_v < NUM_VALUES)[None, :], other=0.0)
        acc = tl.dot(p, vals.to(tl.float32), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _attention_apply_kernel(
    Q, K, LSE, VAL, W, OUT, qk_scale,
    stride_ql, stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kl, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ll, stride_lb, stride_lh, stride_ln,
    stride_vb, stride_vk, stride_vp,
    stride_outb, stride_outk, stride_outp,
    NUM_LAYERS, NUM_HEADS, NUM_PREFIX, NUM_PATCHES, NUM_VALUES, HEAD_DIM,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_P: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (cdiv(P, BLOCK_M), cdiv(K, BLOCK_K), B).
    OUT[b, k, i] = 1/(L·H) Σ_l w_l Σ_h Σ_j exp(scale q_{l,h,C+i}·k_{l,h,C+j} − lse_{l,h,C+i}) · VAL[b, k, j]
    (i, j < P). Layers and heads are summed inside the program in a fixed order (deterministic). P @ VAL runs on
    fp32 operands: exact IEEE under the interpreter / for fp32 q without TF32, TF32 tensor cores for fp16/bf16
    q/k on a GPU (whose logits are no more precise than that anyway)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # patch rows
    offs_v = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # value channels
    offs_d = tl.arange(0, BLOCK_D)
    n_ctx = NUM_PREFIX + NUM_PATCHES
    p_full = (NUM_PATCHES // BLOCK_N) * BLOCK_N
    val_base = VAL + b * stride_vb
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    # Per-layer base pointers advance by the layer strides (pointer arithmetic is 64-bit).
    q_layer = Q + b * stride_qb
    k_layer = K + b * stride_kb
    l_layer = LSE + b * stride_lb
    for layer in range(0, NUM_LAYERS):
        acc_l = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for h in range(0, NUM_HEADS):
            q = _load_rows(q_layer + h * stride_qh, NUM_PREFIX + offs_i, offs_d,
                           stride_qn, stride_qd, n_ctx, HEAD_DIM, True, EVEN_D)
            lse2 = tl.load(l_layer + h * stride_lh + (NUM_PREFIX + offs_i) * stride_ln,
                           mask=offs_i < NUM_PATCHES, other=0.0) * 1.4426950408889634
            k_base = k_layer + h * stride_kh
            acc_l = _apply_inner(acc_l, q, lse2, k_base, val_base, stride_kn, stride_kd, stride_vk, stride_vp,
                                 offs_d, offs_v, 0, p_full, NUM_PREFIX, NUM_PATCHES, NUM_VALUES, HEAD_DIM, qk_scale,
                                 BLOCK_N, EVEN_D, False, DOT_PREC)
            if not EVEN_P:
                acc_l = _apply_inner(acc_l, q, lse2, k_base, val_base, stride_kn, stride_kd, stride_vk, stride_vp,
                                     offs_d, offs_v, p_full, NUM_PATCHES, NUM_PREFIX, NUM_PATCHES, NUM_VALUES,
                                     HEAD_DIM, qk_scale, BLOCK_N, EVEN_D, True, DOT_PREC)
        acc += acc_l * tl.load(W + layer)
        q_layer += stride_ql
        k_layer += stride_kl
        l_layer += stride_ll
    acc = acc / (NUM_LAYERS * NUM_HEADS)
    ptrs = OUT + b * stride_outb + offs_v[None, :] * stride_outk + offs_i[:, None] * stride_outp
    tl.store(ptrs, acc, mask=(offs_i < NUM_PATCHES)[:, None] & (offs_v < NUM_VALUES)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops (traceable by torch.compile on CUDA: only torch ops + wrapped kernels inside)
# ----------------------------------------------------------------------------------------------------------------
def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision. fp16/bf16 operands: tensor cores, whatever the string ("ieee" is ignored).
    fp32 operands: exact IEEE fp32 (always under the interpreter, so tests match eager), TF32 tensor cores on a
    GPU only when the user allowed TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32`` /
    ``torch.set_float32_matmul_precision("high")``). The IEEE fp32 path is correct but slow (FMA, spills);
    AMP (fp16/bf16) is the intended GPU use."""
    if dtype == torch.float32 and not _interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    if dtype != torch.float32 and not _interpreting():
        return "tf32"  # ignored for 16-bit operands; only the P @ values fp32 dot of attention-apply uses it
    return "ieee"


def _small_block(n: int, cap: int) -> int:
    """Power-of-two block ≥ 16 for the non-autotuned kernels (16 under the interpreter)."""
    if _SKIP_AUTOTUNE:
        return 16
    return min(cap, max(16, triton.next_power_of_2(n)))


@triton_op("aream_fast::flash_attention_fwd", mutates_args={})
def _flash_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, num_prefix_tokens: int,
    with_class_attention: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (O (B,H,N,d) in q.dtype, lse (B,H,N) fp32 natural log, class attention (B,C,P) fp32 or (B,0,P))."""
    B, H, N, D = q.shape
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    block_d = _block_d(D)
    qk_scale = scale * _LOG2E
    prec = _dot_precision(q.dtype)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * H)

    wrap_triton(_flash_fwd_kernel)[grid](
        q, k, v, o, lse, qk_scale,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        o.stride(0), o.stride(1), o.stride(2), o.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        H, N, D,
        BLOCK_D=block_d, EVEN_D=(D == block_d), DOT_PREC=prec,
    )
    C = num_prefix_tokens if with_class_attention else 0
    return o, lse, _class_attention(q, k, lse, scale, C, N - num_prefix_tokens)


def _class_attention(q, k, lse, scale: float, C: int, P: int) -> torch.Tensor:
    """(B, C, P) fp32 class-attention rows from the row LSE (called inside the triton_ops)."""
    B, H, N, D = q.shape
    cls = torch.empty((B, C, P), dtype=torch.float32, device=q.device)
    if C > 0 and P > 0:
        block_d = _block_d(D)
        prec = _dot_precision(q.dtype)
        block_c = _small_block(C, 64)
        block_n = _small_block(P, 64)
        wrap_triton(_class_attn_kernel)[(triton.cdiv(P, block_n), triton.cdiv(C, block_c), B)](
            q, k, lse, cls, scale * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2), q.stride(3),
            k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            lse.stride(0), lse.stride(1), lse.stride(2),
            cls.stride(0), cls.stride(1), cls.stride(2),
            H, N, C, D,
            BLOCK_D=block_d, EVEN_D=(D == block_d), BLOCK_C=block_c, BLOCK_N=block_n, DOT_PREC=prec,
            num_warps=8 if prec == "ieee" else 4,  # exact fp32 spills with 4 warps (sm_90 sweep)
        )
    return cls


@triton_op("aream_fast::class_attention_from_lse", mutates_args={})
def _class_attention_from_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float,
                              num_prefix_tokens: int) -> torch.Tensor:
    """q, k (B,H,N,d), lse (B,H,N) fp32 natural log -> (B, C, P) fp32 (no autograd: an export)."""
    return _class_attention(q, k, lse, scale, num_prefix_tokens, q.shape[2] - num_prefix_tokens)


@triton_op("aream_fast::flash_attention_bwd", mutates_args={})
def _flash_attention_bwd(
    grad_o: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), contiguous (B,H,N,d) in q.dtype. grad_lse (B,H,N) or None."""
    B, H, N, D = q.shape
    block_d = _block_d(D)
    qk_scale = scale * _LOG2E
    prec = _dot_precision(q.dtype)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    pre_block = 16 if _SKIP_AUTOTUNE else 64
    has_dlse = grad_lse is not None
    dlse = grad_lse if has_dlse else lse  # placeholder pointer when absent (never read)
    wrap_triton(_bwd_preprocess_kernel)[(triton.cdiv(N, pre_block), B * H)](
        o, grad_o, dlse, delta,
        o.stride(0), o.stride(1), o.stride(2), o.stride(3),
        grad_o.stride(0), grad_o.stride(1), grad_o.stride(2), grad_o.stride(3),
        dlse.stride(0), dlse.stride(1), dlse.stride(2),
        H, N, D,
        BLOCK_D=block_d, BLOCK_M=pre_block, HAS_DLSE=has_dlse, num_warps=4,
    )
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, N, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, N, D), dtype=v.dtype, device=q.device)
    common = (
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        grad_o.stride(0), grad_o.stride(1), grad_o.stride(2), grad_o.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        H, N, D,
    )

    def grid_n(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), B * H)

    def grid_m(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * H)

    wrap_triton(_flash_bwd_dkdv_kernel)[grid_n](
        q, k, v, grad_o, lse, delta, dk, dv, scale, qk_scale, *common, BLOCK_D=block_d, EVEN_D=(D == block_d),
        DOT_PREC=prec,
    )
    wrap_triton(_flash_bwd_dq_kernel)[grid_m](
        q, k, v, grad_o, lse, delta, dq, scale, qk_scale, *common, BLOCK_D=block_d, EVEN_D=(D == block_d),
        DOT_PREC=prec,
    )
    return dq, dk, dv


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, scale, _num_prefix_tokens, _with_cls = inputs
    o, lse, cls = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(cls)


def _fwd_backward(ctx, grad_o, grad_lse, _grad_cls):
    q, k, v, o, lse = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dq, dk, dv = _flash_attention_bwd(grad_o, grad_lse, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None, None, None


_flash_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@triton_op("aream_fast::attention_apply", mutates_args={})
def _attention_apply(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, values: torch.Tensor, layer_weights: torch.Tensor,
    scale: float, num_prefix_tokens: int,
) -> torch.Tensor:
    """q, k (L,B,H,N,d), lse (L,B,H,N), values (B,K,P), layer_weights (L,) fp32 -> (B, K, P) fp32:
    1/L Σ_l w_l · mean_h softmax(scale q kᵀ)[C:, C:] @ valuesᵀ (no autograd)."""
    L, B, H, N, D = q.shape
    K_vals = values.shape[1]
    P = N - num_prefix_tokens
    out = torch.empty((B, K_vals, P), dtype=torch.float32, device=q.device)
    if P == 0 or K_vals == 0:
        return out
    block_d = _block_d(D)
    block_m = 16 if _SKIP_AUTOTUNE else 64
    block_n = 16 if _SKIP_AUTOTUNE else 32
    block_k = _small_block(K_vals, 32)
    wrap_triton(_attention_apply_kernel)[(triton.cdiv(P, block_m), triton.cdiv(K_vals, block_k), B)](
        q, k, lse, values, layer_weights, out, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3), q.stride(4),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3), k.stride(4),
        lse.stride(0), lse.stride(1), lse.stride(2), lse.stride(3),
        values.stride(0), values.stride(1), values.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        L, H, num_prefix_tokens, P, K_vals, D,
        BLOCK_D=block_d, EVEN_D=(D == block_d), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_P=(P % block_n == 0), DOT_PREC=_dot_precision(q.dtype),
        num_warps=8,  # 4 warps spill at d=64 (checked with ptxas for sm_90)
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Public entry points (validation happens here, outside the ops, so the ops stay traceable)
# ----------------------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and _interpreting():
        return
    raise ValueError(f"{name} must be a CUDA tensor (CPU only under TRITON_INTERPRET=1); got device {t.device}")


def _check_qk(q: torch.Tensor, k: torch.Tensor, scale, num_prefix_tokens) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, N, d) tensor; got shape "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32; got {t.dtype}")
        _check_device(name, t)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}; got {tuple(k.shape)}")
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k must match q's dtype/device ({q.dtype}, {q.device}); got ({k.dtype}, {k.device})")
    B, H, N, D = q.shape
    if N == 0 or D == 0 or B == 0 or H == 0:
        raise ValueError(f"q must have non-empty B, H, N, d; got shape {tuple(q.shape)}")
    if D > _MAX_HEAD_DIM:
        raise ValueError(f"head dim d must be <= {_MAX_HEAD_DIM}; got q of shape {tuple(q.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float (usually d ** -0.5); got {scale!r}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) \
            or not 0 <= num_prefix_tokens <= N:
        raise ValueError(f"num_prefix_tokens must be an int in [0, N={N}]; got {num_prefix_tokens!r}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, num_prefix_tokens: int = 0,
                    return_lse: bool = False, return_class_attention: bool = False):
    """Softmax attention O = softmax(scale · q kᵀ) v (no mask) with FlashAttention-2 kernels.

    Args:
        q, k, v: (B, H, N, d), same shape, dtype (float16 / bfloat16 / float32) and device (CUDA, or CPU under
            ``TRITON_INTERPRET=1``); any strides. d <= 128.
        scale: logit scale, usually d ** -0.5.
        num_prefix_tokens: C, the class/prefix tokens at the front of the sequence (P = N − C patches).
        return_lse: also return the row log-sum-exp.
        return_class_attention: also return the head-mean class-token attention over patch columns.

    Returns:
        O (B, H, N, d) in q.dtype, contiguous, if neither flag is set; otherwise the tuple
        ``(O, lse, class_attention)`` where
          lse: (B, H, N) float32, natural log: lse[b,h,i] = log Σ_j exp(scale q_i·k_j), or None if not asked;
          class_attention: (B, C, P) float32, class_attention[b,c,j] = mean_h softmax(scale q kᵀ)[h, c, C+j],
            or None if not asked ((B, 0, P) when C = 0).
        O is differentiable w.r.t. q, k, v (and lse too, exactly); class_attention is not differentiable.
    """
    _check_qk(q, k, scale, num_prefix_tokens)
    if not isinstance(v, torch.Tensor) or v.shape != q.shape:
        raise ValueError(f"v must have the shape of q {tuple(q.shape)}; got "
                         f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    if v.dtype != q.dtype or v.device != q.device:
        raise ValueError(f"v must match q's dtype/device ({q.dtype}, {q.device}); got ({v.dtype}, {v.device})")
    o, lse, cls = _flash_attention_fwd(q, k, v, float(scale), int(num_prefix_tokens), bool(return_class_attention))
    if not return_lse and not return_class_attention:
        return o
    return o, (lse if return_lse else None), (cls if return_class_attention else None)


def class_attention_from_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, scale: float,
                             num_prefix_tokens: int) -> torch.Tensor:
    """Head-mean class-token attention over the patch columns from a row log-sum-exp computed elsewhere.

    For layers that need only the LSE (docs/semantics.md, Fast path item 6), another attention implementation can run the layer
    (e.g. PyTorch's flash SDPA, ``torch.ops.aten._scaled_dot_product_flash_attention``, whose ``logsumexp``
    output is this LSE) and this kernel adds the class attention ``flash_attention(...,
    return_class_attention=True)`` would return.

    Args:
        q, k: (B, H, N, d) fp16/bf16/fp32, any strides (views of a packed qkv work).
        lse: (B, H, N) fp32, natural-log row log-sum-exp of ``scale * q k^T`` (the last dim may be padded:
            only the first N entries are read).
        num_prefix_tokens: C class tokens in front of the P = N - C patches.

    Returns:
        (B, C, P) fp32: ``mean_h softmax(scale q k^T)[:, h, :C, C:]``; not differentiable.
    """
    _check_qk(q, k, scale, num_prefix_tokens)
    B, H, N, _ = q.shape
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or lse.dim() != 3 \
            or tuple(lse.shape[:2]) != (B, H) or lse.shape[2] < N:
        got = (tuple(lse.shape), lse.dtype) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be float32 of shape (B, H, N) = {(B, H, N)} (last dim may be padded); got {got}")
    for name, t in (("q", q), ("k", k), ("lse", lse)):
        _check_device(name, t)
    return _class_attention_from_lse(q, k, lse, float(scale), int(num_prefix_tokens))


def attention_apply_triton(q, k, lse, values: torch.Tensor, *, scale: float, num_prefix_tokens: int,
                           layer_weights=None) -> torch.Tensor:
    """Mean over layers and heads of the patch block of the attention applied to per-patch values, from the
    saved LSE (docs/semantics.md, Fast path item 5: R·cam without any N×N matrix).

    out[b, :, i] = 1/L Σ_l w_l · (1/H) Σ_h Σ_{j<P} softmax(scale q_{l,h} k_{l,h}ᵀ)[C+i, C+j] · values[b, :, j]
    i.e. out = mean_l w_l · mean_h softmax(Z)[C:, C:] @ valuesᵀ, in the values layout; weights are not
    renormalised (official CAM refinement). The softmax runs over all N columns (prefix columns included), exactly
    as the official R = attention[C:, C:].

    Args:
        q, k: one layer's (B, H, N, d) queries/keys, or L layers as a sequence of them or a stacked
            (L, B, H, N, d) tensor; float16/bfloat16/float32.
        lse: the matching float32 natural-log row LSE, (B, H, N), a sequence of them, or (L, B, H, N), from
            ``flash_attention(..., return_lse=True)`` with the same q, k, scale (or any exact LSE, e.g. SDPA's).
        values: (B, K, P) float tensor (e.g. CAMs flattened over patches), P = N − C.
        scale: logit scale used for lse.
        num_prefix_tokens: C.
        layer_weights: None (all 1) or L floats (sequence or tensor).

    Returns:
        (B, K, P) float32: the mean over layers and heads (not per head). Not differentiable (meant for no-grad
        CAM refinement). Sequences are stacked (one copy of q/k, O(L·N·d)); pass stacked tensors to avoid it.
    """
    def stacked(name, x, dims):
        if isinstance(x, (list, tuple)):
            if not x or not all(isinstance(t, torch.Tensor) and t.dim() == dims for t in x):
                got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in x]
                raise ValueError(f"{name} as a sequence must hold at least one tensor, each with {dims} dims; "
                                 f"got {got}")
            return torch.stack(list(x))
        if isinstance(x, torch.Tensor) and x.dim() == dims:
            return x.unsqueeze(0)
        if isinstance(x, torch.Tensor) and x.dim() == dims + 1:
            return x
        raise ValueError(f"{name} must be a {dims}-dim tensor, a stacked {dims + 1}-dim tensor or a sequence; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")

    q, k, lse = stacked("q", q, 4), stacked("k", k, 4), stacked("lse", lse, 3)
    L = q.shape[0]
    if k.shape[0] != L or lse.shape[0] != L:
        raise ValueError(f"q, k and lse must hold the same number of layers; got {q.shape[0]}, {k.shape[0]}, "
                         f"{lse.shape[0]}")
    _check_qk(q[0], k[0], scale, num_prefix_tokens)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}; got {tuple(k.shape)}")
    _, B, H, N, _ = q.shape
    if tuple(lse.shape[1:]) != (B, H, N) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 of shape (B, H, N) = {(B, H, N)} per layer; got "
                         f"{tuple(lse.shape)} {lse.dtype}")
    P = N - num_prefix_tokens
    if not isinstance(values, torch.Tensor) or values.dim() != 3 or values.shape[0] != B or values.shape[2] != P:
        raise ValueError(f"values must be a (B, K, P) tensor with B={B}, P=N-num_prefix_tokens={P}; got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    if values.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"values must be float16, bfloat16 or float32; got {values.dtype}")
    if lse.device != q.device or values.device != q.device:
        raise ValueError(f"lse and values must be on q's device {q.device}; got {lse.device} and {values.device}")
    if layer_weights is None:
        weights = torch.ones(L, dtype=torch.float32, device=q.device)
    else:
        weights = torch.as_tensor(layer_weights, dtype=torch.float32).to(q.device).reshape(-1)
        if weights.numel() != L:
            raise ValueError(f"layer_weights must hold one weight per layer (L={L}); got {weights.numel()}")
    return _attention_apply(q, k, lse, values, weights, float(scale), int(num_prefix_tokens))
