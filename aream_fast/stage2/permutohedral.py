"""Permutohedral lattice filtering in PyTorch (no compiled extension), with pydensecrf's exact semantics.

The lattice of Adams, Baek and Davis, "Fast High-Dimensional Filtering Using the Permutohedral Lattice"
(Eurographics 2010), as Krähenbühl implemented it for the dense CRF (public repo lucasb-eyer/pydensecrf,
``densecrf/src/permutohedral.cpp``): features are elevated onto the hyperplane of a (d+1)-dimensional lattice,
each point is splatted onto the d+1 vertices of its enclosing simplex with barycentric weights, the lattice is
blurred with the kernel [1/2, 1, 1/2] along each of the d+1 lattice directions in turn (j = 0..d), and the result
is sliced back with the same weights and scaled by ``alpha = 1 / (1 + 2^-d)``. The filter approximates a
Gaussian ``exp(-|f_i - f_j|^2 / 2)`` in feature space, up to a constant.

Everything is vectorised. The hash table is one sort of the N (d+1) corner codes (each vertex packed as
(remainder r, lattice coordinates / (d+1)) into one integer, 32-bit when the range allows); blur neighbours are
looked up once, in a dense code table where the codes fill their range (the appearance-free Gaussian lattice) or
with ``torch.searchsorted``, one direction's lookups giving the opposite direction by inversion; splat, each blur
step and slice are sparse CSR matrices (products written in place with ``addmm_``), with per-point scales (the
kernel normalisation ``D^-1/2``) folded into their values.
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

    ``offsets`` (N, d+1) int32 (int64 past 2^31 corners): the lattice vertex (0..M-1) of each simplex corner of each
    point;
    ``weights`` (N, d+1) float32: the barycentric weights;
    ``neighbours`` (d+1, 2, M) int32 (int64 past 2^31 vertices): for blur direction j the vertex one step down (n1)
    and up (n2), or M when the vertex does not exist (a zero row).
    ``splat_crow`` (M+1,), ``splat_point`` (N (d+1),), ``splat_src`` (N (d+1),): the CSR layout of the splat
    matrix, rows = vertices; entry e is point ``splat_point[e]``'s corner ``splat_src[e]`` (flattened index into
    ``weights``), points ascending within a row.
    """

    num_points: int
    dim: int
    num_vertices: int
    offsets: torch.Tensor
    weights: torch.Tensor
    neighbours: torch.Tensor
    splat_crow: torch.Tensor
    splat_point: torch.Tensor
    splat_src: torch.Tensor

    @property
    def alpha(self) -> float:
        """pydensecrf's ``1 / (1 + 2^-d)`` slice scaling, in float32."""
        one = torch.tensor(1.0, dtype=torch.float32)
        return float(one / (one + torch.tensor(2.0 ** -self.dim, dtype=torch.float32)))

    def splat_matrix(self, point_scale: torch.Tensor | None = None) -> torch.Tensor:
        """(M, N) CSR splat matrix, S[offsets[i, r], i] = weights[i, r] * point_scale[i]."""
        w = self.weights if point_scale is None else self.weights * point_scale[:, None]
        val = torch.take(w, self.splat_src)  # measured 2.5x faster than w.reshape(-1)[...] on a CPU
        return csr(self.splat_crow, self.splat_point, val, (self.num_vertices, self.num_points))

    def slice_matrix(self, point_scale: torch.Tensor | None = None) -> torch.Tensor:
        """(N, M) CSR slice matrix, alpha * point_scale[i] * weights[i, r] at column offsets[i, r]."""
        w = self.weights * self.alpha
        if point_scale is not None:
            w *= point_scale[:, None]
        cols = self.offsets
        if cols.device.type != "cpu":  # CPU sparse.mm takes a row's columns in any order; keep cuSPARSE's layout
            cols, order = torch.sort(cols, dim=1)
            w = torch.gather(w, 1, order)
        r, k = cols.shape
        crow = torch.arange(0, r * k + 1, k, device=cols.device)
        return csr(crow, cols.reshape(-1), w.reshape(-1), (r, self.num_vertices))

    def blur_matrices(self) -> list:
        """The d+1 blur steps as (M, M+1) CSR matrices B_j (rows n1, self, n2 with 1/2, 1, 1/2; column M is the
        zero row a missing neighbour reads): ``buffer[:M] = B_j @ buffer`` is the blur step along direction j,
        v <- v + (v[n1] + v[n2]) / 2, as one sparse product."""
        m = self.num_vertices
        dev = self.neighbours.device
        own = torch.arange(m, device=dev, dtype=self.neighbours.dtype)
        half = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float32, device=dev).repeat(m, 1)
        crow = torch.arange(0, 3 * m + 1, 3, device=dev, dtype=torch.int32 if 3 * m < 2 ** 31 else torch.int64)
        mats = []
        for j in range(self.dim + 1):
            cols, vals = torch.stack([self.neighbours[j, 0], own, self.neighbours[j, 1]], dim=1), half
            if dev.type != "cpu":  # CPU sparse.mm takes a row's columns in any order; keep cuSPARSE's layout
                cols, order = torch.sort(cols, dim=1)
                vals = torch.gather(vals, 1, order)
            mats.append(csr(crow, cols.reshape(-1), vals.reshape(-1), (m, m + 1)))
        return mats

    def blur(self, values: torch.Tensor, steps: list | None = None) -> torch.Tensor:
        """(M, C) lattice values -> (M, C), blurred along j = 0..d (``blur``; ``steps`` = ``blur_matrices()``,
        built here if not given)."""
        return blur(values, self.blur_matrices() if steps is None else steps)

    def filter_ones(self, steps: list | None = None, slice_matrix: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) float32: ``filter`` of a column of ones (the kernel's row sums D), the splat a scatter of the
        weights; ``steps`` / ``slice_matrix`` = ``blur_matrices()`` / the unscaled ``slice_matrix()`` when the
        caller has them (built here otherwise)."""
        flat = self.offsets.reshape(-1)
        splat = torch.zeros(self.num_vertices, dtype=torch.float32, device=flat.device)
        splat.index_add_(0, flat, self.weights.reshape(-1))
        blurred = self.blur(splat[:, None], steps)
        slice_matrix = self.slice_matrix() if slice_matrix is None else slice_matrix
        return torch.empty(self.num_points, 1, device=flat.device).addmm_(slice_matrix, blurred, beta=0)[:, 0]

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, C): alpha * S^T B S values (pydensecrf ``Permutohedral::compute``)."""
        return torch.sparse.mm(self.slice_matrix(), self.blur(torch.sparse.mm(self.splat_matrix(), values)))


def blur(values: torch.Tensor, steps: list, splat: torch.Tensor | None = None) -> torch.Tensor:
    """Blur lattice values along j = 0..d, v <- v + (v[n1] + v[n2]) / 2 (a missing neighbour reads zero), with
    ``steps`` the d+1 (M, M+1) matrices of ``Lattice.blur_matrices``. ``values`` (M, C), or (N, C) point values
    splatted first by ``splat`` (M, N). Returns (M, C); two (M+1, C) buffers, no other temporaries."""
    m = steps[0].shape[0]
    c = values.shape[1]
    a, b = values.new_empty(m + 1, c), values.new_empty(m + 1, c)
    a[m] = 0  # the row a missing neighbour reads
    b[m] = 0
    # ``addmm_(..., beta=0)`` writes the product straight into the buffer (beta = 0 ignores the old contents, NaN
    # included, as torch.addmm documents); ``torch.mm(sparse, dense, out=)`` fills a zero temporary and copies it,
    # which measured 2.4x slower per product on a CPU
    if splat is None:
        a[:m] = values
    else:
        a[:m].addmm_(splat, values, beta=0)
    for step in steps:  # ping-pong between the two buffers
        b[:m].addmm_(step, a, beta=0)
        a, b = b, a
    return a[:m]


def csr(crow, col, val, size) -> torch.Tensor:
    """A CSR tensor from (crow, col, values) built here (already valid, so torch does not re-check it)."""
    with warnings.catch_warnings():  # torch says "Sparse CSR tensor support is in beta state" once per process
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        if max(size) < 2 ** 31 and col.numel() < 2 ** 31:  # int32 indices: half the index traffic
            crow, col = crow.to(torch.int32), col.to(torch.int32)
        return torch.sparse_csr_tensor(crow, col, val, size, check_invariants=False)


def build_lattice(features: torch.Tensor) -> Lattice:
    """Build the lattice for ``features`` (N, d) float32 (already divided by the kernel's standard deviations).

    Follows the SSE ``Permutohedral::init`` of pydensecrf step by step (float32, round half
    to even), so vertices and barycentric weights are the same.

    Vertices are coded as one integer each (remainder r and the first d lattice coordinates / (d+1), with a
    margin of 2 on every coordinate; 32-bit when the range fits), so a blur neighbour's code is the vertex's code
    plus one of two constants per direction (``_neighbours``).
    """
    if features.dim() != 2 or features.dtype != torch.float32:
        raise ValueError(f"features must be a (N, d) float32 tensor, got {tuple(features.shape)} {features.dtype}")
    n, d = features.shape
    if n == 0 or d == 0:
        raise ValueError(f"features must have at least one point and one dimension, got {tuple(features.shape)}")
    if not bool(torch.isfinite(features.sum())) and not bool(torch.isfinite(features).all()):  # one cheap pass first
        raise ValueError("features contain NaN or infinite values")
    dev = features.device
    inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    scale = torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)],
                         dtype=torch.float32, device=dev)
    # elevate: y = E f (p.5 of Adams et al.); elevated[j] = sum_{c >= j} cf[c] - j cf[j - 1], cf = scaled features,
    # the running sum taken from the top in float32 as the C++ does
    cf = (features * scale).t()  # (d, N)
    elevated = torch.empty(d + 1, n, dtype=torch.float32, device=dev)
    sm = torch.zeros(n, dtype=torch.float32, device=dev)
    for j in range(d, 0, -1):
        torch.sub(sm, cf[j - 1] * float(j), out=elevated[j])  # j * cf rounded first, as the C++
        sm += cf[j - 1]
    elevated[0] = sm
    # closest 0-coloured lattice point by rounding
    down = float(torch.tensor(1.0 / (d + 1), dtype=torch.float32))
    v = torch.round(elevated * down)
    rem0 = v * float(d + 1)
    # rank of each coordinate of diff = elevated - rem0 as the C++ counts it: for i < j, diff[i] < diff[j] ranks i
    # up, else j.
    # The ranks are small integers: 0..d plus sum(v), where sum(elevated) = 0 and each v rounds elevated / (d+1),
    # so |sum(v)| <= (d+1) / 2. They are counted in int8 (int32 for d >= 64) with the comparisons' bools viewed as
    # int8 (no conversion pass): rank[j] starts at j + sum(v) (every i < j ranks j up unless diff[i] < diff[j]).
    diff = elevated - rem0
    rank_dtype = torch.int8 if d < 64 else torch.int32
    rank = v.sum(dim=0).to(rank_dtype)[None] + torch.arange(d + 1, dtype=rank_dtype, device=dev)[:, None]
    for i in range(d):
        for j in range(i + 1, d + 1):
            c = (diff[i] < diff[j]).view(torch.int8)
            rank[i] += c
            rank[j] -= c
    wrap = (rank < 0).view(torch.int8) - (rank >= d + 1).view(torch.int8)
    wrap = wrap.to(rank_dtype) * (d + 1)
    rank += wrap
    rem0 += wrap
    rank_i = rank.to(torch.int64)
    # barycentric coordinates (p.10 of Adams et al.): the C++ adds bv[c] to bary[d - rank[c]] and subtracts it
    # from bary[d - rank[c] + 1]; with s[k] = bv at rank k that is bary[j] = s[d - j] - s[d - j + 1] (s[d+1] = 0)
    # and weights[0] = bary[0] + (1 + bary[d + 1]) = s[d] + (1 - s[0]), the same float32 operations
    s_rank = torch.empty(d + 1, n, dtype=torch.float32, device=dev).scatter_(0, rank_i, (elevated - rem0) * down)
    s_rev = torch.flip(s_rank, [0])  # s_rev[j] = s[d - j]
    weights = torch.empty(n, d + 1, dtype=torch.float32, device=dev)
    torch.sub(s_rev[1:].t(), s_rev[:-1].t(), out=weights[:, 1:])  # j = 1..d: s[d - j] - s[d - j + 1]
    torch.add(s_rev[0], 1.0 - s_rev[d], out=weights[:, 0])
    # integer vertex codes. Corner r of a point is key[c] = rem0[c] + r - (d+1) [rank[c] > d - r] (p.10; the
    # first d coordinates determine a vertex), so every coordinate of corner r is = r mod (d+1): key[c] =
    # (d+1) m_c + r with m_c = rem0[c] / (d+1) - [rank[c] > d - r]. The code packs (r, m_0..m_{d-1}) as
    # r R + sum_c (m_c - lo_c) stride_c (R = the m range): a (d+1)^(d-1) times smaller range than the keys.
    m0 = (rem0[:d] * down).round_()  # rem0 / (d+1), exact (float32 integers)
    lo = [int(x) - 2 for x in m0.amin(dim=1).tolist()]  # a margin of 2 on m: corners step down by 1, blur by 1
    span = [int(x) + 2 - low + 1 for x, low in zip(m0.amax(dim=1).tolist(), lo)]
    strides = [1] * d
    for c in range(d - 2, -1, -1):
        strides[c] = strides[c + 1] * span[c + 1]
    block = strides[0] * span[0]
    if block * (d + 1) >= _MAX_CODE:
        raise ValueError("the lattice keys of these features do not fit in 63 bits (feature range too large for "
                         "the kernel widths: sxy / srgb too small)")
    # 32-bit codes when they fit with a block to spare either side (the neighbour arithmetic of ``_neighbours``
    # stays within (-2 block, (d+2) block)): a 32-bit sort is about twice as fast
    code_dtype = torch.int32 if block * (d + 3) < 2 ** 31 else torch.int64
    m0 -= torch.tensor(lo, dtype=torch.float32, device=dev)[:, None]
    stride_t = torch.tensor(strides, dtype=code_dtype, device=dev)[:, None]
    base = (m0.to(code_dtype) * stride_t).sum(dim=0, dtype=code_dtype)  # (N,)
    # corner r subtracts the strides of the c < d with rank[c] >= d + 1 - r: scatter the strides by rank, then
    # corner r = corner r-1 minus the strides of rank d + 1 - r
    by_rank = torch.zeros(d + 1, n, dtype=code_dtype, device=dev)
    by_rank.scatter_add_(0, rank_i[:d], stride_t.expand(d, n))
    codes = torch.empty(n, d + 1, dtype=code_dtype, device=dev)  # entry i (d+1) + r: point i, corner r
    codes[:, 0] = base
    for r in range(1, d + 1):
        base -= by_rank[d + 1 - r]
        torch.add(base, r * block, out=codes[:, r])
    inverse, unique_codes, crow, order = _hash(codes.reshape(-1))
    neighbours = _neighbours(unique_codes, strides, block, d)
    return Lattice(num_points=n, dim=d, num_vertices=unique_codes.shape[0], offsets=inverse.reshape(n, d + 1),
                   weights=weights, neighbours=neighbours, splat_crow=crow,
                   splat_point=torch.div(order.to(inverse.dtype), d + 1, rounding_mode="floor"), splat_src=order)


