"""CAMs for AReAM pseudo labels and inference seeds, without any N x N attention matrix.

* ``pseudo_label_cams``: the official ``gen_msf_cam`` (docs/semantics.md, "CAM refinement", tools/camutils.py of
  Jessie459/AReAM).
* ``cams_from_output``: the same from the records of a forward that already ran (no extra forward, no flip).
* ``inference_cam``: the official ``--gen_attention_maps`` seeds (docs/semantics.md, "Inference CAMs",
  main_voc_mctformer.py).
* CAM seed files: ``aream_fast.pseudo_labels.seeds``.
* ``present_classes`` / ``PresentCAMs``: with ``present_only=True`` the two pseudo-label functions keep only each
  image's present classes, packed into M = max_b(#present) channels, from the patch-resolution CAM on: every
  step (class-attention product, refinement, upsampling, min-max) is per channel, so the kept channels are the
  same numbers, and the full-resolution (B, K, H, W) map of all K classes (64 MiB at 448 px, K = 20, B = 4) is
  never made. The official pipeline only ever reads present classes from it (docs/semantics.md, "Pseudo labels":
  ``cam_to_seg`` keeps
  the image's keys).

The official code stacks every layer's (B, H, N, N) logits, softmaxes and averages them. Here the
class->patch rows come from the model's C x N class-row softmax (``AttentionRecords.class_attention``) and
the refinement ``R cam`` runs as attention with V = [0; cam] (``aream_fast.pseudo_labels.refine.attention_apply``).

Shapes: B batch, K classes (= C class tokens for MCTformer), (H, W) image size, (h, w) patch grid, P = h*w.
"""
from __future__ import annotations

import os
from typing import Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aream_fast.pseudo_labels.refine import attention_apply
from aream_fast.models.records import AttentionRequest, ViTOutput

MINMAX_EPS = 1e-6  # official per-(b, k) min-max: x <- x - min; x <- x / (max + 1e-6)

LayerWeights = Optional[Union[Sequence[float], Tensor, Mapping[int, float]]]


def _layer_tuple(layers: Sequence[int], depth: int, name: str) -> Tuple[int, ...]:
    out = tuple(int(layer) for layer in layers)
    if not out:
        raise ValueError(f"{name} must name at least one layer, got {layers!r}")
    if any(not 0 <= layer < depth for layer in out):
        raise ValueError(f"{name} must hold layer indices in [0, {depth}), got {layers!r}")
    return out


def _weights_for(refine_layers: Tuple[int, ...], refine_weights: LayerWeights) -> Optional[list]:
    """Per-layer multipliers aligned with ``refine_layers`` (official 'E': 1 - e_l), or None ('U')."""
    if refine_weights is None:
        return None
    if isinstance(refine_weights, Mapping):
        missing = [layer for layer in refine_layers if layer not in refine_weights]
        if missing:
            raise ValueError(f"refine_weights (a layer -> weight mapping) lacks layers {missing}")
        return [float(refine_weights[layer]) for layer in refine_layers]
    weights = refine_weights.tolist() if isinstance(refine_weights, Tensor) else list(refine_weights)
    if len(weights) != len(refine_layers):
        raise ValueError(f"refine_weights must have one multiplier per refine layer ({len(refine_layers)}, "
                         f"aligned with refine_layers), got {len(weights)}")
    return [float(w) for w in weights]


def _check_labels(labels: Tensor, batch: int, num_classes: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.shape != (batch, num_classes):
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels)
        raise ValueError(f"labels must be a (B, K) = ({batch}, {num_classes}) multi-hot tensor, got {got}")
    return labels


class PresentCAMs(NamedTuple):
    """CAMs of each image's present classes only, packed first (``present_classes`` order).

    cams: (B, M, H, W) float32 in [0, 1]; padding channels are 0.
    classes: (B, M) int64 class index (0..K-1) of each channel; padding channels repeat 0.
    valid: (B, M) bool, False on padding channels (image b has fewer than M present classes).
    M = max over the batch of the number of present classes (0 when no image has one).
    """

    cams: Tensor
    classes: Tensor
    valid: Tensor


