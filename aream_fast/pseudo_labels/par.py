"""PAR: pixel-adaptive refinement of label maps by local colour affinity (docs/semantics.md, "PAR").

Same semantics as the official ``networks/PAR.py`` (AReAM, from AFA/ToCo): 48 neighbours (8 per dilation in
row-major order, dilations 1, 2, 4, 8, 12, 24), no self term, replicate padding (= clamped coordinates),
image affinity softmax_k( mean_c -(|I_c(i+δ_k) − I_c(i)| / (σ_c(i) + 1e-8) / w1)² ) with σ_c the unbiased std of
the 48 neighbour values, plus w2 · softmax_k(−(dist_k / σ_pos / w1)²) (weights sum to 1 + w2; not
renormalised), then ``num_iters`` rounds of M(i) ← Σ_k W_k(i) M(i + δ_k) on every channel.

Implementation: one replicate pad by the largest dilation, then each neighbour is a shifted slice (a view) of
that padded tensor: no unfold, no conv, no (B, C, 48, H, W) neighbour stack (the std is a two-pass sum over the
48 views, accumulated in place). Batched over mask channels and over a chunk of images (``chunk_bytes``: one
448 px image per chunk by default, so the weights of the whole batch never exist at once); the affinity W
(b, 48, H, W) of a chunk is computed once and shared by all channels.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# row-major 3x3 neighbourhood without the centre (official get_kernel order)
_DIRS: Tuple[Tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def par_offsets(dilations: Sequence[int]) -> List[Tuple[int, int]]:
    """The (dy, dx) offsets of the neighbourhood, dilation-major, 8 per dilation."""
    return [(d * dy, d * dx) for d in dilations for dy, dx in _DIRS]


def position_weights(dilations: Sequence[int], w1: float = 0.3) -> Tensor:
    """β (len(dilations)*8,) float32: softmax over neighbours of −(dist / (σ_pos + 1e-8) / w1)², σ_pos the
    unbiased std of the distances (d·√2 diagonal, d axis). Official ``get_pos`` + ``pos_aff``."""
    dist = torch.tensor([d * (math.sqrt(2.0) if dy and dx else 1.0) for d in dilations for dy, dx in _DIRS],
                        dtype=torch.float32)
    std = dist.std()
    return torch.softmax(-((dist / (std + 1e-8) / w1) ** 2), dim=0)


class PAR(nn.Module):
    """Pixel-adaptive refinement.

    forward(images (B, 3, H, W) float, masks (B, M, H, W) float) -> (B, M, H, W) float32.
    ``images`` may be normalised or not: the image term is invariant to per-channel affine scaling (up to the
    1e-8 eps); the official code passes the denormalised image. ``masks`` must already have the image's size
    (the official interpolation is commented out).

    ``chunk_bytes``: images are refined a chunk at a time so that one chunk's (b, 48, H, W) fp32 neighbour
    weights take at most about this many bytes (at least one image per chunk); the result does not depend on it.
    """

    def __init__(self, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), num_iters: int = 10, w1: float = 0.3,
                 w2: float = 0.01, chunk_bytes: int = 16 << 20):
        super().__init__()
        if int(chunk_bytes) < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.chunk_bytes = int(chunk_bytes)
        dilations = tuple(int(d) for d in dilations)
        if not dilations or min(dilations) < 1:
            raise ValueError(f"dilations must be positive ints, got {dilations}")
        if num_iters < 0:
            raise ValueError(f"num_iters must be >= 0, got {num_iters}")
        self.dilations = dilations
        self.num_iters = int(num_iters)
        self.w1 = float(w1)
        self.w2 = float(w2)
        self.offsets = par_offsets(dilations)
        self.pad = max(dilations)
        self.register_buffer("pos_weights", position_weights(dilations, w1), persistent=False)

    def _neighbour(self, padded: Tensor, k: int, h: int, w: int) -> Tensor:
        dy, dx = self.offsets[k]
        p = self.pad
        return padded[..., p + dy:p + dy + h, p + dx:p + dx + w]

    def affinity(self, images: Tensor) -> Tensor:
        """W (B, 48, H, W) float32 = α + w2·β for images (B, 3, H, W) (any number of colour channels)."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        x = images.float()
        b, c, h, w = x.shape
        padded = F.pad(x, [self.pad] * 4, mode="replicate")
        n = len(self.offsets)
        neigh = [self._neighbour(padded, k, h, w) for k in range(n)]  # views (B, c, H, W)
        # per-colour-channel mean and unbiased std of the 48 neighbour values, accumulated in place
        mean = neigh[0].clone()
        for v in neigh[1:]:
            mean.add_(v)
        mean.div_(n)
        var = torch.zeros_like(mean)
        diff = torch.empty_like(mean)
        for v in neigh:
            torch.sub(v, mean, out=diff)
            var.addcmul_(diff, diff)
        # -(|n - x| / (std + 1e-8) / w1)^2 == (n - x)^2 * (-1 / ((std + 1e-8) * w1)^2); mean over colours
        scale = var.div_(n - 1).sqrt_().add_(1e-8).mul_(self.w1).square_().reciprocal_().mul_(-1.0 / c)
        aff = x.new_empty(b, n, h, w)
        for k in range(n):
            torch.sub(neigh[k], x, out=diff)
            diff.square_().mul_(scale)
            torch.sum(diff, dim=1, out=aff[:, k])
        # softmax over the 48 neighbours, in place: one (B, 48, H, W) buffer instead of four
        aff.sub_(aff.amax(dim=1, keepdim=True)).exp_()
        aff.div_(aff.sum(dim=1, keepdim=True))
        return aff.add_(self.w2 * self.pos_weights.to(aff.device).view(1, n, 1, 1))

    def propagate(self, masks: Tensor, weights: Tensor) -> Tensor:
        """``num_iters`` rounds of M(i) ← Σ_k W_k(i) M(i + δ_k); masks (B, M, H, W), weights (B, 48, H, W)."""
        m = masks.float()
        h, w = m.shape[-2:]
        out = None
        for _ in range(self.num_iters):
            padded = F.pad(m, [self.pad] * 4, mode="replicate")
            if out is None or out is masks:
                out = torch.empty_like(m)
            torch.mul(weights[:, :1], self._neighbour(padded, 0, h, w), out=out)
            for k in range(1, len(self.offsets)):
                out.addcmul_(weights[:, k:k + 1], self._neighbour(padded, k, h, w))
            m, out = out, m  # ping-pong: the previous iterate's buffer is overwritten next round
        return m

    def forward(self, images: Tensor, masks: Tensor) -> Tensor:
        if images.dim() != 4 or masks.dim() != 4:
            raise ValueError(f"images and masks must be 4-D (B, C, H, W); got images {tuple(images.shape)}, "
                             f"masks {tuple(masks.shape)}")
        if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} must share batch "
                             f"size and (H, W)")
        if not images.is_floating_point() or not masks.is_floating_point():
            raise ValueError(f"images and masks must be floating point, got {images.dtype} and {masks.dtype}")
        # Images are independent: refine a few at a time so that the (b, 48, H, W) neighbour weights of one
        # chunk stay near ``chunk_bytes`` (one 448 px image at half resolution: 9.2 MiB) instead of the batch's.
        per_image = len(self.offsets) * images.shape[-2] * images.shape[-1] * 4
        step = max(1, self.chunk_bytes // per_image)
        if step >= images.shape[0]:
            return self.propagate(masks, self.affinity(images))
        out = torch.empty(masks.shape, dtype=torch.float32, device=masks.device)
        for i in range(0, images.shape[0], step):
            out[i:i + step] = self.propagate(masks[i:i + step], self.affinity(images[i:i + step]))
        return out