def _hash(codes: torch.Tensor):
    """(R,) integer codes -> (inverse (R,) vertex ids, sorted unique codes (M,), CSR row pointers (M+1,) and the
    code index of every CSR entry (R,), ascending within a vertex). One 1-D sort (``torch.sort`` of a flat
    integer tensor uses all CPU threads; sorting rows along a dimension measured several times slower)."""
    sorted_codes, order = torch.sort(codes, stable=True)
    is_new = torch.ones_like(sorted_codes, dtype=torch.bool)
    is_new[1:] = sorted_codes[1:] != sorted_codes[:-1]
    ids = torch.cumsum(is_new, 0, dtype=torch.int32 if codes.numel() < 2 ** 31 else torch.int64)
    ids -= 1
    inverse = torch.empty_like(ids).scatter_(0, order, ids)
    starts = torch.nonzero(is_new).reshape(-1)
    crow = torch.cat([starts, starts.new_tensor([codes.shape[0]])])
    return inverse, sorted_codes.index_select(0, starts), crow, order


# A dense code -> vertex table (int32, so at most 64 bytes per vertex) replaces the binary searches when the code
# range is at most this many times the number of vertices: the appearance-free Gaussian lattice fills its bounding
# box (range 2.1-3.6 M from 40 x 30 to 1000 x 800 images; at sxy = 1 on 500 x 375 the neighbour lookup goes from
# 41 to ~6 ms), the bilateral lattices of every preset are sparse in theirs (range 550-4100 M).
_TABLE_MAX_RANGE_PER_VERTEX = 16