def present_classes(labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Each image's present classes (nonzero labels), ascending, packed first: the official key order.

    labels (B, K). Returns classes (B, M) int64 (padding: 0) and valid (B, M) bool, M = max_b #present.
    """
    present = labels != 0
    b = labels.shape[0]
    m = int(present.sum(1).max()) if b else 0
    order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)[:, :m]  # present first, ascending
    valid = torch.arange(m, device=labels.device).view(1, -1) < present.sum(1, keepdim=True)
    return torch.where(valid, order, torch.zeros_like(order)), valid


def _gather_channels(x: Tensor, classes: Tensor) -> Tensor:
    """x (B, K, ...) -> (B, M, ...) channels ``classes`` (B, M) of each image."""
    index = classes.view(classes.shape + (1,) * (x.dim() - 2)).expand(classes.shape + x.shape[2:])
    return x.gather(1, index)


def minmax_normalise(cam: Tensor) -> Tensor:
    """ReLU, then per (b, k) x <- x - min(x), x <- x / (max(x) + 1e-6). cam (B, K, H, W); returns a new tensor."""
    return minmax_normalise_(cam.clone())


def minmax_normalise_(cam: Tensor, labels: Optional[Tensor] = None) -> Tensor:
    """In-place ``minmax_normalise`` of a contiguous (B, K, H, W) cam, then (optionally) ``cam *= labels``
    ((B, K) multi-hot). Used on freshly upsampled full-resolution maps, where every out-of-place step would
    allocate another B*K*H*W buffer (64 MiB at 448 px, K = 20)."""
    if cam.numel() == 0:
        return cam
    flat = cam.relu_().view(cam.shape[0], cam.shape[1], -1)
    flat.sub_(flat.amin(dim=-1, keepdim=True))
    flat.div_(flat.amax(dim=-1, keepdim=True).add_(MINMAX_EPS))
    if labels is not None:
        flat.mul_(labels.to(flat.dtype)[:, :, None])
    return cam


def refine_cam(out: ViTOutput, refine_layers: Tuple[int, ...], refine_weights: Optional[list],
               classes: Optional[Tensor] = None) -> Tensor:
    """cam (B, K, h, w) ⊙ class attention (C > 1) refined by R = (1/L) sum_l w_l Ā_l[C:, C:]
    (docs/semantics.md, "CAM refinement", before upsampling). Returns (B, K, h, w) float32, or (B, M, h, w) for the
    channels ``classes`` (B, M) only (``present_classes``; class c pairs with class token c)."""
    rec = out.records
    if rec is None:
        raise ValueError("the forward output has no records: run the model with an AttentionRequest")
    missing = [layer for layer in refine_layers if layer not in rec.qs]
    if missing:
        raise ValueError(f"records lack q/k of refine layers {missing}; request them as refine_layers "
                         f"(or supervised_layers)")
    cam = out.cam.float()
    b, _, h, w = cam.shape
    c = rec.num_prefix_tokens
    if c > 1 and rec.class_attention is None:
        raise ValueError("an MCT model (C > 1 class tokens) needs records.class_attention; request "
                         "class_attention_layers")
    if classes is not None:
        cam = _gather_channels(cam, classes)
    kk = cam.shape[1]
    if kk == 0:
        return cam.new_zeros(b, 0, h, w)
    if c > 1:
        cls_attn = rec.class_attention.detach().float()
        if classes is not None:
            cls_attn = _gather_channels(cls_attn, classes)
        cam = cam * cls_attn.view(b, kk, h, w)
    refined = attention_apply([rec.qs[layer] for layer in refine_layers],
                              [rec.ks[layer] for layer in refine_layers],
                              cam.flatten(2), num_prefix_tokens=c, scale=rec.scale,
                              layer_weights=refine_weights)
    return refined.view(b, kk, h, w)


@torch.no_grad()
def pseudo_label_cams(model: nn.Module, images: Tensor, labels: Tensor, *, refine_layers: Sequence[int],
                      refine_weights: LayerWeights = None, class_attention_layers: Optional[Sequence[int]] = None,
                      scales: Sequence[float] = (1.0,), flip: bool = True,
                      present_only: bool = False) -> Union[Tensor, PresentCAMs]:
    """Official ``gen_msf_cam`` (docs/semantics.md, "CAM refinement") for the AReAM pseudo labels, without N x N
    attention.

    The model stays in its current mode (officially train mode: DropPath active). For each scale s: bilinear
    resize to (int(sH), int(sW)) (skipped at the same size; must stay a multiple of the patch size), batch
    [x_s; flip_w(x_s)], forward; cam ⊙ class->patch attention averaged over ``class_attention_layers`` (all
    layers when None; MCT models only); refine with R = mean over ``refine_layers`` of Ā_l[C:, C:] ('U') or
    (1/L) sum_l w_l Ā_l[C:, C:] with ``refine_weights`` w_l = 1 - e_l ('E'; a sequence aligned with
    refine_layers or a layer -> weight mapping); bilinear upsample to (H, W); un-flip; sum over scales and
    flips; ReLU; per-(b, k) min-max (eps 1e-6); multiply by ``labels``.

    images (B, 3, H, W) normalised; labels (B, K) multi-hot. Returns (B, K, H, W) float32 in [0, 1], or with
    ``present_only`` a :class:`PresentCAMs` holding the same maps of each image's present classes only.
    """
    depth = model.depth
    refine = _layer_tuple(refine_layers, depth, "refine_layers")
    weights = _weights_for(refine, refine_weights)
    cls_layers = tuple(range(depth)) if class_attention_layers is None else \
        _layer_tuple(class_attention_layers, depth, "class_attention_layers")
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got {getattr(images, 'shape', type(images))}")
    b, _, hh, ww = images.shape
    labels = _check_labels(labels, b, model.num_classes)
    if not scales:
        raise ValueError("scales must hold at least one scale, got an empty sequence")
    request = AttentionRequest(refine_layers=refine, class_attention_layers=cls_layers)
    classes, valid = present_classes(labels) if present_only else (None, None)
    view_classes = None if classes is None else (torch.cat([classes, classes]) if flip else classes)
    total = None
    for s in scales:
        size = (int(s * hh), int(s * ww))
        ps = model.patch_size
        if size != (hh, ww) and (size[0] <= 0 or size[1] <= 0 or size[0] % ps or size[1] % ps):
            raise ValueError(f"scales: scale {s} turns the {hh}x{ww} images into {size[0]}x{size[1]}, which is not "
                             f"a positive multiple of the patch size {ps}")
        x = images if size == (hh, ww) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        out = model(x, request)
        cam = refine_cam(out, refine, weights, view_classes)
        del out
        # Bilinear upsampling (align_corners=False) is linear and commutes with a horizontal flip, so the
        # views are un-flipped and summed at patch resolution and upsampled once: the same sum as the
        # official upsample-then-sum (up to fp32 rounding) without 2B x K x H x W temporaries.
        view_sum = cam[:b] + cam[b:].flip(-1) if flip else cam
        view_sum = _upsample(view_sum, (hh, ww))
        total = view_sum if total is None else total.add_(view_sum)
    return _normalised(total, labels, classes, valid)


def _upsample(cam: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear (align_corners False) resize of (B, M, h, w) to ``size``; M may be 0 (no present class)."""
    if cam.shape[1] == 0:
        return cam.new_zeros(cam.shape[0], 0, *size)
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)


