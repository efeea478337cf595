"""Learning-rate schedules: linear warm-up then cosine (stage one) or poly (segmentation), stepped once per
optimizer step.

lr(t) for step t = 0 .. total_steps - 1 (the lr *used by* step t):

* t < warmup_steps:  warmup_lr + (base_lr - warmup_lr) * t / warmup_steps
* otherwise:         min_lr + 0.5 (base_lr - min_lr) (1 + cos(pi * (t - warmup_steps) / (total_steps - warmup_steps)))

Official MCTformer uses timm's per-epoch cosine stepped at epoch ends (docs/semantics.md, Training details and Oddities); a per-step schedule
with the same endpoints is smoother and is what the Conformer path of the same repo does. The state is the
step counter only, so it checkpoints exactly.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch


class WarmupCosineSchedule:
    """Sets every param group's ``lr`` to ``base_lr * group['lr_scale'] (default 1)`` following the schedule.

    Call :meth:`step` once after each ``optimizer.step()``; construction applies lr(0).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, base_lr: float, total_steps: int, warmup_steps: int,
                 warmup_lr: float = 1e-6, min_lr: float = 1e-5):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_lr = float(warmup_lr)
        self.min_lr = float(min_lr)
        self.last_step = 0
        self._apply()

    def lr_at(self, t: int) -> float:
        if t < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * t / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (t - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        lr = self.lr_at(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, float]:
        return {"last_step": self.last_step, "base_lr": self.base_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "warmup_lr": self.warmup_lr, "min_lr": self.min_lr}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        for key in ("base_lr", "total_steps", "warmup_steps", "warmup_lr", "min_lr"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"scheduler state has {key}={state[key]} but this run has {getattr(self, key)}; "
                                 f"resume with the same --epochs/--batch-size/--lr settings")
        self.last_step = int(state["last_step"])
        self._apply()


class WarmupPolySchedule(WarmupCosineSchedule):
    """Linear warm-up, then the poly decay segmentation trainers use (DeepLab; ToCo's segmentation stage):
    ``min_lr + (base_lr - min_lr) * (1 - progress) ** power`` with progress in [0, 1] over the post-warm-up steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, base_lr: float, total_steps: int, warmup_steps: int,
                 warmup_lr: float = 1e-6, min_lr: float = 0.0, power: float = 0.9):
        if not power > 0:
            raise ValueError(f"power must be > 0, got {power}")
        self.power = float(power)
        super().__init__(optimizer, base_lr=base_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                         warmup_lr=warmup_lr, min_lr=min_lr)

    def lr_at(self, t: int) -> float:
        if t < self.warmup_steps:
            return super().lr_at(t)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (t - self.warmup_steps) / span)
        return self.min_lr + (self.base_lr - self.min_lr) * (1.0 - progress) ** self.power
