"""The official pseudo-label branch, slow on purpose (Jessie459/AReAM: tools/camutils.py, networks/PAR.py;
docs/semantics.md, "Pseudo labels", "CAM refinement", "PAR", "Inference CAMs").

* :func:`gen_msf_cam` -- the pseudo-label CAMs from a **separate** forward of [x_s; flip(x_s)] that materialises
  L x 2B x H x N x N logits, their softmax and head mean, and the dense patch affinity R.
* :func:`cams_from_logits_reference` -- the same refinement on one forward's cam and logits (no flip, scale 1).
* :func:`inference_cam_reference` -- the official CAM seeds (``generate_attention_maps``), one view per forward.
* :class:`OfficialPAR`, :func:`official_cam_to_seg` -- PAR with its (B, M, 48, h, w) neighbour stacks, run in a
  per-image Python loop, once per background score; the two segmentations are fused by the library's
  ``fuse_segs`` (one definition).
* :func:`official_pseudo_affinity` -- the whole branch: CAMs -> two segmentations -> fusion -> ``seg_to_aff``.

The models are an :class:`~aream_fast.official.model.OfficialMCTformerV2` or a ``WSSSViT`` (run eagerly through
:func:`~aream_fast.official.model.forward_with_logits`). Shapes: B batch, K classes, C class tokens, P = h * w
patches, N = C + P tokens, H heads, L blocks.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aream_fast.data.transforms import denormalize
from aream_fast.official.loss import official_seg_to_aff
from aream_fast.official.model import eager_logits
from aream_fast.pseudo_labels.labels import fuse_segs

__all__ = ["gen_msf_cam", "cams_from_logits_reference", "inference_cam_reference", "official_minmax",
           "OfficialPAR", "official_cam_to_seg", "official_pseudo_affinity"]

EPS = 1e-6


def official_minmax(cam: Tensor) -> Tensor:
    """Official per-(b, k) normalisation, spelled out: ReLU, x <- x - min(x), x <- x / (max(x) + 1e-6).
    cam (B, K, H, W) -> a new (B, K, H, W) tensor (the library's ``minmax_normalise`` works in place)."""
    cam = F.relu(cam)
    flat = cam.flatten(2)
    flat = flat - flat.min(dim=-1, keepdim=True)[0]
    flat = flat / (flat.max(dim=-1, keepdim=True)[0] + EPS)
    return flat.view_as(cam)


def _refine_dense(cam: Tensor, attn_mean: Tensor, c: int, refine_layers: Sequence[int],
                  refine_weights: Optional[Sequence[float]], cls_layers: Sequence[int]) -> Tensor:
    """cam (B', K, h, w), attn_mean (L, B', N, N) = head-mean softmax -> refined (B', K, h, w)."""
    bb, kk, h, w = cam.shape
    if c > 1:
        cls_attn = attn_mean[list(cls_layers)].mean(0)[:, :c, c:]  # (B', C, P)
        cam = cam * cls_attn.reshape(bb, c, h, w)
    if refine_weights is None:
        r = attn_mean[list(refine_layers)].mean(0)[:, c:, c:]  # 'U'
    else:
        r = sum(wt * attn_mean[layer] for layer, wt in zip(refine_layers, refine_weights)) / len(refine_layers)
        r = r[:, c:, c:]  # 'E'
    refined = torch.einsum("bmn,bkn->bkm", r, cam.flatten(2))  # cam'[b,k,m] = sum_n R[b,m,n] cam[b,k,n]
    return refined.reshape(bb, kk, h, w)


@torch.no_grad()
def gen_msf_cam(model: nn.Module, images: Tensor, labels: Tensor, *, refine_layers: Sequence[int],
                          refine_weights: Optional[Sequence[float]] = None,
                          class_attention_layers: Optional[Sequence[int]] = None,
                          scales: Sequence[float] = (1.0,), flip: bool = True) -> Tensor:
    """Official ``gen_msf_cam`` (docs/semantics.md, "CAM refinement") times labels: (B, K, H, W)."""
    b, _, hh, ww = images.shape
    c = model.num_prefix_tokens
    cls_layers = list(range(model.depth)) if class_attention_layers is None else list(class_attention_layers)
    cams = []
    for s in scales:
        size = (int(s * hh), int(s * ww))
        x = images if size == (hh, ww) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        cam, attn = eager_logits(model, x)  # cam (B', K, h, w); Z (L, B', H, N, N)
        attn_mean = attn.softmax(dim=-1).mean(dim=2)  # (L, B', N, N), head mean of the softmax
        cam = _refine_dense(cam, attn_mean, c, refine_layers, refine_weights, cls_layers)
        cam = F.interpolate(cam, size=(hh, ww), mode="bilinear", align_corners=False)
        cams.append(cam[:b])
        if flip:
            cams.append(cam[b:].flip(-1))
    cam = official_minmax(torch.stack(cams).sum(0))
    return cam * labels[:, :, None, None]


@torch.no_grad()
def cams_from_logits_reference(cam: Tensor, logits: Sequence[Tensor], labels: Tensor, image_size: Tuple[int, int],
                               *, num_prefix_tokens: int, refine_layers: Sequence[int],
                               refine_weights: Optional[Sequence[float]] = None,
                               class_attention_layers: Optional[Sequence[int]] = None) -> Tensor:
    """The "CAM refinement" computation (docs/semantics.md) on one forward's cam and logits (no flip, scale 1): (B, K,
    H, W)."""
    attn_mean = torch.stack(list(logits)).softmax(dim=-1).mean(dim=2)
    cls_layers = list(range(len(logits))) if class_attention_layers is None else list(class_attention_layers)
    cam = _refine_dense(cam, attn_mean, num_prefix_tokens, refine_layers, refine_weights, cls_layers)
    cam = F.interpolate(cam, size=tuple(image_size), mode="bilinear", align_corners=False)
    return official_minmax(cam) * labels[:, :, None, None]


@torch.no_grad()
def inference_cam_reference(model: nn.Module, image: Tensor, labels: Tensor, *, scales: Sequence[float] = (1.0,),
                            flip: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Official ``generate_attention_maps`` (docs/semantics.md, "Inference CAMs"), each view in its own batch-1
    forward, eval mode."""
    was_training = model.training
    model.eval()
    keys = torch.nonzero(labels > 0).flatten()
    _, hh, ww = image.shape
    c = model.num_prefix_tokens
    layers = list(range(model.depth))
    ps = model.patch_size
    views = []
    for s in scales:
        size = (int(s * hh), int(s * ww))
        base = image[None] if size == (hh, ww) else F.interpolate(image[None], size=size, mode="bicubic",
                                                                  align_corners=False)
        for flipped in ([False, True] if flip else [False]):
            x = base.flip(-1) if flipped else base
            pad_h, pad_w = (-size[0]) % ps, (-size[1]) % ps
            x = F.pad(x, (0, pad_w, 0, pad_h))
            cam, attn = eager_logits(model, x)
            attn_mean = attn.softmax(dim=-1).mean(dim=2)  # (L, 1, N, N)
            _, _, h, w = cam.shape
            if c > 1:
                cam = cam * attn_mean.mean(0)[:, :c, c:].reshape(1, c, h, w)
            cam = cam[:, keys]
            r = attn_mean[layers].mean(0)[:, c:, c:]
            cam = torch.einsum("bmn,bkn->bkm", r, cam.flatten(2)).reshape(1, -1, h, w)
            cam = F.interpolate(cam, size=(size[0] + pad_h, size[1] + pad_w), mode="bilinear",
                                align_corners=False)[:, :, :size[0], :size[1]]
            if flipped:
                cam = cam.flip(-1)
            if size != (hh, ww):
                cam = F.interpolate(cam, size=(hh, ww), mode="bilinear", align_corners=False)
            views.append(cam)
    model.train(was_training)
    cam = official_minmax(torch.stack(views).sum(0))[0]
    return keys.numpy().astype(np.int64), cam.numpy().astype(np.float32)


def _par_kernel() -> Tensor:
    """(8, 1, 3, 3) one-hot kernels picking the 8 neighbours in row-major order (official ``get_kernel``)."""
    weight = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        weight[i, 0, r, c] = 1.0
    return weight


class OfficialPAR(nn.Module):
    """Pixel-adaptive refinement as the official ``networks/PAR.py`` computes it (docs/semantics.md, "PAR").

    forward(images (B, 3, h, w), masks (B, M, h, w)) -> (B, M, h, w). Builds the (B, M, 48, h, w) neighbour
    stack on every one of the ``num_iters`` iterations; replicate padding; no self term; weights not
    renormalised.
    """

    def __init__(self, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), num_iters: int = 10,
                 w1: float = 0.3, w2: float = 0.01):
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.num_iters = int(num_iters)
        self.w1 = w1
        self.w2 = w2
        self.register_buffer("kernel", _par_kernel(), persistent=False)
        ker = torch.ones(1, 1, 8, 1, 1)
        for i in (0, 2, 5, 7):  # diagonal neighbours are d * sqrt(2) away
            ker[0, 0, i] = math.sqrt(2.0)
        self.register_buffer("pos", torch.cat([ker * d for d in self.dilations], dim=2), persistent=False)

    def get_dilated_neighbors(self, x: Tensor) -> Tensor:
        """(b, c, h, w) -> (b, c, 8 * len(dilations), h, w) neighbour values, replicate padding."""
        b, c, h, w = x.shape
        x_aff = []
        for d in self.dilations:
            x_pad = F.pad(x, [d] * 4, mode="replicate")
            x_pad = x_pad.reshape(b * c, -1, x_pad.shape[-2], x_pad.shape[-1])
            x_aff.append(F.conv2d(x_pad, self.kernel.to(x), dilation=d).view(b, c, -1, h, w))
        return torch.cat(x_aff, dim=2)

    def forward(self, images: Tensor, masks: Tensor) -> Tensor:
        b, c, h, w = images.shape
        _imgs = self.get_dilated_neighbors(images)  # (b, 3, 48, h, w)
        _pos = self.pos.to(_imgs)
        _imgs_rep = images.unsqueeze(2).repeat(1, 1, _imgs.shape[2], 1, 1)
        _pos_rep = _pos.repeat(b, 1, 1, h, w)
        _imgs_abs = torch.abs(_imgs - _imgs_rep)
        _imgs_std = torch.std(_imgs, dim=2, keepdim=True)
        _pos_std = torch.std(_pos_rep, dim=2, keepdim=True)
        aff = -(_imgs_abs / (_imgs_std + 1e-8) / self.w1) ** 2
        aff = aff.mean(dim=1, keepdim=True)  # (b, 1, 48, h, w)
        pos_aff = -(_pos_rep / (_pos_std + 1e-8) / self.w1) ** 2
        aff = F.softmax(aff, dim=2) + self.w2 * F.softmax(pos_aff, dim=2)
        for _ in range(self.num_iters):
            _masks = self.get_dilated_neighbors(masks)  # (b, M, 48, h, w)
            masks = (_masks * aff).sum(2)
        return masks


@torch.no_grad()
def official_cam_to_seg(par: OfficialPAR, images: Tensor, labels: Tensor, cams: Tensor, score: float) -> Tensor:
    """``cam_to_seg`` (docs/semantics.md, "Pseudo labels") without ``img_box``: (B, H, W) int64 in {0 (bg), k + 1
    (class k)}.

    images (B, 3, H, W) normalised; labels (B, K) multi-hot; cams (B, K, H, W) in [0, 1]; ``score`` the constant
    background channel. PAR runs at half resolution in a per-image Python loop over the present channels.
    """
    b, c, h, w = cams.shape
    img = denormalize(images) * 255.0  # 0..255 pixel values
    cams = F.pad(cams, (0, 0, 0, 0, 1, 0), value=score)  # (B, K + 1, H, W), channel 0 = background
    keys_all = F.pad(labels, (1, 0), value=1.0)  # (B, K + 1)
    img = F.interpolate(img, size=(h // 2, w // 2), mode="bilinear", align_corners=False)
    cams = F.interpolate(cams, size=(h // 2, w // 2), mode="bilinear", align_corners=False)
    seg = torch.full((b, h, w), 255, dtype=torch.long, device=cams.device)
    for i in range(b):
        keys = torch.nonzero(keys_all[i])[:, 0]
        valid_cam = cams[i, keys].unsqueeze(0).softmax(dim=1)  # softmax over bg + present classes
        valid_cam = par(img[i].unsqueeze(0), valid_cam)
        valid_cam = F.interpolate(valid_cam, size=(h, w), mode="bilinear", align_corners=False)
        seg[i] = keys[valid_cam.argmax(dim=1)[0]]
    return seg


@torch.no_grad()
def official_pseudo_affinity(model: nn.Module, images: Tensor, labels: Tensor, *,
                             par: OfficialPAR, layer_index: int = 7, scales: Sequence[float] = (1.0,),
                             bg_low: float = 0.35, bg_high: float = 0.55,
                             ent_weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The whole official pseudo-label branch: gen_msf_cam x labels -> cam_to_seg twice -> fuse -> seg_to_aff.

    Returns (seg (B, H, W) int64, aff (B, P, P) int64)."""
    weights = None if ent_weights is None else (1.0 - ent_weights[:layer_index]).tolist()
    cams = gen_msf_cam(model, images, labels, refine_layers=range(layer_index), refine_weights=weights,
                       scales=scales)
    seg_l = official_cam_to_seg(par, images, labels, cams, bg_low)
    seg_h = official_cam_to_seg(par, images, labels, cams, bg_high)
    seg = fuse_segs(seg_l, seg_h)
    return seg, official_seg_to_aff(seg, patch_size=model.patch_size)


