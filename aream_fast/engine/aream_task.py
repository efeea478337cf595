"""Stage one as a :class:`~aream_fast.engine.task.Task`: an AReAM classifier trained from image-level labels.

One step (docs/semantics.md, "Training step"), images (B, 3, S, S) normalised, labels (B, K) multi-hot:

1. (default, official) pseudo labels under no_grad from a **separate** forward on [x; flip(x)] with the
   shallow layers' attention, PAR, the two background scores and patch sampling
   (:class:`aream_fast.pseudo_labels.labeler.PseudoLabeler`);
2. the training forward exports the supervised layers' q, k (``LayerSplit.supervised_layers``);
   ``L_cls = MLSM(class_logits, y) + MLSM(patch_logits, y)``;
3. ``--pseudo-from-forward``: pseudo labels from the training forward's own CAM and records instead of step 1;
4. ``total = L_cls + λ · loss_aff`` after the ``cls_epochs`` warm-up (``total = L_cls`` before it and for
   cls-only runs). With deferred gradients (the eager default, ``--loss-grad layer``) ``loss_aff`` comes from
   ``aream_fast.losses.deferred``: each layer's q/k gradient is made inside that layer's backward.

Compile: the training model (possibly DDP-wrapped) and the loss function are compiled separately; the
pseudo-label forward gets its own compiled graph. Shapes are fixed per phase (drop_last): each graph compiles
once.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from aream_fast.engine.build import (build_cam_eval_split, build_model_from_config, build_split,
                                     resolve_data_root)
from aream_fast.engine.config import TrainConfig
from aream_fast.engine.distributed import barrier
from aream_fast.engine.task import Task, TaskContext
from aream_fast.losses.classification import classification_loss
from aream_fast.models.records import LayerSplit
from aream_fast.pseudo_labels.labeler import IGNORE_INDEX, PseudoLabeler


class AReAMStep:
    """The loss of one step: ``__call__(images, labels, aream_active) -> (total, terms)``.

    train_model: what the training forward calls (raw, DDP-wrapped and/or compiled).
    pseudo_model: what the separate pseudo-label forward calls (raw or compiled raw model; no DDP).
    labeler: the :class:`PseudoLabeler`, or None for a cls-only step.
    loss_fn: ``aream_fast.losses.aream.aream_loss`` or its compiled wrapper (same signature).
    autocast: a zero-argument callable returning the autocast context for forwards.
    defer_loss_grad: q/k gradients of the affinity loss made in each layer's backward (eager only).
    """

    def __init__(self, *, train_model: Callable, pseudo_model: Callable, labeler: Optional[PseudoLabeler],
                 aream_weight: float, loss_fn: Callable, loss_backend: str = "auto",
                 pseudo_from_forward: bool = False, defer_loss_grad: bool = False,
                 autocast: Optional[Callable] = None):
        import contextlib

        self.train_model = train_model
        self.pseudo_model = pseudo_model
        self.labeler = labeler
        self.aream_weight = float(aream_weight)
        self.loss_fn = loss_fn
        self.loss_backend = loss_backend
        self.pseudo_from_forward = bool(pseudo_from_forward)
        self.defer_loss_grad = bool(defer_loss_grad) and labeler is not None
        self.autocast = autocast or contextlib.nullcontext
        # one request for the whole run (warm-up included) so the compiled training graph never changes
        self.request = None if labeler is None else labeler.training_request(from_forward=pseudo_from_forward)

    def __call__(self, images: Tensor, labels: Tensor, aream_active: bool,
                 img_box: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """img_box: None, or (B, 4) int crop boxes of the images (Conformer data; patches outside ignored)."""
        use_aream = self.labeler is not None and aream_active
        patch_labels = None
        if use_aream and not self.pseudo_from_forward:
            patch_labels = self.labeler.from_model(self.pseudo_model, images, labels, autocast=self.autocast,
                                                   img_box=img_box)
        grads = None
        if self.defer_loss_grad and use_aream:
            from aream_fast.losses.deferred import DeferredGrads

            grads = DeferredGrads()
        with self.autocast():
            out = self.train_model(images, self.request, **({"qk_hook": grads.attach} if grads else {}))
        loss_cls = classification_loss(out.class_logits, out.patch_logits, labels)
        terms: Dict[str, Tensor] = {"loss_cls": loss_cls.detach()}
        if not use_aream:
            return loss_cls, terms
        if self.pseudo_from_forward:
            patch_labels = self.labeler.from_output(out, images, labels, img_box=img_box)
        rec = out.records
        split = self.labeler.split
        if grads is not None:
            from aream_fast.losses.deferred import deferred_aream_loss

            loss_aff = deferred_aream_loss(grads, patch_labels, scale=rec.scale,
                                           num_prefix_tokens=rec.num_prefix_tokens,
                                           layer_weights=split.loss_weights, backend=self.loss_backend)
        else:
            sup = split.supervised_layers
            loss_aff = self.loss_fn([rec.qs[l] for l in sup], [rec.ks[l] for l in sup], patch_labels,
                                    scale=rec.scale, num_prefix_tokens=rec.num_prefix_tokens,
                                    layer_weights=split.loss_weights, backend=self.loss_backend)
        loss_aff = loss_aff.float()
        terms["loss_aff"] = loss_aff.detach()
        valid = patch_labels != IGNORE_INDEX
        terms["pseudo_ignore_frac"] = 1.0 - valid.float().mean()
        terms["pseudo_fg_frac"] = ((patch_labels > 0) & valid).float().mean()
        return loss_cls + self.aream_weight * loss_aff, terms


def resolve_backends(cfg: TrainConfig, device: torch.device) -> Dict[str, Any]:
    """What the attention and the affinity loss run on ``device``: {"attention", "loss", "notes": {name: text}}.
    ``--loss-backend triton`` off CUDA (outside the Triton interpreter) and ``--attention-backend xformers`` on
    CUDA without xformers installed are refused (``ValueError``); triton/xformers attention off CUDA falls back
    to SDPA, said in the notes (logged, and the manifest records what runs)."""
    import importlib.util

    from aream_fast.kernels import interpreting

    cuda = device.type == "cuda"
    wanted = cfg.model.attention_backend
    if wanted in ("triton", "xformers") and not cuda:
        attention = "sdpa"
        attention_note = f"sdpa (--attention-backend {wanted} runs on CUDA only; this run is on {device})"
    else:
        if wanted == "xformers" and importlib.util.find_spec("xformers") is None:
            raise ValueError("--attention-backend xformers: the xformers package is not installed; use auto, sdpa "
                             "or triton")
        attention = "sdpa" if wanted == "auto" else wanted
        attention_note = attention + (" (--attention-backend auto)" if wanted == "auto" else "")
    loss = cfg.aream.loss_backend
    if loss == "triton" and not cuda and not interpreting():
        raise ValueError(f"--loss-backend triton needs a CUDA device (this run is on {device}; on CPU only under "
                         f"TRITON_INTERPRET=1); use --loss-backend auto or torch")
    if loss == "auto":
        loss = "triton" if cuda else "torch"
    return {"attention": attention, "loss": loss,
            "notes": {"attention": attention_note, "affinity loss backend": loss}}


class AReAMTask(Task):
    """Stage one: data, model, pseudo labeler and affinity loss of a :class:`TrainConfig`; val mAP selects the
    best checkpoint; after a finished run, CAM seeds of ``--cam-split`` are written and scored."""

    selection_metric = "mAP"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.split: Optional[LayerSplit] = None
        self.data_root: Optional[str] = None
        self.model: Optional[nn.Module] = None
        self.step_fn: Optional[AReAMStep] = None

    # ------------------------------------------------------------------------------------------------ build
    def setup_data(self, ctx: TaskContext) -> None:
        data = self.cfg.data
        pretrained = self.cfg.model.pretrained
        if pretrained is not None and not os.path.isfile(pretrained):  # before the run folder is made
            raise FileNotFoundError(f"--pretrained {pretrained!r} does not exist (aream-fast never downloads "
                                    f"weights; pass a local timm/DeiT/Conformer checkpoint file)")
        if ctx.dist.is_main:  # rank 0 writes the synthetic cache once
            self.data_root = resolve_data_root(data, create=True, progress=True)
        barrier(ctx.dist)
        if not ctx.dist.is_main:
            self.data_root = resolve_data_root(data, create=False)
        self.train_set = build_split(data, self.data_root, data.train_split, train=True,
                                     progress=ctx.dist.is_main)
        self.val_set = build_split(data, self.data_root, data.val_split, train=False)
        for split_set in (self.train_set, self.val_set):  # every listed file, before the run folder is made
            split_set.preflight(full=data.full_image_check, progress=ctx.dist.is_main)
        self.num_classes = int(self.train_set.num_classes)
        self.class_names = list(self.train_set.class_names)
        bad = getattr(self.train_set, "bad_images", []) + getattr(self.val_set, "bad_images", [])
        self.bad_images = bad
        if self.cfg.cams.make_cams:  # the CAM split is used after training: its list and masks checked now
            from aream_fast.data.layout import DatasetLayoutError, resolve_split

            try:
                resolve_split(data.dataset, self.data_root, self.cfg.cams.cam_split, with_masks=True)
            except DatasetLayoutError as exc:
                raise DatasetLayoutError(f"--cam-split {self.cfg.cams.cam_split!r} (scored after training; "
                                         f"--no-cams skips it): {exc}") from exc
        self.backends = resolve_backends(self.cfg, ctx.device)

    def build_model(self, ctx: TaskContext) -> nn.Module:
        from aream_fast.engine.optim import freeze_unused_parameters

        cfg = self.cfg
        model = build_model_from_config(cfg.model, self.num_classes, image_size=cfg.data.image_size,
                                        pretrained=cfg.model.pretrained).to(ctx.device)
        self.model = model
        ctx.log("; ".join(f"{what}: {how}" for what, how in self.backends["notes"].items()))
        report = getattr(model, "pretrained_report", None)
        self.pretrained_report = None if report is None else report.as_dict()
        if report is not None:
            ctx.log(report.summary())
        self.split = self._layer_split(ctx)
        frozen = freeze_unused_parameters(model, cfg.data.image_size, ctx.device)
        if frozen:
            ctx.log(f"parameters no loss reaches (frozen; e.g. MCTformer's unused final norm): {frozen}")
        return model

    def _layer_split(self, ctx: TaskContext) -> LayerSplit:
        from aream_fast.analysis.entropy import entropy_to_layer_weights, load_entropy

        aream = self.cfg.aream
        depth = int(self.model.depth)
        split = LayerSplit.from_depth(depth, aream.layer_index)
        if aream.layer_weights is not None:
            entropy = load_entropy(aream.layer_weights)
            if entropy.shape != (depth,):
                raise ValueError(f"--layer-weights {aream.layer_weights!r}: one entropy per model block ({depth}) "
                                 f"expected, got {entropy.size}")
            loss_w, refine_w = entropy_to_layer_weights(entropy, split.layer_index)
            split = LayerSplit.from_depth(depth, split.layer_index, loss_weights=loss_w, refine_weights=refine_w)
        weights = ("uniform" if split.loss_weights is None else
                   f"entropy (loss {[round(w, 3) for w in split.loss_weights]}, refine "
                   f"{[round(w, 3) for w in split.refine_weights]})")
        ctx.log(f"layers: refine {list(split.refine_layers)}, supervised {list(split.supervised_layers)}, "
                f"weights {weights}")
        return split

    def precision_probe(self):
        from aream_fast.engine.precision import measure_model_step

        return lambda: measure_model_step(self.model, self.cfg.data.image_size,
                                          batch=min(8, self.cfg.optim.batch_size))

    def prepare(self, ctx: TaskContext, train_model: Any) -> None:
        from aream_fast.losses.aream import aream_loss

        cfg = self.cfg
        pseudo_model: Any = self.model
        loss_fn: Any = aream_loss
        if cfg.precision.compile:
            backend = cfg.precision.compile_backend
            loss_fn = torch.compile(aream_loss, backend=backend)
            if cfg.aream.aream and not cfg.aream.pseudo_from_forward and cfg.precision.compile_pseudo:
                # the pseudo-label forward (2B images, no grad, other request) as its own compiled graph
                pseudo_model = torch.compile(self.model, backend=backend)
            ctx.log(f"torch.compile ({backend}): training model, affinity loss"
                    + (" and pseudo-label forward (separate graph)" if pseudo_model is not self.model else ""))
        defer = cfg.aream.loss_grad == "layer" and not cfg.precision.compile
        labeler = None
        if cfg.aream.aream:
            from aream_fast.pseudo_labels.par import PAR

            labeler = PseudoLabeler(self.split, par=PAR().to(ctx.device), patch_size=self.model.patch_size,
                                    scales=cfg.aream.pseudo_scales, bg_low=cfg.aream.bg_low,
                                    bg_high=cfg.aream.bg_high)
            ctx.log("affinity loss gradients: " + (
                "made in each supervised layer's backward (--loss-grad layer)" if defer else
                "made with the loss value in the forward" + (" (--compile: the deferred identity nodes "
                                                               "cannot be traced)" if cfg.precision.compile else "")))
        self.step_fn = AReAMStep(train_model=train_model, pseudo_model=pseudo_model, labeler=labeler,
                                 aream_weight=cfg.aream.aream_weight, loss_fn=loss_fn,
                                 loss_backend=cfg.aream.loss_backend, pseudo_from_forward=cfg.aream.pseudo_from_forward,
                                 defer_loss_grad=defer, autocast=ctx.autocast)

    # ------------------------------------------------------------------------------------------------- step
    def step(self, batch: Dict[str, Any], epoch: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        device = next(self.model.parameters()).device
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        active = self.cfg.aream.aream and epoch >= self.cfg.aream.cls_epochs
        loss, terms = self.step_fn(images, labels, active, batch.get("img_box"))
        terms["aream_active"] = torch.tensor(int(active))
        return loss, terms

    def compile_warmup_epoch(self) -> int:
        return self.cfg.aream.cls_epochs if self.cfg.aream.aream else 0

    def progress_postfix(self, record: Dict[str, float]) -> Dict[str, str]:
        return {"aff": f"{record['loss_aff']:.4f}"} if "loss_aff" in record else {}

    # --------------------------------------------------------------------------------------- validate/finish
    @torch.no_grad()
    def validate(self, ctx: TaskContext) -> Optional[Dict[str, float]]:
        """Val mAP (per-image AP of sigmoid(class_logits), averaged; docs/semantics.md "Model selection")."""
        from aream_fast.evaluation.classification import classification_map

        return classification_map(self.model, self.val_set, batch_size=self.cfg.optim.batch_size,
                                  device=ctx.device, autocast=ctx.autocast)

    def finish(self, ctx: TaskContext) -> Optional[Dict[str, Any]]:
        """CAM seeds of ``--cam-split`` from the best checkpoint's weights (else the last), then their mIoU."""
        if not self.cfg.cams.make_cams:
            return None
        from aream_fast.engine import checkpoint as ckpt_io
        from aream_fast.evaluation.cams import score_cams, write_cams

        cfg = self.cfg
        best = os.path.join(ctx.run_dir, ckpt_io.BEST_NAME)
        model = self.model
        source = "last"
        if os.path.isfile(best):
            try:
                state = ckpt_io.load_checkpoint(best, map_location=ctx.device)["model"]
            except (RuntimeError, ValueError) as exc:  # truncated / corrupt: the last weights, said loudly
                ctx.log(f"WARNING: {best} does not load ({exc}); writing CAMs from the last weights instead")
            else:
                model = build_model_from_config(cfg.model, self.num_classes,
                                                image_size=cfg.data.image_size).to(ctx.device)
                model.load_state_dict(state)
                source = "best val mAP"
        cam_set = build_cam_eval_split(cfg.data, self.data_root, cfg.cams.cam_split)
        cam_dir = os.path.join(ctx.run_dir, f"cams_{cfg.cams.cam_split}")
        t0 = time.time()
        written = write_cams(model, cam_set, cam_dir, scales=cfg.cams.cam_scales, flip=cfg.cams.cam_flip,
                             device=ctx.device, overlays=cfg.cams.cam_overlays)
        cam_s = time.time() - t0
        ctx.log(f"wrote {written} CAM files ({source} weights) to {cam_dir} in {cam_s:.1f} s")
        results = score_cams(cam_dir, cam_set, log=ctx.log)
        results.update(cam_dir=cam_dir, weights=source, cam_seconds=cam_s, gt_dir=str(cam_set.files.mask_dir))
        # the same file as ``make_cams.py --eval``: make_pseudo_masks.py reads its best threshold
        tmp = os.path.join(cam_dir, "cam_eval.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(results, fh, indent=2)
        os.replace(tmp, os.path.join(cam_dir, "cam_eval.json"))
        return results

    def summary(self, finish_results: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        results = finish_results or {}
        return {"cam_mIoU": results.get("mIoU"), "cam_threshold": results.get("threshold")}

    # ------------------------------------------------------------------------------------------- bookkeeping
    def run_name(self) -> str:
        return f"{self.cfg.data.dataset}-{self.cfg.mode_name()}"

    def manifest_extra(self) -> Dict[str, Any]:
        return {"data_root": self.data_root, "num_classes": self.num_classes, "class_names": self.class_names,
                "train_size": len(self.train_set), "val_size": len(self.val_set),
                "layer_index": self.split.layer_index, "pretrained_report": self.pretrained_report,
                "attention_backend_used": self.backends["attention"], "loss_backend_used": self.backends["loss"]}

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": self.class_names,
                "layer_index": self.split.layer_index, "data_root": self.data_root}  # absolute: make_cams.py

    def describe(self) -> str:
        cfg = self.cfg
        return (f"model {cfg.model.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M params, "
                f"depth {self.model.depth}), {len(self.train_set)} train / {len(self.val_set)} val images "
                f"(AReAM from epoch {cfg.aream.cls_epochs if cfg.aream.aream else 'never'})")
