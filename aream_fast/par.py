"""PAR: pixel-adaptive refinement of label maps by local colour affinity (spec §3.3).

Same semantics as the official ``networks/PAR.py`` (AReAM, from AFA/ToCo): 48 neighbours (8 per dilation in
row-major order, dilations 1, 2, 4, 8, 12, 24), no self term, replicate padding (= clamped coordinates),
image affinity softmax_k( mean_c -(|I_c(i+δ_k) − I_c(i)| / (σ_c(i) + 1e-8) / w1)² ) with σ_c the unbiased std of
the 48 neighbour values, plus w2 · softmax_k(−(dist_k / σ_pos / w1)²) (weights sum to 1 + w2; not
renormalised), then ``num_iters`` rounds of M(i) ← Σ_k W_k(i) M(i + δ_k) on every channel.

Implementation: one replicate pad by the largest dilation, then each neighbour is a shifted slice (a view) of
that padded tensor: no unfold, no conv, no (B, C, 48, H, W) neighbour stack (the std is a two-pass sum over the
48 views). Everything is batched over images and over mask channels; the affinity W (B, 48, H, W) is computed
once and shared by all channels.
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
    """

    def __init__(self, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), num_iters: int = 10, w1: float = 0.3,
                 w2: float = 0.01):
        super().__init__()
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
        aff = x.new_zeros(b, n, h, w)
        for ch in range(c):  # colour channels one at a time; neighbours are views of the padded image
            pc = padded[:, ch]
            xc = x[:, ch]
            neigh = [self._neighbour(pc, k, h, w) for k in range(n)]
            mean = sum(neigh) / n
            var = sum((v - mean).square() for v in neigh) / (n - 1)  # unbiased, over the 48 neighbours
            std = var.sqrt()
            # -(|n - x| / (std + 1e-8) / w1)^2 == (n - x)^2 * (-1 / ((std + 1e-8) * w1)^2)
            scale = -1.0 / ((std + 1e-8) * self.w1) ** 2
            for k in range(n):
                aff[:, k].add_((neigh[k] - xc).square_().mul_(scale))
        # softmax over the 48 neighbours, in place: one (B, 48, H, W) buffer instead of four
        aff.div_(c)
        aff.sub_(aff.amax(dim=1, keepdim=True)).exp_()
        aff.div_(aff.sum(dim=1, keepdim=True))
        return aff.add_(self.w2 * self.pos_weights.to(aff.device).view(1, n, 1, 1))

    def propagate(self, masks: Tensor, weights: Tensor) -> Tensor:
        """``num_iters`` rounds of M(i) ← Σ_k W_k(i) M(i + δ_k); masks (B, M, H, W), weights (B, 48, H, W)."""
        m = masks.float()
        h, w = m.shape[-2:]
        for _ in range(self.num_iters):
            padded = F.pad(m, [self.pad] * 4, mode="replicate")
            out = torch.zeros_like(m)
            for k in range(len(self.offsets)):
                out.addcmul_(weights[:, k:k + 1], self._neighbour(padded, k, h, w))
            m = out
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
        return self.propagate(masks, self.affinity(images))