def _neighbours(unique_codes: torch.Tensor, strides, block: int, d: int) -> torch.Tensor:
    """(d+1, 2, M) blur neighbours, int32 (int64 past 2^31 - 1 vertices); a missing neighbour is M.

    pydensecrf: along direction j, n1 = key - step and n2 = key + step with step[c] = 1 except step[j] = -d (on
    the d stored coordinates; j = d moves them all by 1). In the packed code of ``build_lattice`` a vertex of
    remainder r goes to remainder r - 1 (n1) and r + 1 (n2), and m moves by a constant that depends only on
    whether r wraps around (r = 0 for n1, r = d for n2). Every neighbour code lies in [0, (d+1) block) (the
    margin of 2 on m), so it is looked up in a dense (d+1) block table where that is small, else by binary
    search in the sorted codes."""
    m = unique_codes.shape[0]
    dev = unique_codes.device
    total = sum(strides)
    r = torch.div(unique_codes, block, rounding_mode="floor")
    wide = m >= 2 ** 31 - 1  # vertex ids in int32 (the CSR matrices' index type) unless they do not fit
    id_dtype = torch.int64 if wide else torch.int32
    result = torch.empty(d + 1, 2, m, dtype=id_dtype, device=dev)
    num_codes = (d + 1) * block
    table = None
    if num_codes <= _TABLE_MAX_RANGE_PER_VERTEX * m:
        table = torch.full((num_codes,), m, dtype=id_dtype, device=dev)
        table.index_copy_(0, unique_codes.long(), torch.arange(m, dtype=id_dtype, device=dev))
    wrap_down = (r == 0).to(unique_codes.dtype)  # n1 wraps around in r
    own = torch.arange(m, dtype=id_dtype, device=dev)
    up = torch.empty(m + 1, dtype=id_dtype, device=dev)
    for j in range(d + 1):
        sj = strides[j] if j < d else 0
        # n1: r >= 1 -> r - 1 and m_j + 1; r = 0 -> r = d and m_c - 1 for c != j.
        step, wrapped_step = sj - block, d * block - (total - sj)
        q = torch.add(unique_codes, wrap_down, alpha=wrapped_step - step)  # in the codes' dtype
        q += step
        down = result[j, 0]
        if table is not None:
            torch.index_select(table, 0, q, out=down)
        else:
            pos = torch.searchsorted(unique_codes, q, out_int32=not wide).clamp_(max=m - 1)
            down.copy_(pos.masked_fill_(unique_codes.index_select(0, pos) != q, m))
        # n2 is the inverse of n1 (the code shifts undo each other): n2[n1[v]] = v, missing where no n1 points
        # (the entries of missing n1 land in the spare slot M)
        up.fill_(m)
        up.scatter_(0, down.long(), own)
        result[j, 1] = up[:m]
    return result