def _normalised(cam: Tensor, labels: Tensor, classes: Optional[Tensor],
                valid: Optional[Tensor]) -> Union[Tensor, PresentCAMs]:
    """In-place min-max of the summed full-resolution views, times the labels (of the kept channels)."""
    if classes is None:
        return minmax_normalise_(cam.contiguous(), labels)
    kept_labels = labels.gather(1, classes) * valid.to(labels.dtype)
    return PresentCAMs(minmax_normalise_(cam.contiguous(), kept_labels), classes, valid)


@torch.no_grad()
def cams_from_output(out: ViTOutput, labels: Tensor, image_size: Tuple[int, int], *,
                     refine_layers: Sequence[int], refine_weights: LayerWeights = None,
                     present_only: bool = False) -> Union[Tensor, PresentCAMs]:
    """``pseudo_label_cams`` from an existing forward's cam and records (no extra forward, no flip, scale 1):
    for ``--pseudo-from-forward``. The class attention is whatever ``class_attention_layers`` that forward
    requested (officially all layers); ``refine_layers`` must be in its records (refine or supervised).

    out: ViTOutput with records; labels (B, K); image_size (H, W). Returns (B, K, H, W) float32 in [0, 1], or
    with ``present_only`` a :class:`PresentCAMs` of each image's present classes only.
    """
    if out.records is None:
        raise ValueError("out.records is None: run the forward with an AttentionRequest")
    refine = tuple(int(layer) for layer in refine_layers)
    if not refine:
        raise ValueError("refine_layers must name at least one layer")
    weights = _weights_for(refine, refine_weights)
    b, kk = out.cam.shape[:2]
    labels = _check_labels(labels, b, kk)
    hh, ww = int(image_size[0]), int(image_size[1])
    classes, valid = present_classes(labels) if present_only else (None, None)
    cam = refine_cam(out, refine, weights, classes)
    return _normalised(_upsample(cam, (hh, ww)), labels, classes, valid)


