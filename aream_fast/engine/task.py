"""What the task-agnostic :class:`~aream_fast.engine.trainer.Trainer` runs: a :class:`Task`.

The trainer owns everything every training run needs (distributed set-up, seeds, run folder, logging, the
resumable data order, optimizer + schedule, precision, DDP + ``torch.compile`` of the training model,
checkpoints and resume, the epoch loop, graceful stop). A task owns what is specific to one method: its data,
its model, its loss step, its validation metric and what happens after training. Stage one is
``aream_fast.engine.aream_task.AReAMTask``; the segmentation network of stage two is another task.

Order of the calls (fixed, so that the RNG stream and a resumed run are reproducible)::

    setup_data(ctx)            datasets (before any run folder exists: bad data fails first)
    build_model(ctx) -> model  on ctx.device, trainable parameters only
    build_optimizer(model)     default: AdamW with decay/no-decay groups
    build_schedule(optimizer)  default: per-step warm-up + cosine
    precision_probe()          optional timing probe for --amp on CPU
    prepare(ctx, train_model)  train_model is the DDP-wrapped and/or compiled model; build the step here
    step(batch, epoch)         -> (loss, {name: 0-dim tensor}) for one optimizer step
    validate(ctx)              rank 0, at epoch ends -> {metric: value} with ``selection_metric`` in it
    finish(ctx)                rank 0, after a finished run -> summary entries (e.g. CAM mIoU)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn


@dataclass
class TaskContext:
    """What the trainer hands a task. ``autocast()`` returns the autocast context of the run's precision;
    ``log(msg)`` logs on rank 0; ``run_dir`` is None during ``setup_data``."""

    cfg: Any
    device: torch.device
    dist: Any
    log: Callable[[str], None]
    run_dir: Optional[str] = None
    autocast: Optional[Callable[[], Any]] = None
    model: Optional[nn.Module] = None


class Task:
    """Base class of a training task; see the module docstring for the call order."""

    #: the key of ``validate``'s result that selects ``checkpoint_best.pth`` (higher is better)
    selection_metric: str = "score"
    #: the training split dataset (``Dataset`` of dict samples); set by ``setup_data``
    train_set: Any = None
    #: the validation split dataset; set by ``setup_data``
    val_set: Any = None

    def setup_data(self, ctx: TaskContext) -> None:
        raise NotImplementedError

    def build_model(self, ctx: TaskContext) -> nn.Module:
        raise NotImplementedError

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Default: AdamW with the run's lr / weight decay and no decay on 1-D params, biases, pos_embed."""
        from aream_fast.engine.optim import build_optimizer

        optim = self.cfg.optim
        return build_optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay)

    def build_schedule(self, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int):
        """Default: linear warm-up then cosine (``engine.schedule.WarmupCosineSchedule``), stepped per step."""
        from aream_fast.engine.schedule import WarmupCosineSchedule

        optim = self.cfg.optim
        return WarmupCosineSchedule(optimizer, base_lr=optim.lr, total_steps=total_steps,
                                    warmup_steps=warmup_steps, warmup_lr=optim.warmup_lr, min_lr=optim.min_lr)

    def precision_probe(self) -> Optional[Callable[[], Tuple[float, float]]]:
        """A callable returning (fp32_s, bf16_s) of one model step on CPU, or None (no measurement)."""
        return None

    def prepare(self, ctx: TaskContext, train_model: Any) -> None:
        raise NotImplementedError

    def step(self, batch: Dict[str, Any], epoch: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        raise NotImplementedError

    def validate(self, ctx: TaskContext) -> Optional[Dict[str, float]]:
        return None

    def finish(self, ctx: TaskContext) -> Optional[Dict[str, Any]]:
        return None

    def summary(self, finish_results: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """Entries of ``summary.json`` (and the last metrics row) from what ``finish`` returned."""
        return {}

    def run_name(self) -> str:
        """Default run name (runs/<name>/<timestamp>)."""
        raise NotImplementedError

    def compile_warmup_epoch(self) -> int:
        """The first epoch whose graphs are final (the recompile check starts two steps into it)."""
        return 0

    def manifest_extra(self) -> Dict[str, Any]:
        """Entries added to manifest.json."""
        return {}

    def checkpoint_extra(self) -> Dict[str, Any]:
        """Entries added to every checkpoint (e.g. class names)."""
        return {}

    def progress_postfix(self, record: Dict[str, float]) -> Dict[str, str]:
        """What the progress bar shows next to the loss."""
        return {}
