"""OFFICIAL-FORMULATION REFERENCE (slow, memory-hungry; for tests and benchmarks only).

Runs a ``WSSSViT``'s own weights the way the official AReAM code does (Jessie459/AReAM,
networks/vision_transformer.py + tools/camutils.py + main_voc_mctformer.py): every block materialises its
pre-softmax logits Z_l = scale q kᵀ (B, H, N, N), softmaxes them for the value aggregation and returns Z_l;
the CAM code stacks all L of them (L, B, H, N, N), applies softmax again and the head mean, and builds the
class->patch map and the patch affinity R as dense N x N matrices (spec §1.1, §3.1, §5.1, §9 rows 7-12).

Nothing in the library calls this module; it exists so that tests and benchmarks compare the fused path with
the official formulation.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from aream_fast.models.vit import WSSSViT

EPS = 1e-6


def forward_with_logits(model: WSSSViT, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    """Official forward: returns (class_logits (B, K), patch_logits (B, K), cam (B, K, h, w),
    [Z_l (B, H, N, N) pre-softmax for every block])."""
    x, grid = model.embed(images)
    logits = []
    for blk in model.blocks:
        attn = blk.attn
        b, n, dim = x.shape
        q, k, v = attn.qkv_heads(blk.norm1(x))
        z = (q @ k.transpose(-2, -1)) * attn.scale  # (B, H, N, N)
        a = z.softmax(dim=-1)
        o = attn.proj((a @ v).transpose(1, 2).reshape(b, n, dim))
        x = x + blk.drop_path(o)
        x = x + blk.drop_path(blk.mlp(blk.norm2(x)))
        logits.append(z)
    class_logits, patch_logits, cam = model.heads(x, grid)
    return class_logits, patch_logits, cam, logits


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


def _minmax(cam: Tensor) -> Tensor:
    cam = F.relu(cam)
    flat = cam.flatten(2)
    flat = flat - flat.min(dim=-1, keepdim=True)[0]
    flat = flat / (flat.max(dim=-1, keepdim=True)[0] + EPS)
    return flat.view_as(cam)


@torch.no_grad()
def gen_msf_cam_reference(model: WSSSViT, images: Tensor, labels: Tensor, *, refine_layers: Sequence[int],
                          refine_weights: Optional[Sequence[float]] = None,
                          class_attention_layers: Optional[Sequence[int]] = None,
                          scales: Sequence[float] = (1.0,), flip: bool = True) -> Tensor:
    """Official ``gen_msf_cam`` (spec §3.1) times labels: (B, K, H, W)."""
    b, _, hh, ww = images.shape
    c = model.num_prefix_tokens
    cls_layers = list(range(model.depth)) if class_attention_layers is None else list(class_attention_layers)
    cams = []
    for s in scales:
        size = (int(s * hh), int(s * ww))
        x = images if size == (hh, ww) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        _, _, cam, logits = forward_with_logits(model, x)
        attn = torch.stack(logits)  # (L, B', H, N, N)
        attn_mean = attn.softmax(dim=-1).mean(dim=2)  # (L, B', N, N)
        cam = _refine_dense(cam, attn_mean, c, refine_layers, refine_weights, cls_layers)
        cam = F.interpolate(cam, size=(hh, ww), mode="bilinear", align_corners=False)
        cams.append(cam[:b])
        if flip:
            cams.append(cam[b:].flip(-1))
    cam = _minmax(torch.stack(cams).sum(0))
    return cam * labels[:, :, None, None]


@torch.no_grad()
def cams_from_logits_reference(cam: Tensor, logits: Sequence[Tensor], labels: Tensor, image_size: Tuple[int, int],
                               *, num_prefix_tokens: int, refine_layers: Sequence[int],
                               refine_weights: Optional[Sequence[float]] = None,
                               class_attention_layers: Optional[Sequence[int]] = None) -> Tensor:
    """The §3.1 computation on one forward's cam and logits (no flip, scale 1): (B, K, H, W)."""
    attn_mean = torch.stack(list(logits)).softmax(dim=-1).mean(dim=2)
    cls_layers = list(range(len(logits))) if class_attention_layers is None else list(class_attention_layers)
    cam = _refine_dense(cam, attn_mean, num_prefix_tokens, refine_layers, refine_weights, cls_layers)
    cam = F.interpolate(cam, size=tuple(image_size), mode="bilinear", align_corners=False)
    return _minmax(cam) * labels[:, :, None, None]


@torch.no_grad()
def inference_cam_reference(model: WSSSViT, image: Tensor, labels: Tensor, *, scales: Sequence[float] = (1.0,),
                            flip: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Official ``generate_attention_maps`` (spec §5.1), each view in its own batch-1 forward, eval mode."""
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
            _, _, cam, logits = forward_with_logits(model, x)
            attn_mean = torch.stack(logits).softmax(dim=-1).mean(dim=2)  # (L, 1, N, N)
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
    cam = _minmax(torch.stack(views).sum(0))[0]
    return keys.numpy().astype(np.int64), cam.numpy().astype(np.float32)
