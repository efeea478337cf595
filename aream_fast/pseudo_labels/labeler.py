"""``PseudoLabeler``: per-patch pseudo labels for the affinity loss from image-level labels, in one object.

It owns everything the official pseudo-label path needs (docs/semantics.md, "Pseudo labels"): the layer split
(which layers refine the CAM, and their entropy weights), the scales and flip of the separate forward, PAR, the
two background scores and the patch sampling rule. The training step only asks it for labels::

    labeler = PseudoLabeler(split, par=PAR(), patch_size=16)
    patch_labels = labeler.from_model(model, images, labels)           # separate no-grad forward (official)
    patch_labels = labeler.from_output(out, images, labels)            # the training forward's own CAM

Shapes: images (B, 3, H, W) normalised, labels (B, K) multi-hot, patch labels (B, P) int64 with 0 background,
k + 1 class k and 255 ignored, P = (H / patch_size) * (W / patch_size).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from aream_fast.models.records import AttentionRequest, LayerSplit, ViTOutput
from aream_fast.pseudo_labels.cam import cams_from_output, pseudo_label_cams
from aream_fast.pseudo_labels.labels import cams_to_patch_labels

IGNORE_INDEX = 255
BG_LOW = 0.35  # official low background score (ignore band lower edge)
BG_HIGH = 0.55  # official high background score


class PseudoLabeler:
    """Pseudo labels of the affinity loss. ``par`` is a :class:`aream_fast.pseudo_labels.par.PAR` module on the
    images' device; ``scales`` and ``flip`` are those of the separate forward (official: (1.0,), flip)."""

    def __init__(self, split: LayerSplit, *, par: nn.Module, patch_size: int, scales: Sequence[float] = (1.0,),
                 flip: bool = True, bg_low: float = BG_LOW, bg_high: float = BG_HIGH):
        if not 0.0 <= bg_low <= bg_high <= 1.0:
            raise ValueError(f"background scores must satisfy 0 <= bg_low <= bg_high <= 1, got {bg_low}, {bg_high}")
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty sequence of positive floats, got {list(scales)}")
        self.split = split
        self.par = par
        self.patch_size = int(patch_size)
        self.scales = tuple(float(s) for s in scales)
        self.flip = bool(flip)
        self.bg_low = float(bg_low)
        self.bg_high = float(bg_high)

    def training_request(self, *, from_forward: bool) -> AttentionRequest:
        """What the training forward must export: the supervised layers' q, k, plus (``from_forward``) the
        refine layers and the class attention that ``from_output`` reads."""
        split = self.split
        if from_forward:
            return AttentionRequest(supervised_layers=split.supervised_layers, refine_layers=split.refine_layers,
                                    class_attention_layers=split.all_layers)
        return AttentionRequest(supervised_layers=split.supervised_layers)

    @torch.no_grad()
    def from_model(self, model: Callable, images: Tensor, labels: Tensor, *,
                   autocast: Optional[Callable] = None, img_box=None) -> Tensor:
        """Official labels: a separate no-grad forward of ``model`` on [x; flip(x)] at each scale, the shallow
        layers' refinement, PAR, both background scores, patch sampling. img_box: None, or (B, 4) int
        (i1, i2, j1, j2) crop boxes (Conformer data): patches outside them are ignored. -> (B, P) int64."""
        ctx = autocast() if autocast is not None else contextlib.nullcontext()
        with ctx:
            cams = pseudo_label_cams(model, images, labels, refine_layers=self.split.refine_layers,
                                     refine_weights=self.split.refine_weights,
                                     class_attention_layers=self.split.all_layers, scales=self.scales,
                                     flip=self.flip, present_only=True)
        return self._patch_labels(images, cams, labels, img_box)

    @torch.no_grad()
    def from_output(self, out: ViTOutput, images: Tensor, labels: Tensor, *, img_box=None) -> Tensor:
        """Labels from a forward that already ran with ``training_request(from_forward=True)`` (no extra
        forward, no flip); img_box as in :meth:`from_model`. -> (B, P) int64."""
        cams = cams_from_output(out, labels, tuple(images.shape[-2:]), refine_layers=self.split.refine_layers,
                                refine_weights=self.split.refine_weights, present_only=True)
        return self._patch_labels(images, cams, labels, img_box)

    def _patch_labels(self, images: Tensor, cams, labels: Tensor, img_box=None) -> Tensor:
        from aream_fast.pseudo_labels.conformer import apply_crop_box

        _, patch_labels = cams_to_patch_labels(images, cams, labels, par=self.par, patch_size=self.patch_size,
                                               bg_low=self.bg_low, bg_high=self.bg_high,
                                               ignore_index=IGNORE_INDEX, sample_only=True)
        return apply_crop_box(patch_labels, img_box, tuple(images.shape[-2:]), self.patch_size, IGNORE_INDEX)
