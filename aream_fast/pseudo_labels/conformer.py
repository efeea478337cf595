"""Conformer (TransCAM-style AReAM) pseudo labels, inference CAMs and training settings, without N x N attention.

The Conformer has one class token, so the CAM path is the one-class-token path of docs/semantics.md, "CAM refinement":
no
class->patch
product, the patch block is [1:, 1:], and the cam is the raw (not ReLU'd) CNN map. The functions here set the
Conformer's official values (main_voc_conformer.py, config.py, infer_conformer.py of Jessie459/AReAM) on top
of the shared pieces: ``aream_fast.pseudo_labels.cam.pseudo_label_cams`` (multi-scale + flip CAMs, refinement by
``attention_apply``), ``aream_fast.pseudo_labels.labels.cams_to_patch_labels`` (PAR, the two background scores,
fusion, patch sampling).

* ``conformer_pseudo_label_cams``: ``gen_msf_cam`` at scales 0.5 / 1 / 1.5 with flips, refinement over
  layers 0..layer_index-1 (layer_index 9).
* ``conformer_patch_labels``: the pseudo labels of the AReAM loss, with the official crop-box rule
  (``apply_crop_box``: patches whose sampled pixel lies outside the image's crop box are ignored).
* ``conformer_inference_cam``: infer_conformer.py seeds (docs/semantics.md, "Inference CAMs"): scales 0.5 / 1 / 1.5 of
  the native size,
  each padded to a multiple of 16 and then batched with its flip, refinement over all layers.
* ``CONFORMER_TRAINING``, ``conformer_param_groups``, ``conformer_lr_schedule``: the official optimiser and
  schedule (docs/semantics.md, "Training details").

Shapes: B batch, K classes, (H, W) image size, (h, w) = (H/16, W/16) token grid, P = h * w.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from aream_fast import cams_to_patch_labels, inference_cam, pseudo_label_cams
from aream_fast.pseudo_labels.cam import LayerWeights

CONFORMER_LAYER_INDEX = 9  # loss on layers 9..11, refinement on 0..8 (main_voc_conformer.sh)
CONFORMER_PSEUDO_SCALES = (0.5, 1.0, 1.5)  # main_voc_conformer.py: gen_msf_cam(scales=[0.5, 1.0, 1.5])
CONFORMER_INFERENCE_SCALES = (0.5, 1.0, 1.5)  # infer_conformer.py --scales

# main_voc_conformer.sh + config.py (docs/semantics.md, "Training details"). lr_scale multiplies the lr of every
# parameter whose name
# contains "head" (cnn_head, att_head). The schedule is per optimizer step: ``conformer_lr_schedule``.
CONFORMER_TRAINING: Dict[str, object] = dict(
    model="conformer_small", crop_size=384, batch_size=8, epochs=12, warmup_epochs=1, cls_epochs=2,
    layer_index=CONFORMER_LAYER_INDEX, lr=5e-5, lr_scale=10.0, start_lr=1e-6, final_lr=1e-6, weight_decay=0.01,
    betas=(0.9, 0.999), eps=1e-8, aream_weight=0.1, bg_low=0.35, bg_high=0.55,
    pseudo_scales=CONFORMER_PSEUDO_SCALES, inference_scales=CONFORMER_INFERENCE_SCALES,
    random_scale=(0.5, 2.0), color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_p=0.8, hflip_p=0.5,
)


def conformer_layers(depth: int = 12, layer_index: int = CONFORMER_LAYER_INDEX) -> Tuple[Tuple[int, ...],
                                                                                           Tuple[int, ...]]:
    """(supervised layers [layer_index, depth), refine layers [0, layer_index)); 9 of 12 -> (9..11, 0..8)."""
    if not 0 < layer_index < depth:
        raise ValueError(f"layer_index must be in (0, depth={depth}), got {layer_index}")
    return tuple(range(layer_index, depth)), tuple(range(layer_index))


@torch.no_grad()
def conformer_pseudo_label_cams(model: nn.Module, images: Tensor, labels: Tensor, *,
                                layer_index: int = CONFORMER_LAYER_INDEX, refine_weights: LayerWeights = None,
                                scales: Sequence[float] = CONFORMER_PSEUDO_SCALES, present_only: bool = False):
    """Official Conformer ``gen_msf_cam`` (docs/semantics.md, "CAM refinement", one class token) via
    ``aream_fast.pseudo_labels.cam.pseudo_label_cams``.

    The model stays in its mode (officially train: BN uses and updates the statistics of each [x_s; flip(x_s)]
    batch). images (B, 3, H, W) normalised, H/2 and 3H/2 (and W) multiples of 16 for the default scales (384
    crops are); labels (B, K). refine_weights: None ('U') or 1 - e_l for layers 0..layer_index-1 ('E').
    Returns (B, K, H, W) float32 in [0, 1] (times the labels), or ``PresentCAMs`` with ``present_only``.
    """
    _, refine = conformer_layers(model.depth, layer_index)
    return pseudo_label_cams(model, images, labels, refine_layers=refine, refine_weights=refine_weights,
                             scales=scales, flip=True, present_only=present_only)


def _check_img_box(img_box: Union[Tensor, np.ndarray, Sequence[Sequence[int]]], batch: int,
                   image_size: Tuple[int, int]) -> Tensor:
    box = torch.as_tensor(np.asarray(img_box.cpu() if isinstance(img_box, Tensor) else img_box))
    if box.shape != (batch, 4) or box.is_floating_point() or box.dtype == torch.bool:
        raise ValueError(f"img_box must be (B, 4) = ({batch}, 4) integers (i1, i2, j1, j2), got "
                         f"{tuple(box.shape)} {box.dtype}")
    hh, ww = image_size
    i1, i2, j1, j2 = box.long().unbind(1)
    if bool(((i1 < 0) | (i1 > i2) | (i2 > hh) | (j1 < 0) | (j1 > j2) | (j2 > ww)).any()):
        raise ValueError(f"img_box rows must satisfy 0 <= i1 <= i2 <= H={hh} and 0 <= j1 <= j2 <= W={ww}, "
                         f"got {box.tolist()}")
    return box.long()


def crop_box_patch_mask(img_box, image_size: Tuple[int, int], patch_size: int = 16) -> Tensor:
    """(B, P) bool: True where patch (i, j)'s sampled pixel (patch_size*i, patch_size*j) lies in the crop box.

    img_box: (B, 4) integers (i1, i2, j1, j2), the image's rows [i1, i2) and columns [j1, j2) inside the
    crop (datasets/transforms.py ``RandomCrop`` of the official code; the rest is the crop's zero padding).
    The official ``cam_to_seg`` writes only the box and leaves 255 elsewhere; ``seg_to_aff`` then reads the
    top-left pixel of each patch (docs/semantics.md, "Pseudo labels", "Patch labels"), so a patch is ignored iff that
    pixel is outside.
    """
    hh, ww = int(image_size[0]), int(image_size[1])
    if hh % patch_size or ww % patch_size:
        raise ValueError(f"image_size must be multiples of patch_size={patch_size}, got {image_size}")
    box = _check_img_box(img_box, len(img_box), (hh, ww))
    rows = torch.arange(0, hh, patch_size)
    cols = torch.arange(0, ww, patch_size)
    in_rows = (rows[None] >= box[:, 0:1]) & (rows[None] < box[:, 1:2])  # (B, h)
    in_cols = (cols[None] >= box[:, 2:3]) & (cols[None] < box[:, 3:4])  # (B, w)
    return (in_rows[:, :, None] & in_cols[:, None, :]).flatten(1)


def apply_crop_box(patch_labels: Tensor, img_box, image_size: Tuple[int, int], patch_size: int = 16,
                   ignore_index: int = 255) -> Tensor:
    """patch_labels (B, P) int64 with ``ignore_index`` wherever ``crop_box_patch_mask`` is False (new tensor).
    img_box None returns the labels unchanged (the MCTformer path passes no box)."""
    if img_box is None:
        return patch_labels
    if patch_labels.dim() != 2:
        raise ValueError(f"patch_labels must be (B, P), got {tuple(patch_labels.shape)}")
    if len(img_box) != patch_labels.shape[0]:
        raise ValueError(f"img_box must have one row per image ({patch_labels.shape[0]}), got {len(img_box)}")
    mask = crop_box_patch_mask(img_box, image_size, patch_size).to(patch_labels.device)
    if mask.shape != patch_labels.shape:
        raise ValueError(f"patch_labels {tuple(patch_labels.shape)} do not match the {image_size} image grid "
                         f"of patch size {patch_size}")
    return patch_labels.masked_fill(~mask, ignore_index)


@torch.no_grad()
def conformer_patch_labels(model: nn.Module, images: Tensor, labels: Tensor, *, par: nn.Module, img_box=None,
                           layer_index: int = CONFORMER_LAYER_INDEX, refine_weights: LayerWeights = None,
                           scales: Sequence[float] = CONFORMER_PSEUDO_SCALES, bg_low: float = 0.35,
                           bg_high: float = 0.55) -> Tensor:
    """The AReAM-loss pseudo labels of main_voc_conformer.py: multi-scale CAMs -> PAR at both background
    scores -> fusion -> per-patch labels -> crop box. images (B, 3, H, W) normalised; labels (B, K);
    par: ``aream_fast.PAR``; img_box: (B, 4) (i1, i2, j1, j2) or None. Returns (B, P) int64 (0 bg, k+1 class
    k, 255 ignore)."""
    cams = conformer_pseudo_label_cams(model, images, labels, layer_index=layer_index,
                                       refine_weights=refine_weights, scales=scales, present_only=True)
    _, patch_labels = cams_to_patch_labels(images, cams, labels, par=par, patch_size=model.patch_size,
                                           bg_low=bg_low, bg_high=bg_high, sample_only=True)
    return apply_crop_box(patch_labels, img_box, tuple(images.shape[-2:]), model.patch_size)


def conformer_inference_cam(model: nn.Module, image: Tensor, labels: Tensor, *,
                            scales: Sequence[float] = CONFORMER_INFERENCE_SCALES,
                            flip: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """infer_conformer.py seeds for one image (docs/semantics.md, "Inference CAMs"), without N x N attention, via
    ``aream_fast.pseudo_labels.cam.inference_cam(flip_after_pad=True)``.

    Eval mode (restored afterwards). Per scale s: the image bicubic-resized to (int(sH), int(sW)) (the
    official code resizes the PIL image, so s != 1 is close to, not bit-equal to, it), zero-padded right/bottom
    to a multiple of 16, **then** batched with its flip (the flipped view has its padding on the left, as the
    official code); cam = raw CNN map of the present classes (one class token: no class-attention product),
    refined by R = mean over all layers of Ā_l[1:, 1:]; bilinear to the padded size, flip back, crop, bilinear
    to (H, W). Sum the views, ReLU, per-class min-max (eps 1e-6).

    image (3, H, W) normalised; labels (K,) multi-hot. Returns (keys int64 (k,), cam float32 (k, H, W)).
    """
    return inference_cam(model, image, labels, scales=scales, flip=flip, flip_after_pad=True)


def conformer_param_groups(model: nn.Module, *, weight_decay: float = 0.01, lr_scale: float = 10.0) -> List[Dict]:
    """main_voc_conformer.py ``get_param_groups``: four AdamW groups, in this order:
    decayed / not decayed backbone parameters (lr_scale 1), decayed / not decayed "head" parameters (every
    name containing "head": ``cnn_head``, ``att_head``; lr_scale ``lr_scale``). Not decayed: 1-D parameters,
    ``*.bias`` and the model's ``no_weight_decay()`` names (``cls_token``). Each group has "lr_scale": set
    ``lr = base_lr * lr_scale`` per step (``aream_fast.engine.schedule.WarmupCosineSchedule`` does)."""
    module = getattr(getattr(model, "module", model), "_orig_mod", getattr(model, "module", model))
    exempt = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    groups: Dict[Tuple[bool, bool], List[nn.Parameter]] = {(h, d): [] for h in (False, True) for d in (True, False)}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in exempt
        groups[("head" in name, not no_decay)].append(param)
    return [{"params": groups[(head, decay)], "lr_scale": lr_scale if head else 1.0,
             "weight_decay": weight_decay if decay else 0.0}
            for head in (False, True) for decay in (True, False)]


def conformer_lr_schedule(base_lr: float, *, start_lr: float = 1e-6, final_lr: float = 1e-6, total_steps: int,
                          warmup_steps: int = 0) -> np.ndarray:
    """optim.py ``cosine_schedule`` of the official code: lr of each optimizer step, (total_steps,) float64.

    Warm-up: ``np.linspace(start_lr, base_lr, warmup_steps)`` (both ends included, so the last warm-up step
    runs at base_lr); then final_lr + 0.5 (base_lr - final_lr) (1 + cos(pi t / T)) for t = 0..T-1,
    T = total_steps - warmup_steps. Official: warmup_steps = 1 epoch, total_steps = 12 epochs of steps.
    (``WarmupCosineSchedule(warmup_lr=1e-6, min_lr=1e-6)`` equals it after the warm-up; during the warm-up it
    ramps by (base - start) / warmup_steps per step instead of / (warmup_steps - 1).)
    """
    if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need total_steps > 0 and 0 <= warmup_steps < total_steps, got total_steps="
                         f"{total_steps}, warmup_steps={warmup_steps}")
    warm = np.linspace(start_lr, base_lr, warmup_steps) if warmup_steps > 0 else np.zeros(0)
    t = np.arange(total_steps - warmup_steps)
    cos = final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(np.pi * t / len(t)))
    return np.concatenate([warm, cos])
