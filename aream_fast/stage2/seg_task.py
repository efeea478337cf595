"""The segmentation network of stage two as a :class:`~aream_fast.engine.task.Task` on the same engine.

Trains a model of ``aream_fast.stage2.seg_models`` with cross-entropy (ignore 255) on pseudo masks (PNG, as
``scripts/make_pseudo_masks.py`` writes them), joint random scale / crop / flip, AdamW with a poly schedule; the
val mIoU (single scale, ground-truth masks) selects ``checkpoint_best.pth``. ``--gt-upper-bound`` trains the same
network on the ground-truth masks instead: the fully supervised upper bound WSSS papers quote (reported as such).

Every checkpoint holds ``"seg_model"`` (the model's build arguments), so ``load_seg_model`` and
``scripts/infer_seg.py`` read the trainer's checkpoints directly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aream_fast.engine.build import resolve_data_root
from aream_fast.engine.config import (DataConfig, OptimConfig, PrecisionConfig, RunConfig, SectionedConfig, option,
                                      parse_optional_int)
from aream_fast.engine.distributed import barrier
from aream_fast.engine.task import Task, TaskContext

IGNORE_INDEX = 255


@dataclass
class SegConfig:
    """The segmentation network, its masks and its augmentation."""

    TITLE = "segmentation"
    masks: Optional[str] = option(None, "folder of pseudo masks (PNG, one per training image; required unless "
                                        "--gt-upper-bound)")
    gt_upper_bound: bool = option(False, "train on the ground-truth masks instead: the fully supervised upper "
                                         "bound (reported as such, never as a WSSS result)")
    seg_model: str = option("vit_small_aspp", "segmentation network (aream_fast.stage2.SEG_MODELS)")
    pretrained: Optional[str] = option(None, "local backbone weights: DeiT/ViT .pth, a stage-one checkpoint of "
                                             "this project, or an ImageNet ResNet-101")
    embed_dim: Optional[int] = option(None, "ViT width override (tiny runs)", parse=parse_optional_int)
    depth: Optional[int] = option(None, "ViT depth override", parse=parse_optional_int)
    num_heads: Optional[int] = option(None, "ViT heads override", parse=parse_optional_int)
    patch_size: Optional[int] = option(None, "ViT patch size override (default 16)", parse=parse_optional_int)
    scale_min: float = option(0.5, "random rescale lower bound")
    scale_max: float = option(2.0, "random rescale upper bound")
    hflip: float = option(0.5, "horizontal flip probability")
    poly_power: float = option(0.9, "poly schedule power")

    def validate(self) -> None:
        from aream_fast.stage2.seg_models import SEG_MODELS

        if self.seg_model not in SEG_MODELS:
            raise ValueError(f"--seg-model must be one of {SEG_MODELS}, got {self.seg_model!r}")
        if self.masks is None and not self.gt_upper_bound:
            raise ValueError("--masks DIR is required (pseudo masks from make_pseudo_masks.py), or "
                             "--gt-upper-bound for the fully supervised upper bound")
        if self.masks is not None and self.gt_upper_bound:
            raise ValueError("--masks and --gt-upper-bound exclude each other")
        for name in ("embed_dim", "depth", "num_heads", "patch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.patch_size is not None and 16 % self.patch_size:
            raise ValueError(f"--patch-size must divide 16, got {self.patch_size}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"--scale-min/--scale-max must satisfy 0 < min <= max, got {self.scale_min}, "
                             f"{self.scale_max}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"--hflip must be a probability, got {self.hflip}")

    def model_kwargs(self, image_size: int) -> Dict[str, Any]:
        kw: Dict[str, Any] = {k: getattr(self, k) for k in ("embed_dim", "depth", "num_heads", "patch_size")
                              if getattr(self, k) is not None}
        if self.seg_model.startswith("vit"):
            kw["img_size"] = image_size
        return kw


def _seg_optim() -> OptimConfig:
    return OptimConfig(epochs=20, batch_size=8, lr=2e-4, min_lr=0.0, warmup_lr=1e-6, warmup_epochs=0.5,
                       weight_decay=0.01)


@dataclass
class SegTrainConfig(SectionedConfig):
    """Every knob of a segmentation training run (``scripts/train_seg.py``); the demo defaults train the ViT
    segmenter from random init on the synthetic dataset's pseudo masks."""

    data: DataConfig = field(default_factory=DataConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    optim: OptimConfig = field(default_factory=_seg_optim)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "SegTrainConfig":
        for section in (self.data, self.seg, self.optim, self.run):
            section.validate()
        return self


class SegTask(Task):
    """Cross-entropy on (pseudo) masks; val mIoU selects the best checkpoint."""

    selection_metric = "mIoU"

    def __init__(self, cfg: SegTrainConfig):
        self.cfg = cfg
        self.model: Optional[nn.Module] = None

    # ------------------------------------------------------------------------------------------------ build
    def setup_data(self, ctx: TaskContext) -> None:
        from aream_fast.data import build_dataset
        from aream_fast.stage2.seg_data import build_pseudo_mask_dataset, build_upper_bound_dataset

        data, seg = self.cfg.data, self.cfg.seg
        # an existing dataset (the stage-one run's synthetic cache) is read as it is: the segmentation crop
        # size need not be the size the synthetic images were generated at
        existing = data.data_root is not None and os.path.isdir(data.data_root)
        if ctx.dist.is_main:
            self.data_root = resolve_data_root(data, create=not existing, progress=True)
        barrier(ctx.dist)
        if not ctx.dist.is_main:
            self.data_root = resolve_data_root(data, create=False)
        common = dict(train=True, crop_size=data.image_size, scale_range=(seg.scale_min, seg.scale_max),
                      hflip=seg.hflip)
        if seg.gt_upper_bound:
            self.train_set = build_upper_bound_dataset(data.dataset, self.data_root, data.train_split, **common)
        else:
            self.train_set = build_pseudo_mask_dataset(data.dataset, self.data_root, data.train_split,
                                                       masks=seg.masks, progress=ctx.dist.is_main, **common)
        self.val_set = build_dataset(data.dataset, self.data_root, data.val_split, train=False, image_size=None,
                                     with_masks=True, skip_bad_images=data.skip_bad_images)
        self.num_classes = int(self.train_set.num_classes) + 1  # + background
        self.class_names = ["background"] + list(self.train_set.class_names)

    def build_model(self, ctx: TaskContext) -> nn.Module:
        from aream_fast.stage2.seg_models import build_seg_model

        seg = self.cfg.seg
        model = build_seg_model(seg.seg_model, self.num_classes, pretrained=seg.pretrained,
                                **seg.model_kwargs(self.cfg.data.image_size)).to(ctx.device)
        report = getattr(model, "pretrained_report", None)
        if report is not None:
            ctx.log(f"pretrained backbone: {report}")
        self.model = model
        return model

    def precision_probe(self):
        """fp32 vs bf16 autocast of the segmentation model's own forward + backward (BN statistics restored)."""
        from aream_fast.engine.optim import preserve_buffers
        from aream_fast.engine.precision import measure_model_step

        def measure():
            with preserve_buffers(self.model):
                return measure_model_step(self.model, self.cfg.data.image_size,
                                          batch=min(8, self.cfg.optim.batch_size),
                                          objective=lambda model, x: model(x).float().sum())

        return measure

    def build_schedule(self, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int):
        from aream_fast.engine.schedule import WarmupPolySchedule

        optim = self.cfg.optim
        return WarmupPolySchedule(optimizer, base_lr=optim.lr, total_steps=total_steps, warmup_steps=warmup_steps,
                                  warmup_lr=optim.warmup_lr, min_lr=optim.min_lr, power=self.cfg.seg.poly_power)

    def prepare(self, ctx: TaskContext, train_model: Any) -> None:
        self.train_model = train_model
        self.autocast = ctx.autocast

    # ------------------------------------------------------------------------------------------------- step
    def step(self, batch: Dict[str, Any], epoch: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        device = next(self.model.parameters()).device
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True).long()
        with self.autocast():
            logits = self.train_model(images)
        valid = masks != IGNORE_INDEX
        if not bool(valid.any()):  # an all-ignore batch: a zero loss that still reaches every parameter
            loss = logits.float().sum() * 0.0
        else:
            loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)
        return loss, {"loss_ce": loss.detach(), "ignore_frac": 1.0 - valid.float().mean()}

    # --------------------------------------------------------------------------------------- validate/finish
    @torch.no_grad()
    def validate(self, ctx: TaskContext) -> Optional[Dict[str, float]]:
        """Single-scale val mIoU (%) on the ground-truth masks, one image at a time at its native size."""
        from aream_fast.evaluation.metrics import confusion_matrix, miou_from_confusion
        from aream_fast.stage2.inference import predict_logits

        was_training = self.model.training
        self.model.eval()
        cm = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)  # confusion_matrix layout
        try:
            for i in range(len(self.val_set)):
                item = self.val_set[i]
                with ctx.autocast():
                    logits = predict_logits(self.model, item["image"][None].to(ctx.device))
                pred = logits.argmax(1)[0].cpu().numpy()
                cm += confusion_matrix(pred, item["mask"].numpy(), self.num_classes)
        finally:
            self.model.train(was_training)
        return {"mIoU": 100.0 * miou_from_confusion(cm), "num_images": len(self.val_set)}

    def summary(self, finish_results: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        return {"masks": None if self.cfg.seg.gt_upper_bound else os.path.abspath(self.cfg.seg.masks),
                "gt_upper_bound": self.cfg.seg.gt_upper_bound, "seg_model": self.cfg.seg.seg_model}

    # ------------------------------------------------------------------------------------------- bookkeeping
    def run_name(self) -> str:
        kind = "seg-upper-bound" if self.cfg.seg.gt_upper_bound else "seg"
        return f"{self.cfg.data.dataset}-{kind}-{self.cfg.seg.seg_model}"

    def manifest_extra(self) -> Dict[str, Any]:
        return {"data_root": self.data_root, "num_classes": self.num_classes, "class_names": self.class_names,
                "train_size": len(self.train_set), "val_size": len(self.val_set)}

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {"seg_model": dict(self.model.seg_config), "num_classes": self.num_classes,
                "class_names": self.class_names}

    def describe(self) -> str:
        seg = self.cfg.seg
        source = "ground-truth masks (upper bound)" if seg.gt_upper_bound else f"pseudo masks {seg.masks}"
        return (f"segmentation model {seg.seg_model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} "
                f"M params) on {source}, {len(self.train_set)} train / {len(self.val_set)} val images")


SEG_PRESETS: Dict[str, Dict[str, Any]] = {"demo": {}}
