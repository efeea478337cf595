"""Tiled PyTorch backend of the AReAM affinity loss: no P x P tensor, gradients computed in the forward.

Math (docs/semantics.md, "Fast path"; official loss in docs/semantics.md, "Affinity loss"). Per supervised layer l, with
merged heads
``Q = concat_h q_h[C:]`` and ``K = concat_h k_h[C:]`` (B x P x H*d), the head mean of the pre-softmax
patch logits is one matmul, ``Zbar = (scale / H) * Q K^T``, and ``S = sigmoid(Zbar)``. With the batch-global
counts ``n_pos``, ``n_neg`` (``aream_fast.pseudo_labels.patch_labels.pair_counts``), ``a = 0.5 / n_pos``, ``b = 0.5 / n_neg``
and the per-pair coefficient::

    coef_ij = -a  if y_i == y_j (both valid),   +b  if y_i != y_j (both valid),   0  if either is ignored

the official loss is ``L_l = a * (n_pos - 1) + sum_ij coef_ij * S_ij`` and its logit gradient is
``dL_l / dZbar = coef * S * (1 - S)``. So ``dQ = (scale / H) * G K`` and ``dK = (scale / H) * G^T Q`` with
``G = (w_l / L) * coef * S * (1 - S)``. The loss is ``(1 / L) * sum_l w_l * L_l``.

Implementation: layers outer, row tiles of ``rows`` patches inner. Per tile: one ``baddbmm`` for the logit
tile, in-place sigmoid, a dot with the coefficient tile (the loss), then -- when a gradient is needed --
``G`` in place and two more matmuls (dQ rows, dK accumulation). That is 3 matmuls per layer for forward +
backward instead of 4 (forward, then recompute in backward): the gradients are computed in the forward, as
Liger-Kernel's fused linear cross-entropy does, and the backward only scales them by the incoming gradient.
Under ``torch.no_grad`` (or when nothing requires grad) only the loss is computed.

Ignored patches have a zero coefficient on their whole row and column, so when every image of the batch
has some, each image's valid patches are gathered to the front and only the first ``M = max_b V_b``
positions are computed ((M / P)^2 of the work); the gradients are scattered back (zero for ignored rows).

The pair label / coefficient of a tile is rebuilt from the (B, P) patch labels, so the largest temporaries
are a few (B, rows, P) tiles (about 16 MiB each) plus, per layer, a merged-head copy of K and an fp32 accumulator
for dK (B, P, H*d) -- the copies are free views when q, k come straight out of a fused qkv projection (timm).

The tiled loop is one opaque ``torch.library.custom_op`` (``aream_fast::aream_loss_tiled_fwd``, returning the
loss and the per-layer gradients) with ``register_fake`` and ``register_autograd`` (whose backward is a plain
scaling of the saved gradients): ``torch.compile(fullgraph=True)`` traces it as a single node (a tiled
``torch.autograd.Function`` made inductor emit a broken backward). Because the gradients are made
in the forward, a loss evaluated with grad enabled but never backpropagated costs the full 3 matmuls per layer;
evaluate such losses under ``torch.no_grad()``.

Accumulation is fp32 for fp16 / bf16 / fp32 inputs and fp64 for fp64 inputs; gradients are returned in the
input dtype, the loss in the accumulation dtype.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from aream_fast.losses.pairs import pair_counts
from aream_fast.models.records import acc_dtype

__all__ = ["aream_loss_tiled", "tile_rows"]

# Target size of one (B, rows, P) fp32 tile. Measured on the 2-core CPU (B=8, N=785, 5 layers, 2 threads,
# machine shared): 4 / 8 / 16 MiB tiles took 3.0 / 2.1 / 1.6 s per forward + backward -- fewer, larger ops win
# when the cores are contended -- for 77 / 77 / 93 MiB of working memory (reference: 2.3 GiB).
_TILE_BYTES = int(os.environ.get("AREAM_FAST_TILE_BYTES", 16 << 20))


# Skip the ignored patches (gather / scatter, see above) only when at most this fraction of the positions
# remains: below it the saved matmul work outweighs the gather and scatter passes.
_COMPACT_BELOW = 0.95


def tile_rows(batch: int, num_patches: int, element_size: int = 4, tile_bytes: Optional[int] = None) -> int:
    """Rows per tile so that a (batch, rows, num_patches) tile takes about ``tile_bytes`` bytes
    (default: the module's ``_TILE_BYTES``, env ``AREAM_FAST_TILE_BYTES``, 16 MiB).

    At least 8 rows (or all of them when fewer), at most ``num_patches``, a multiple of 8 otherwise.
    """
    tile_bytes = _TILE_BYTES if tile_bytes is None else tile_bytes
    rows = tile_bytes // max(1, batch * num_patches * element_size)
    rows = max(8, (rows // 8) * 8)
    return min(rows, num_patches)


def _merged_patches(x: Tensor, start: int, stop: int, acc: torch.dtype) -> Tensor:
    """(B, H, N, d) -> (B, stop - start, H*d) merged heads of tokens [start, stop).

    A view when the heads are adjacent in memory (q, k sliced out of a fused qkv projection), else a copy.
    """
    rows = x.transpose(1, 2)[:, start:stop]
    merged = rows.reshape(rows.shape[0], rows.shape[1], rows.shape[2] * rows.shape[3])
    if merged.stride(-1) != 1:
        merged = merged.contiguous()
    return merged.to(acc)


def _token_rows(x: Tensor) -> Optional[Tensor]:
    """(B, H, N, d) -> (B*N, H*d) merged-head token rows as a view, when the heads of a token are adjacent in
    memory and tokens are evenly spaced (q, k of a fused qkv projection, as timm and our models make them);
    None otherwise."""
    b, h, n, d = x.shape
    s0, s1, s2, s3 = x.stride()
    if (s3 == 1 or d == 1) and (s1 == d or h == 1) and (s0 == n * s2 or b == 1):
        return x.transpose(1, 2).reshape(b * n, h * d)  # a view under these strides
    return None


def _validate_op_inputs(qs: Sequence[Tensor], ks: Sequence[Tensor], layer_weights: Tensor) -> None:
    # The public entry point (aream_fast.losses.aream) validates everything; this only protects direct op calls.
    if len(qs) == 0 or len(qs) != len(ks) or layer_weights.numel() != len(qs):
        raise ValueError(
            f"aream_fast::aream_loss_tiled needs equally many qs, ks and layer_weights, got "
            f"{len(qs)}, {len(ks)} and {layer_weights.numel()}"
        )


@torch.library.custom_op("aream_fast::aream_loss_tiled_fwd", mutates_args=())
def _aream_loss_tiled_fwd(
    qs: List[Tensor],
    ks: List[Tensor],
    patch_labels: Tensor,
    layer_weights: Tensor,
    scale: float,
    num_prefix_tokens: int,
    ignore_index: int,
    compute_grad: bool,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Loss (0-dim, accumulation dtype) and, if ``compute_grad``, dL/dq and dL/dk per layer ((B, H, N, d),
    input dtype; zero on the prefix rows). See the module docstring for the math."""
    _validate_op_inputs(qs, ks, layer_weights)
    num_layers = len(qs)
    batch, heads, tokens, head_dim = qs[0].shape
    c = num_prefix_tokens
    num_patches = tokens - c
    width = heads * head_dim
    device = qs[0].device
    acc = acc_dtype(qs[0].dtype)

    labels = patch_labels.to(device=device, dtype=torch.int64)
    n_pos, n_neg = pair_counts(labels, ignore_index=ignore_index)
    a = 0.5 / float(n_pos)
    b = 0.5 / float(n_neg)

    # Ignored patches contribute nothing (coefficient 0 on their whole row and column). When every image
    # has some, move each image's valid patches to the front (stable order) and work on the first
    # M = max_b V_b positions only: (M / P)^2 of the matmul work. Positions past V_b in image b are its
    # ignored patches, so they still carry the ignore label and a zero coefficient.
    valid_mask = labels != ignore_index
    m = int(valid_mask.sum(dim=1).max())
    compact = m < num_patches * _COMPACT_BELOW
    if compact:
        m = max(m, 1)  # all patches ignored: keep one (ignored) position so that shapes stay non-empty
        order = torch.argsort((~valid_mask).to(torch.int8), dim=1, stable=True)[:, :m]  # (B, M)
        labels = labels.gather(1, order)
        # row of each compacted position in the (B*N, H*d) token rows of q, k and their gradients
        flat_rows = order + (torch.arange(batch, device=device) * tokens + c).unsqueeze(1)  # (B, M)
        batch_index = torch.arange(batch, device=device).unsqueeze(1)
    else:
        m = num_patches

    def patch_rows(x: Tensor, r0: int, r1: int) -> Tensor:
        """Merged heads (B, r1 - r0, H*d) of (compacted) patch positions [r0, r1) of x (B, H, N, d)."""
        if not compact:
            return _merged_patches(x, c + r0, c + r1, acc)
        token_rows = _token_rows(x)
        if token_rows is not None:  # one contiguous row per patch: a plain row gather
            picked = token_rows.index_select(0, flat_rows[:, r0:r1].reshape(-1))  # (B*(r1 - r0), H*d)
        else:
            picked = x.transpose(1, 2)[:, c:][batch_index, order[:, r0:r1]]  # (B, r1 - r0, H, d), a copy
        return picked.reshape(batch, r1 - r0, width).to(acc)

    def write_rows(grad: Tensor, r0: int, r1: int, rows_grad: Tensor) -> None:
        """grad (B, H, N, d) patch positions [r0, r1) <- rows_grad (B, r1 - r0, H*d)."""
        src = rows_grad.view(batch, r1 - r0, heads, head_dim)
        if compact:
            grad.transpose(1, 2)[:, c:][batch_index, order[:, r0:r1]] = src.to(grad.dtype)
        else:
            grad[:, :, c + r0 : c + r1].copy_(src.transpose(1, 2))

    valid = (labels != ignore_index).to(acc)  # (B, M)
    row_same = (-a) * valid  # coefficient of a same-label pair, by row (0 for ignored rows)
    row_diff = b * valid  # coefficient of a different-label pair, by row
    # Ignored patches may compare equal to each other; their coefficient is zeroed by row_* (rows) and by
    # `valid` (columns).
    weights = [float(w) for w in layer_weights.detach().to("cpu", torch.float64).tolist()]
    logit_scale = scale / heads

    rows = tile_rows(batch, m, torch.finfo(acc).bits // 8)
    tile_numel = batch * rows * m
    z_buf = torch.empty(tile_numel, device=device, dtype=acc)
    coef_buf = torch.empty(tile_numel, device=device, dtype=acc)
    eq_buf = torch.empty(tile_numel, device=device, dtype=torch.bool)
    dq_buf = torch.empty(batch * rows * width if compute_grad else 0, device=device, dtype=acc)
    col_labels = labels.unsqueeze(1)  # (B, 1, M)
    col_valid = valid.unsqueeze(1)  # (B, 1, M)

    dqs: List[Tensor] = []
    dks: List[Tensor] = []
    total = torch.zeros((), device=device, dtype=torch.float64)
    const = a * (float(n_pos) - 1.0)
    for layer in range(num_layers):
        q, k = qs[layer], ks[layer]
        w_layer = weights[layer] / num_layers
        k_all = patch_rows(k, 0, m)  # (B, M, H*d)
        k_t = k_all.transpose(1, 2)  # (B, H*d, M)
        if compute_grad:
            dq = torch.empty(batch, heads, tokens, head_dim, device=device, dtype=q.dtype)
            dk = torch.empty(batch, heads, tokens, head_dim, device=device, dtype=k.dtype)
            if compact:  # rows of ignored patches (and the prefix rows) get no gradient
                dq.zero_()
                dk.zero_()
            elif c:
                dq[:, :, :c].zero_()
                dk[:, :, :c].zero_()
            dk_acc = torch.empty(batch, m, width, device=device, dtype=acc)
            grad_scale = logit_scale * w_layer
        tile_sums: List[Tensor] = []
        for r0 in range(0, m, rows):
            r1 = min(r0 + rows, m)
            t = r1 - r0
            n = batch * t * m
            z = z_buf[:n].view(batch, t, m)
            coef = coef_buf[:n].view(batch, t, m)
            eq = eq_buf[:n].view(batch, t, m)
            # Pair coefficient of this row tile, from the labels (no B x P x P label tensor). It depends on
            # the labels only, so with a single tile it is built once for all layers.
            if rows < m or layer == 0:
                torch.eq(labels[:, r0:r1].unsqueeze(2), col_labels, out=eq)
                torch.where(eq, row_same[:, r0:r1].unsqueeze(2), row_diff[:, r0:r1].unsqueeze(2), out=coef)
                coef.mul_(col_valid)
            # S = sigmoid((scale / H) * Q_rows K^T): the head mean of the pre-softmax patch logits.
            q_rows = patch_rows(q, r0, r1)  # (B, t, H*d)
            z.baddbmm_(q_rows, k_t, beta=0.0, alpha=logit_scale)
            z.sigmoid_()
            tile_sums.append(torch.dot(coef.view(-1), z.view(-1)))
            if compute_grad:
                # G = coef * S * (1 - S), in place; then dQ rows and the dK accumulation.
                z.addcmul_(z, z, value=-1.0)
                z.mul_(coef)
                dq_rows = dq_buf[: batch * t * width].view(batch, t, width)
                dq_rows.baddbmm_(z, k_all, beta=0.0, alpha=grad_scale)  # (B, t, H*d)
                write_rows(dq, r0, r1, dq_rows)
                dk_acc.baddbmm_(z.transpose(1, 2), q_rows, beta=1.0 if r0 else 0.0, alpha=grad_scale)
        total += w_layer * (const + torch.stack(tile_sums).to(torch.float64).sum())
        if compute_grad:
            write_rows(dk, 0, m, dk_acc)
            del dk_acc
            dqs.append(dq)
            dks.append(dk)
    return total.to(acc), dqs, dks


@_aream_loss_tiled_fwd.register_fake
def _aream_loss_tiled_fwd_fake(qs, ks, patch_labels, layer_weights, scale, num_prefix_tokens, ignore_index,
                               compute_grad):
    acc = acc_dtype(qs[0].dtype)
    loss = qs[0].new_empty((), dtype=acc)
    if not compute_grad:
        return loss, [], []
    return loss, [q.new_empty(q.shape) for q in qs], [k.new_empty(k.shape) for k in ks]


def _setup_context(ctx, inputs, output):
    qs, ks, _, _, _, _, _, compute_grad = inputs
    _, dqs, dks = output
    ctx.num_layers = len(qs)
    ctx.has_grads = compute_grad
    # The gradient outputs are not differentiable; without these two lines autograd would materialise
    # zero incoming gradients for them (a full extra copy of every q / k gradient) at backward time.
    ctx.set_materialize_grads(False)
    if compute_grad:
        ctx.mark_non_differentiable(*dqs, *dks)
        ctx.save_for_backward(*dqs, *dks)


def _backward(ctx, grad_loss, grad_dqs, grad_dks):
    if not ctx.has_grads:
        raise RuntimeError(
            "aream_loss (torch backend): the forward ran without gradient computation (torch.no_grad or no "
            "input requiring grad), so it cannot be differentiated"
        )
    if grad_loss is None:  # no gradient flows into the loss (grads are not materialised, see above)
        nothing = [None] * ctx.num_layers
        return nothing, list(nothing), None, None, None, None, None, None
    saved = ctx.saved_tensors
    num_layers = ctx.num_layers
    dqs, dks = list(saved[:num_layers]), list(saved[num_layers:])
    # The forward computed dL/dq, dL/dk for an incoming gradient of 1. Reuse them as they are when that is
    # the case (eager, loss.backward()), which saves a copy of every gradient (Liger FLCE does the same).
    if torch.compiler.is_compiling() or not bool(grad_loss == 1):
        dqs = [g * grad_loss.to(g.dtype) for g in dqs]
        dks = [g * grad_loss.to(g.dtype) for g in dks]
    return dqs, dks, None, None, None, None, None, None


_aream_loss_tiled_fwd.register_autograd(_backward, setup_context=_setup_context)


def aream_loss_tiled(
    qs: Sequence[Tensor],
    ks: Sequence[Tensor],
    patch_labels: Tensor,
    *,
    scale: float,
    num_prefix_tokens: int,
    layer_weights: Tensor,
    ignore_index: int,
) -> Tensor:
    """Tiled torch AReAM loss on already validated inputs.

    Args:
        qs, ks: L tensors of shape (B, H, N, d), one per supervised layer (pre-scale q and k).
        patch_labels: (B, P) int64, P = N - num_prefix_tokens.
        scale: softmax scale (d ** -0.5).
        num_prefix_tokens: C.
        layer_weights: (L,) weights, multiplied in, not renormalised (treated as constants).
        ignore_index: label of ignored patches.

    Returns:
        0-dim loss (fp32, or fp64 for fp64 inputs), differentiable in qs and ks.
    """
    qs, ks = list(qs), list(ks)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in qs + ks)
    loss, _, _ = _aream_loss_tiled_fwd(
        qs, ks, patch_labels, layer_weights, float(scale), int(num_prefix_tokens), int(ignore_index), needs_grad
    )
    return loss
