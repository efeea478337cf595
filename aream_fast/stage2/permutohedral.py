"""Permutohedral lattice filtering in PyTorch (no compiled extension), with pydensecrf's exact semantics.

The lattice of Adams, Baek and Davis, "Fast High-Dimensional Filtering Using the Permutohedral Lattice"
(Eurographics 2010), as Krähenbühl implemented it for the dense CRF (public repo lucasb-eyer/pydensecrf,
``densecrf/src/permutohedral.cpp``): features are elevated onto the hyperplane of a (d+1)-dimensional lattice,
each point is splatted onto the d+1 vertices of its enclosing simplex with barycentric weights, the lattice is
blurred with the kernel [1/2, 1, 1/2] along each of the d+1 lattice directions in turn (j = 0..d), and the result
is sliced back with the same weights and scaled by ``alpha = 1 / (1 + 2^-d)``. The filter approximates a
Gaussian ``exp(-|f_i - f_j|^2 / 2)`` in feature space, up to a constant.

Everything is vectorised: the hash table is ``torch.unique`` on integer-coded vertex keys, the blur neighbours
are looked up once with ``torch.searchsorted``, and splat / slice are sparse CSR matrices (``torch.sparse.mm``).
Per-point normalisation (``D^-1/2``) and the label-compatibility weight can be folded into those matrices, so
one filtering is three matrix products plus d+1 blur steps.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

_MAX_CODE = 2 ** 62


@dataclass
class Lattice:
    """A permutohedral lattice built for N points with d-dimensional features.

    ``offsets`` (N, d+1) int64: the lattice vertex (0..M-1) of each simplex corner of each point;
    ``weights`` (N, d+1) float32: the barycentric weights; ``neighbours`` (d+1, 2, M) int64: for blur direction j
    the vertex one step down (n1) and up (n2), or M when the vertex does not exist (a zero row).
    ``splat_crow`` (M+1,) / ``splat_src`` (N (d+1),): the CSR layout of the splat matrix, rows = vertices, entry e
    being flattened corner ``splat_src[e]`` (point ``splat_src[e] // (d+1)``), points ascending within a row.
    """

    num_points: int
    dim: int
    num_vertices: int
    offsets: torch.Tensor
    weights: torch.Tensor
    neighbours: torch.Tensor
    splat_crow: torch.Tensor
    splat_src: torch.Tensor

    @property
    def alpha(self) -> float:
        """pydensecrf's ``1 / (1 + 2^-d)`` slice scaling, in float32."""
        one = torch.tensor(1.0, dtype=torch.float32)
        return float(one / (one + torch.tensor(2.0 ** -self.dim, dtype=torch.float32)))

    def splat_parts(self, point_scale: torch.Tensor | None = None):
        """(crow, col, values) of the (M, N) splat matrix S[offsets[i, r], i] = weights[i, r] * point_scale[i]."""
        w = self.weights if point_scale is None else self.weights * point_scale[:, None]
        return self.splat_crow, self.splat_src // (self.dim + 1), w.reshape(-1)[self.splat_src]

    def slice_parts(self, point_scale: torch.Tensor | None = None):
        """(cols (N, d+1) sorted per row, values (N, d+1)) of the (N, M) slice matrix
        alpha * point_scale[i] * weights[i, r] at column offsets[i, r]."""
        w = self.weights * self.alpha
        if point_scale is not None:
            w = w * point_scale[:, None]
        cols, order = torch.sort(self.offsets, dim=1)  # a point's d+1 corners are distinct vertices
        return cols, torch.gather(w, 1, order)

    def splat_matrix(self, point_scale: torch.Tensor | None = None) -> torch.Tensor:
        crow, col, val = self.splat_parts(point_scale)
        return csr(crow, col, val, (self.num_vertices, self.num_points))

    def slice_matrix(self, point_scale: torch.Tensor | None = None) -> torch.Tensor:
        cols, vals = self.slice_parts(point_scale)
        return csr_rows(cols, vals, self.num_vertices)

    def blur(self, values: torch.Tensor) -> torch.Tensor:
        """(M, C) lattice values -> (M, C), blurred along j = 0..d: v <- v + (v[n1] + v[n2]) / 2 (a missing
        neighbour reads the zero row M)."""
        m = self.num_vertices
        buf = values.new_zeros(m + 1, values.shape[1])
        buf[:m] = values
        for j in range(self.dim + 1):
            n1, n2 = self.neighbours[j]
            step = buf.index_select(0, n1)
            step += buf.index_select(0, n2)
            step *= 0.5
            buf[:m] += step
        return buf[:m]

    def filter_ones(self) -> torch.Tensor:
        """(N,) float32: ``filter`` of a column of ones (the kernel's row sums D), without building matrices."""
        flat = self.offsets.reshape(-1)
        splat = torch.zeros(self.num_vertices, dtype=torch.float32, device=flat.device)
        splat.index_add_(0, flat, self.weights.reshape(-1))
        blurred = self.blur(splat[:, None])[:, 0]
        return (blurred[self.offsets] * self.weights).sum(dim=1) * self.alpha

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, C): alpha * S^T B S values (pydensecrf ``Permutohedral::compute``)."""
        return torch.sparse.mm(self.slice_matrix(), self.blur(torch.sparse.mm(self.splat_matrix(), values)))


def csr(crow, col, val, size) -> torch.Tensor:
    """A CSR tensor from (crow, col, values) built here (already valid, so torch does not re-check it)."""
    with warnings.catch_warnings():  # torch says "Sparse CSR tensor support is in beta state" once per process
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        if max(size) < 2 ** 31 and col.numel() < 2 ** 31:  # int32 indices: half the index traffic
            crow, col = crow.to(torch.int32), col.to(torch.int32)
        return torch.sparse_csr_tensor(crow, col, val, size, check_invariants=False)


def csr_rows(cols: torch.Tensor, vals: torch.Tensor, num_cols: int) -> torch.Tensor:
    """(R, k) sorted column indices and values, k entries per row -> (R, num_cols) CSR."""
    r, k = cols.shape
    crow = torch.arange(0, r * k + 1, k, device=cols.device)
    return csr(crow, cols.reshape(-1), vals.reshape(-1), (r, num_cols))


def build_lattice(features: torch.Tensor) -> Lattice:
    """Build the lattice for ``features`` (N, d) float32 (already divided by the kernel's standard deviations).

    Follows the SSE ``Permutohedral::init`` of pydensecrf step by step (float32, round half
    to even), so vertices and barycentric weights are the same.

    Vertex keys (the first d lattice coordinates) are coded as one int64 with a margin of d+1 on
    every coordinate, so a blur neighbour's code is the vertex's code plus a constant per direction.
    """
    if features.dim() != 2 or features.dtype != torch.float32:
        raise ValueError(f"features must be a (N, d) float32 tensor, got {tuple(features.shape)} {features.dtype}")
    n, d = features.shape
    dev = features.device
    f = features.t()  # (d, N): every per-coordinate vector contiguous
    inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    scale = [float(torch.tensor(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev, dtype=torch.float32))
             for i in range(d)]
    # elevate: y = E f (p.5 of Adams et al.); sm is the running sum of the scaled features from the top
    elevated = [None] * (d + 1)
    sm = torch.zeros(n, dtype=torch.float32, device=dev)
    for j in range(d, 0, -1):
        cf = f[j - 1] * scale[j - 1]
        elevated[j] = sm - float(j) * cf
        sm = sm + cf
    elevated[0] = sm
    elevated = torch.stack(elevated)  # (d+1, N)
    # closest 0-coloured lattice point by rounding
    down = float(torch.tensor(1.0 / (d + 1), dtype=torch.float32))
    v = torch.round(elevated * down)
    rem0 = v * float(d + 1)
    total = v.sum(dim=0)
    # rank of each coordinate of elevated - rem0 (pairwise, as the C++ does: ties go to the later coordinate)
    diff = elevated - rem0
    rank = torch.zeros(d + 1, n, dtype=torch.float32, device=dev)
    for i in range(d):
        for j in range(i + 1, d + 1):
            c = (diff[i] < diff[j]).to(torch.float32)
            rank[i] += c
            rank[j] += 1.0 - c
    rank += total
    wrap = (rank < 0).to(torch.float32) * (d + 1) - (rank >= d + 1).to(torch.float32) * (d + 1)
    rank += wrap
    rem0 += wrap
    rank_i = rank.to(torch.int64)
    # barycentric coordinates (p.10 of Adams et al.)
    bv = (elevated - rem0) * down
    bary = torch.zeros(d + 2, n, dtype=torch.float32, device=dev)
    bary.scatter_add_(0, d - rank_i, bv)
    bary.scatter_add_(0, d - rank_i + 1, -bv)
    weights = bary[: d + 1].clone()
    weights[0] = bary[0] + (1.0 + bary[d + 1])
    # vertex r of point i: key[c] = rem0[c] + canonical[r, rank[c]], canonical[r, k] = r - (d+1) [k > d - r]
    rem0_i = rem0[:d].to(torch.int64)
    columns = [rem0_i[c] for c in range(d)]
    lo = [col.min().item() - 2 * (d + 1) for col in columns]
    span = [col.max().item() + 2 * (d + 1) - low + 1 for col, low in zip(columns, lo)]
    strides = [1] * len(columns)
    for c in range(len(columns) - 2, -1, -1):
        strides[c] = strides[c + 1] * span[c + 1]
    if strides[0] * span[0] >= _MAX_CODE:
        raise ValueError("the lattice keys of these features do not fit in 63 bits (feature range too large for "
                         "the kernel widths: sxy / srgb too small)")
    base = sum((col - low) * stride for col, low, stride in zip(columns, lo, strides))
    codes = torch.empty(d + 1, n, dtype=torch.int64, device=dev)
    for r in range(d + 1):
        above = sum((rank_i[c] > d - r).to(torch.int64) * strides[c] for c in range(d))
        codes[r] = base + r * sum(strides) - (d + 1) * above
    inverse, unique_codes, crow, src = _hash(codes.t().reshape(-1))
    neighbours = _neighbours(unique_codes, strides, d)
    return Lattice(num_points=n, dim=d, num_vertices=unique_codes.shape[0], offsets=inverse.reshape(n, d + 1),
                   weights=weights.t().contiguous(), neighbours=neighbours, splat_crow=crow, splat_src=src)


def _hash(codes: torch.Tensor):
    """(R,) int64 codes -> (inverse (R,) vertex ids, sorted unique codes (M,), CSR row pointers (M+1,) and the
    code index of every CSR entry (R,), ascending within a vertex)."""
    sorted_codes, order = torch.sort(codes, stable=True)
    is_new = torch.ones_like(sorted_codes, dtype=torch.bool)
    is_new[1:] = sorted_codes[1:] != sorted_codes[:-1]
    inverse = torch.empty_like(order).scatter_(0, order, torch.cumsum(is_new, 0) - 1)
    starts = torch.nonzero(is_new).reshape(-1)
    crow = torch.cat([starts, starts.new_tensor([codes.shape[0]])])
    return inverse, sorted_codes[starts], crow, order


def _neighbours(unique_codes: torch.Tensor, strides, d: int) -> torch.Tensor:
    """(d+1, 2, M) int64 blur neighbours (pydensecrf: n1 = key - 1 except key[j] + d, n2 = key + 1 except
    key[j] - d, for the d stored coordinates); a missing neighbour is M."""
    m = unique_codes.shape[0]
    total = sum(strides)
    result = torch.empty(d + 1, 2, m, dtype=torch.int64, device=unique_codes.device)
    for j in range(d + 1):
        # step[c] = 1, except step[j] = -d; n1 = key - step, n2 = key + step
        delta = total - (d + 1) * strides[j] if j < d else total
        for side, q in enumerate((unique_codes - delta, unique_codes + delta)):
            pos = torch.searchsorted(unique_codes, q).clamp_(max=m - 1)
            result[j, side] = torch.where(unique_codes[pos] == q, pos, m)
    return result
