"""One AReAM training step (spec §2), as the engine runs it.

Per step, with images (B, 3, S, S) normalised and labels (B, K) multi-hot:

1. (default, official) pseudo labels under no_grad from a **separate** forward on [x; flip(x)] with the
   shallow layers' attention (``aream_fast.pseudo_labels.cam.pseudo_label_cams`` with ``present_only``: each image's
   present classes only, the channels the official ``cam_to_seg`` reads; spec §3.1), then PAR + the two background
   thresholds + per-patch sampling (``aream_fast.pseudo_labels.labels.cams_to_patch_labels``, spec §3.2-3.4; with
   ``sample_only=True``: the upsampled map is evaluated only at the P pixels the patch labels read -- the same
   labels as the full-resolution argmax, spec §3.4 "Consequence");
2. training forward with ``AttentionRequest(supervised_layers=layer_index..depth-1)``;
   ``L_cls = MLSM(class_logits, y) + MLSM(patch_logits, y)``;
3. ``--pseudo-from-forward``: pseudo labels from the training forward's own CAM and records
   (``aream_fast.pseudo_labels.cam.cams_from_output``; no extra forward, no flip) instead of step 1;
4. ``total = L_cls + λ · aream_loss(q_l, k_l of the supervised layers, patch_labels, layer_weights)``
   after the ``cls_epochs`` warm-up; ``total = L_cls`` before it and for ``--no-aream``. With
   ``defer_loss_grad`` (the eager default, ``--loss-grad layer``) the same loss comes from
   ``aream_fast.losses.deferred.deferred_aream_loss``: each layer's q/k gradient is made inside that layer's
   backward instead of being held from the forward across the memory peak.

Compile: the training model (possibly DDP-wrapped) and the loss function are compiled separately by the
trainer; pseudo-label computation runs outside those graphs. Shapes are fixed per phase (drop_last), so each
graph compiles once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aream_fast.losses.classification import classification_loss
from aream_fast.models.records import AttentionRequest, LayerSplit


class AReAMStep:
    """Computes the total loss of one step. ``__call__(images, labels, aream_active) -> (total, terms)``.

    model: the raw ``WSSSViT`` (for attributes and the pseudo-label forward when ``pseudo_model`` is None).
    train_model: what the training forward calls (raw, DDP-wrapped and/or compiled).
    pseudo_model: what the pseudo-label forward calls (raw or compiled raw model; no DDP: no grad, no sync).
    loss_fn: ``aream_fast.losses.aream.aream_loss`` or its compiled wrapper (same signature).
    par: ``aream_fast.pseudo_labels.par.PAR`` instance (on the training device).
    autocast: a zero-argument callable returning the autocast context for forwards.
    """

    def __init__(self, *, model: nn.Module, train_model: Callable, pseudo_model: Optional[Callable],
                 layout: LayerSplit, aream: bool, pseudo_from_forward: bool, aream_weight: float,
                 loss_fn: Callable, par: Optional[nn.Module], pseudo_scales: Sequence[float] = (1.0,),
                 bg_low: float = 0.35, bg_high: float = 0.55, loss_backend: str = "auto",
                 autocast: Callable = None, defer_loss_grad: bool = False):
        self.model = model
        self.train_model = train_model
        self.pseudo_model = pseudo_model if pseudo_model is not None else model
        self.layout = layout
        self.aream = aream
        self.pseudo_from_forward = pseudo_from_forward
        self.aream_weight = float(aream_weight)
        self.loss_fn = loss_fn
        self.par = par
        self.pseudo_scales = tuple(pseudo_scales)
        self.bg_low = bg_low
        self.bg_high = bg_high
        self.loss_backend = loss_backend
        self.autocast = autocast
        self.defer_loss_grad = bool(defer_loss_grad) and aream
        if aream and par is None:
            raise ValueError("par must be a PAR module when aream=True")
        # One request for the whole run (warm-up included) so the compiled training graph never changes.
        if not aream:
            self.request = None
        elif pseudo_from_forward:
            self.request = AttentionRequest(supervised_layers=layout.supervised_layers,
                                            refine_layers=layout.refine_layers,
                                            class_attention_layers=layout.all_layers,
                                            defer_loss_grad=self.defer_loss_grad)
        else:
            self.request = AttentionRequest(supervised_layers=layout.supervised_layers,
                                            defer_loss_grad=self.defer_loss_grad)

    def pseudo_labels_separate(self, images: Tensor, labels: Tensor) -> Tensor:
        """Official pseudo labels: separate no-grad forward on image + flip (spec §3.1-3.4). -> (B, P) int64."""
        from aream_fast.pseudo_labels.cam import pseudo_label_cams

        with torch.no_grad(), self.autocast():
            cams = pseudo_label_cams(self.pseudo_model, images, labels, refine_layers=self.layout.refine_layers,
                                     refine_weights=self.layout.refine_weights,
                                     class_attention_layers=self.layout.all_layers, scales=self.pseudo_scales,
                                     flip=True, present_only=True)
        return self._patch_labels(images, cams, labels)

    def _patch_labels(self, images: Tensor, cams, labels: Tensor) -> Tensor:
        """cams: ``PresentCAMs`` (the present classes only, at full resolution) -> (B, P) int64 labels."""
        from aream_fast.pseudo_labels.labels import cams_to_patch_labels

        with torch.no_grad():
            _, patch_labels = cams_to_patch_labels(images, cams, labels, par=self.par,
                                                   patch_size=self.model.patch_size, bg_low=self.bg_low,
                                                   bg_high=self.bg_high, sample_only=True)
        return patch_labels

    def __call__(self, images: Tensor, labels: Tensor, aream_active: bool) -> Tuple[Tensor, Dict[str, Tensor]]:
        use_aream = self.aream and aream_active
        patch_labels = None
        if use_aream and not self.pseudo_from_forward:
            patch_labels = self.pseudo_labels_separate(images, labels)
        with self.autocast():
            out = self.train_model(images, self.request)
        loss_cls = classification_loss(out.class_logits, out.patch_logits, labels)
        terms: Dict[str, Tensor] = {"loss_cls": loss_cls.detach()}
        if not use_aream:
            return loss_cls, terms
        if self.pseudo_from_forward:
            from aream_fast.pseudo_labels.cam import cams_from_output

            cams = cams_from_output(out, labels, tuple(images.shape[-2:]),
                                    refine_layers=self.layout.refine_layers,
                                    refine_weights=self.layout.refine_weights, present_only=True)
            patch_labels = self._patch_labels(images, cams, labels)
        rec = out.records
        sup = self.layout.supervised_layers
        if self.defer_loss_grad:
            from aream_fast.losses.deferred import deferred_aream_loss

            loss_aff = deferred_aream_loss(rec, patch_labels, layer_weights=self.layout.loss_weights,
                                           backend=self.loss_backend)
        else:
            loss_aff = self.loss_fn([rec.qs[l] for l in sup], [rec.ks[l] for l in sup], patch_labels,
                                    scale=rec.scale, num_prefix_tokens=rec.num_prefix_tokens,
                                    layer_weights=self.layout.loss_weights, backend=self.loss_backend)
        loss_aff = loss_aff.float()
        terms["loss_aream"] = loss_aff.detach()
        valid = patch_labels != 255
        terms["pseudo_ignore_frac"] = 1.0 - valid.float().mean()
        terms["pseudo_fg_frac"] = ((patch_labels > 0) & valid).float().mean()
        return loss_cls + self.aream_weight * loss_aff, terms
