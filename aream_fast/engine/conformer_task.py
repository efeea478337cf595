"""Stage one on the Conformer-S (TransCAM-style AReAM; docs/semantics.md, Conformer): what differs from the ViT.

:class:`ConformerTask` is an :class:`~aream_fast.engine.aream_task.AReAMTask` (same step, losses, validation,
CAM seeds and checkpoints) with the official Conformer path's differences from main_voc_conformer.py of
Jessie459/AReAM:

* data: the training split uses :class:`aream_fast.data.conformer_transforms.ConformerTrainTransform`
  (random scale 0.5-2, flip, colour jitter, 384 crop on a black canvas); every batch carries ``img_box``
  (B, 4) int64 (i1, i2, j1, j2), and the pseudo labels of patches outside it are ignored
  (``PseudoLabeler(..., img_box=...)`` = ``aream_fast.pseudo_labels.conformer.apply_crop_box``). Validation
  resizes to the square training size, as the official ``Resize(384)``;
* optimiser: AdamW over ``conformer_param_groups`` (every parameter whose name contains "head" at 10x the
  learning rate; no decay on 1-D parameters, biases, ``cls_token``); the trainer's per-step warm-up + cosine
  (``WarmupCosineSchedule``) scales each group by its ``lr_scale``;
* pseudo labels: a separate no-grad forward of the raw model in train mode (BN batch statistics; the
  official ``gen_msf_cam``) at ``--pseudo-scales`` (official 0.5, 1, 1.5) with flips, refinement over layers
  0..layer_index-1 (official 9), then the crop box;
* the CPU precision probe leaves the BN running statistics untouched (``preserve_buffers``; the parameter
  freeze probe does the same for every model).

``aream_fast.engine.trainer.Trainer`` picks this task when ``--model conformer_small``; ``--preset
official-conformer`` sets the official values (``aream_fast.engine.config.PRESETS``).
"""
from __future__ import annotations

import torch
from torch import nn

from aream_fast.engine.aream_task import AReAMTask
from aream_fast.engine.task import TaskContext

HEAD_LR_SCALE = 10.0  # main_voc_conformer.py: lr x 10 for parameters whose name contains "head"


class ConformerTask(AReAMTask):
    """Stage one for ``conformer_small``; see the module docstring for what differs from :class:`AReAMTask`."""

    def setup_data(self, ctx: TaskContext) -> None:
        from aream_fast.data.conformer_transforms import ConformerTrainTransform

        super().setup_data(ctx)
        self.train_set.transform = ConformerTrainTransform(self.cfg.data.image_size)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW(conformer_param_groups(model, weight_decay, lr_scale 10), lr, betas (0.9, 0.999), eps 1e-8)."""
        from aream_fast.pseudo_labels.conformer import conformer_param_groups

        optim = self.cfg.optim
        groups = conformer_param_groups(model, weight_decay=optim.weight_decay, lr_scale=HEAD_LR_SCALE)
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=(0.9, 0.999), eps=1e-8)

    def precision_probe(self):
        from aream_fast.engine.optim import preserve_buffers

        probe = super().precision_probe()

        def measure():
            with preserve_buffers(self.model):
                return probe()

        return measure