@torch.no_grad()
def inference_cam(model: nn.Module, image: Tensor, labels: Tensor, *, scales: Sequence[float] = (1.0,),
                  flip: bool = True, flip_after_pad: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Official CAM seeds (docs/semantics.md, "Inference CAMs", ``generate_attention_maps``), without N x N attention.

    Runs in eval mode (the previous mode is restored afterwards). For each scale s (the image bicubic-resized
    to (int(sH), int(sW)) when s != 1; the official code resizes with PIL, so s != 1 is close to, not bit-equal
    to, it) and its horizontal flip: zero-pad right/bottom to a multiple of the patch size, forward with
    position-embedding interpolation, cam ⊙ class attention (mean over ALL layers, MCT only), keep the
    present classes, refine with R = mean over ALL layers of Ā_l[C:, C:] (uniform, no entropy weights),
    bilinear to the padded size, crop, flip back, bilinear to (H, W). Sum the views, ReLU, per-class min-max
    (eps 1e-6).

    flip_after_pad: pad first, then flip (the flipped view has its padding on the left), as the official
    Conformer inference (infer_conformer.py, docs/semantics.md, "Inference CAMs") does; False (MCTformer,
    docs/semantics.md, "Inference CAMs") pads each view on
    the right.

    image (3, H, W) normalised; labels (K,) multi-hot. Returns (keys int64 (k,), cam float32 (k, H, W)) as
    numpy arrays, k = number of present classes (0 if none; the official code then writes no file).
    """
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != model.in_chans:
        raise ValueError(f"image must be ({model.in_chans}, H, W), got {getattr(image, 'shape', type(image))}")
    if not isinstance(labels, Tensor) or labels.shape != (model.num_classes,):
        raise ValueError(f"labels must be a (K,) = ({model.num_classes},) multi-hot tensor, "
                         f"got {getattr(labels, 'shape', type(labels))}")
    if not scales:
        raise ValueError("scales must hold at least one scale, got an empty sequence")
    keys = torch.nonzero(labels > 0).flatten()
    _, hh, ww = image.shape
    if keys.numel() == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, hh, ww), dtype=np.float32)
    depth = model.depth
    all_layers = tuple(range(depth))
    request = AttentionRequest(refine_layers=all_layers, class_attention_layers=all_layers)
    ps = model.patch_size
    was_training = model.training
    model.eval()
    try:
        total = None
        for s in scales:
            size = (int(s * hh), int(s * ww))
            x = image[None]
            if size != (hh, ww):
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
            pad_h, pad_w = (-size[0]) % ps, (-size[1]) % ps
            if flip and not flip_after_pad:
                x = torch.cat([x, x.flip(-1)], dim=0)  # the two views share one batch (eval mode: independent)
            x = F.pad(x, (0, pad_w, 0, pad_h))  # zeros in normalised space, right / bottom
            if flip and flip_after_pad:
                x = torch.cat([x, x.flip(-1)], dim=0)
            out = model(x, request)
            cam = refine_cam(out, all_layers, None, classes=keys[None].expand(out.cam.shape[0], -1))
            cam = F.interpolate(cam, size=(size[0] + pad_h, size[1] + pad_w), mode="bilinear", align_corners=False)
            if flip and flip_after_pad:
                cam = torch.cat([cam[:1], cam[1:].flip(-1)], dim=0)
            cam = cam[:, :, :size[0], :size[1]]
            if flip and not flip_after_pad:
                cam = torch.cat([cam[:1], cam[1:].flip(-1)], dim=0)
            if size != (hh, ww):
                cam = F.interpolate(cam, size=(hh, ww), mode="bilinear", align_corners=False)
            view_sum = cam.sum(dim=0, keepdim=True)
            total = view_sum if total is None else total + view_sum
    finally:
        model.train(was_training)
    cam = minmax_normalise_(total.contiguous())[0]
    return keys.cpu().numpy().astype(np.int64), cam.cpu().numpy().astype(np.float32)
