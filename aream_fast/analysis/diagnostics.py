"""Over-smoothing diagnostics of the per-layer patch affinity of a ViT (AReAM, arXiv 2305.03112, §1 and Fig. 1).

The paper's observation: as training converges, deep layers' attention over-smooths (all tokens attend alike and
foreground attention spills onto background). This module measures that per layer, per image, from the layer's
q, k (``AttentionRecords.qs / ks``), in row chunks: only a (H, chunk, N) block of attention exists at a time, never
a whole N x N matrix (except the optional effective rank, which needs the P x P affinity of one layer of one image
and is skipped above ``rank_max_tokens``).

Definitions (one image; Ā_l = mean over heads of softmax(scale · q_l k_lᵀ) over all N = C + P tokens, as the
official code forms it, docs/semantics.md, "CAM refinement"; R_l = Ā_l[C:, C:] its patch block, whose rows do not sum
to 1; R̃_l = R_l
with each row divided by its sum, the row-stochastic patch affinity):

* ``row_entropy``: mean over patch rows m of −Σ_n R̃[m,n] log₂ R̃[m,n] (bits; log₂ P = uniform attention).
* ``topk_mass``: mean over rows of the mass of the k largest entries of R̃[m,:], k = ceil(topk_fraction · P).
* ``effective_rank``: exp of the Shannon entropy (nats) of the normalised singular values σ_i/Σσ of R̃ (Roy &
  Vetterli 2007); 1 = every row the same (fully over-smoothed), P = full rank. NaN when P > rank_max_tokens.
* ``row_similarity``: mean over pairs m ≠ m' of cos(R̃[m,:], R̃[m',:]): 1 = every token attends the same way.
* ``patch_mass``: mean over rows of Σ_n R[m,n], the share of a patch's attention on patches (vs the C class tokens).
* ``fg_to_bg``: with patch labels (0 bg, k+1 class k, 255 ignore), the mean over foreground rows m of
  Σ_{n bg} R̃[m,n] / Σ_{n not ignored} R̃[m,n]; NaN if the image has no foreground row or no background column.
* ``successive_similarity`` (L−1 values): cosine similarity of the flattened R̃_l and R̃_{l+1}.
* ``fg_attention`` (optional, (L, P)): mean over foreground rows of R̃[m,:], the attention map of the foreground.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

PER_LAYER_METRICS = ("row_entropy", "topk_mass", "effective_rank", "row_similarity", "patch_mass", "fg_to_bg")
SUCCESSIVE_METRICS = ("successive_similarity",)

# bytes of one (H, chunk, N) float32 logits block; the row chunk is chosen to stay under this
_CHUNK_BYTES = 1 << 25


def effective_rank(matrix: Tensor) -> Tensor:
    """exp(−Σ_i p_i ln p_i), p = σ / Σσ, σ the singular values of ``matrix`` (2-D). Returns a 0-dim tensor."""
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
    s = torch.linalg.svdvals(matrix.double())
    total = s.sum()
    if total <= 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    p = s / total
    return torch.exp(-torch.special.xlogy(p, p).sum())


def _check_inputs(qs: Sequence[Tensor], ks: Sequence[Tensor], num_prefix_tokens: int,
                  patch_labels: Optional[Tensor]) -> None:
    if len(qs) == 0 or len(qs) != len(ks):
        raise ValueError(f"qs and ks must be non-empty sequences of equal length, got {len(qs)} and {len(ks)}")
    q0 = qs[0]
    for i, (q, k) in enumerate(zip(qs, ks)):
        if q.dim() != 4 or q.shape != q0.shape or k.shape != q0.shape:
            raise ValueError(f"qs[{i}] and ks[{i}] must be (B, H, N, d) = {tuple(q0.shape)}, got "
                             f"{tuple(q.shape)} and {tuple(k.shape)}")
    n = q0.shape[2]
    if not 0 <= int(num_prefix_tokens) < n - 1:
        raise ValueError(f"num_prefix_tokens must be in [0, N-1) with N={n}, got {num_prefix_tokens}")
    if patch_labels is not None:
        p = n - int(num_prefix_tokens)
        if patch_labels.shape != (q0.shape[0], p) or patch_labels.dtype != torch.int64:
            raise ValueError(f"patch_labels must be int64 (B, P) = ({q0.shape[0]}, {p}), got "
                             f"{tuple(patch_labels.shape)} {patch_labels.dtype}")


@torch.no_grad()
def layer_affinity_diagnostics(qs: Sequence[Tensor], ks: Sequence[Tensor], *, num_prefix_tokens: int, scale: float,
                               patch_labels: Optional[Tensor] = None, topk_fraction: float = 0.05,
                               rank_max_tokens: int = 1024, ignore_index: int = 255, chunk_rows: Optional[int] = None,
                               return_fg_attention: bool = False) -> Dict[str, Tensor]:
    """Over-smoothing diagnostics of every given layer (definitions in the module docstring).

    qs, ks: sequence over L consecutive layers of (B, H, N, d) queries / keys (pre-scale, as SDPA takes them).
    patch_labels: None or (B, P) int64 (``seg_to_patch_labels`` of the GT mask), for ``fg_to_bg``/``fg_attention``.
    topk_fraction: k = ceil(topk_fraction · P) for ``topk_mass``. rank_max_tokens: largest P for which the P x P
    affinity is formed for ``effective_rank`` (NaN above). chunk_rows: patch rows per chunk (default: a block of
    H x chunk x N float32 stays under 32 MiB).
    Returns float64 tensors: each of ``PER_LAYER_METRICS`` (B, L); ``successive_similarity`` (B, L−1);
    ``fg_attention`` (B, L, P) if requested (NaN rows where the image has no foreground row).
    """
    qs, ks = list(qs), list(ks)
    _check_inputs(qs, ks, num_prefix_tokens, patch_labels)
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    b, h, n, _ = qs[0].shape
    c = int(num_prefix_tokens)
    p = n - c
    n_layers = len(qs)
    topk = max(1, min(p, math.ceil(topk_fraction * p)))
    if chunk_rows is None:
        chunk_rows = max(1, min(p, _CHUNK_BYTES // (4 * h * n)))
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be > 0, got {chunk_rows}")
    work = torch.float64 if qs[0].dtype == torch.float64 else torch.float32
    do_rank = p <= rank_max_tokens

    out = {name: torch.full((b, n_layers), float("nan"), dtype=torch.float64) for name in PER_LAYER_METRICS}
    out["successive_similarity"] = torch.full((b, max(n_layers - 1, 0)), float("nan"), dtype=torch.float64)
    if return_fg_attention:
        out["fg_attention"] = torch.full((b, n_layers, p), float("nan"), dtype=torch.float64)

    for i in range(b):
        ent_sum = torch.zeros(n_layers, dtype=torch.float64)
        top_sum = torch.zeros(n_layers, dtype=torch.float64)
        mass_sum = torch.zeros(n_layers, dtype=torch.float64)
        unit_sum = torch.zeros(n_layers, p, dtype=torch.float64)  # Σ_m R̃[m,:] / ||R̃[m,:]||
        sq_sum = torch.zeros(n_layers, dtype=torch.float64)  # ||R̃_l||_F^2
        dot_sum = torch.zeros(max(n_layers - 1, 0), dtype=torch.float64)  # <R̃_l, R̃_{l+1}>_F
        full = torch.zeros(n_layers, p, p, dtype=work) if do_rank else None
        fg_rows = bg_cols = valid_cols = None
        fg_share_sum = torch.zeros(n_layers, dtype=torch.float64)
        fg_att_sum = torch.zeros(n_layers, p, dtype=torch.float64)
        n_fg = 0
        if patch_labels is not None:
            lab = patch_labels[i].to(qs[0].device)
            valid_cols = lab != ignore_index
            bg_cols = lab == 0
            fg_rows = valid_cols & (lab > 0)
            n_fg = int(fg_rows.sum())
        kf = [k[i].to(work) for k in ks]  # (H, N, d)
        for r0 in range(0, p, chunk_rows):
            r1 = min(p, r0 + chunk_rows)
            prev = None
            for li in range(n_layers):
                qc = qs[li][i, :, c + r0:c + r1].to(work)  # (H, rows, d)
                att = (torch.matmul(qc, kf[li].transpose(-2, -1)) * scale).softmax(dim=-1).mean(dim=0)  # (rows, N)
                rows = att[:, c:]  # R[m, :], (rows, P)
                row_mass = rows.sum(dim=-1, keepdim=True)
                rt = rows / row_mass  # R̃
                rt64 = rt.double()
                mass_sum[li] += row_mass.double().sum()
                ent_sum[li] += -(torch.special.xlogy(rt64, rt64).sum(dim=-1) / math.log(2.0)).sum()
                top_sum[li] += rt64.topk(topk, dim=-1).values.sum()
                norms = rt64.norm(dim=-1, keepdim=True)
                unit_sum[li] += (rt64 / norms).sum(dim=0)
                sq_sum[li] += (rt64 * rt64).sum()
                if prev is not None:
                    dot_sum[li - 1] += (prev * rt64).sum()
                prev = rt64
                if full is not None:
                    full[li, r0:r1] = rt
                if n_fg > 0:
                    fr = fg_rows[r0:r1]
                    if bool(fr.any()):
                        rf = rt64[fr]
                        fg_att_sum[li] += rf.sum(dim=0)
                        den = rf[:, valid_cols].sum(dim=-1)
                        fg_share_sum[li] += (rf[:, bg_cols].sum(dim=-1) / den).sum()
        out["row_entropy"][i] = ent_sum / p
        out["topk_mass"][i] = top_sum / p
        out["patch_mass"][i] = mass_sum / p
        if p > 1:
            out["row_similarity"][i] = ((unit_sum * unit_sum).sum(dim=-1) - p) / (p * (p - 1))
        if n_layers > 1:
            out["successive_similarity"][i] = dot_sum / (sq_sum[:-1].sqrt() * sq_sum[1:].sqrt())
        if full is not None:
            for li in range(n_layers):
                out["effective_rank"][i, li] = effective_rank(full[li])
        if n_fg > 0:
            if bool(bg_cols.any()):
                out["fg_to_bg"][i] = fg_share_sum / n_fg
            if return_fg_attention:
                out["fg_attention"][i] = fg_att_sum / n_fg
    return out


class DiagnosticsAccumulator:
    """Mean and standard deviation over images of per-layer metrics, ignoring NaN entries (counted per entry).

    ``update(metrics)`` takes a dict name -> (L,) or (B, L) values (e.g. from ``layer_affinity_diagnostics``;
    keys with 3-D values such as ``fg_attention`` are ignored). ``summary()`` returns
    {name: {"mean": [...], "std": [...], "count": [...]}} with NaN where no image had a finite value.
    """

    def __init__(self) -> None:
        self._sum: Dict[str, np.ndarray] = {}
        self._sq: Dict[str, np.ndarray] = {}
        self._n: Dict[str, np.ndarray] = {}
        self.n_images = 0

    def update(self, metrics: Mapping[str, Tensor]) -> None:
        batch = None
        for name, value in metrics.items():
            v = value.detach().double().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value, np.float64)
            if v.ndim == 1:
                v = v[None]
            if v.ndim != 2:
                continue
            if batch is None:
                batch = v.shape[0]
            elif v.shape[0] != batch:
                raise ValueError(f"metric {name!r} has {v.shape[0]} images, others have {batch}")
            finite = np.isfinite(v)
            vz = np.where(finite, v, 0.0)
            if name not in self._sum:
                self._sum[name] = np.zeros(v.shape[1])
                self._sq[name] = np.zeros(v.shape[1])
                self._n[name] = np.zeros(v.shape[1], dtype=np.int64)
            elif self._sum[name].shape[0] != v.shape[1]:
                raise ValueError(f"metric {name!r} changed length from {self._sum[name].shape[0]} to {v.shape[1]}")
            self._sum[name] += vz.sum(axis=0)
            self._sq[name] += (vz * vz).sum(axis=0)
            self._n[name] += finite.sum(axis=0)
        self.n_images += batch or 0

    def summary(self) -> Dict[str, Dict[str, list]]:
        result = {}
        for name in self._sum:
            n = self._n[name]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(n > 0, self._sum[name] / np.maximum(n, 1), np.nan)
                var = np.where(n > 0, self._sq[name] / np.maximum(n, 1) - mean ** 2, np.nan)
            std = np.sqrt(np.clip(var, 0.0, None))
            result[name] = {"mean": mean.tolist(), "std": std.tolist(), "count": n.tolist()}
        return result
