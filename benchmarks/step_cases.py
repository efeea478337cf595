"""One AReAM training step in each of the four modes that the benchmarks compare side by side.

The benchmarks measure the same step (forward, pseudo labels, loss, backward, optimizer step), measured as

* ``"official"``   -- the official formulation (:mod:`aream_fast.official`): eager attention returning
  pre-softmax logits, all layers stacked (L, B, H, N, N), loss on materialised (B, P, P) matrices, pseudo
  labels from a separate forward that materialises attention, per-image PAR, ``seg_to_aff``;
* ``"ours"``       -- our default path, the engine's own step (``aream_fast.engine.aream_task.AReAMStep``): pseudo
  labels from a separate no-grad forward with flip (``aream_fast.pseudo_labels.cam.pseudo_label_cams``), batched PAR and
  per-patch labels (``aream_fast.pseudo_labels.labels.cams_to_patch_labels``), then the training forward exporting q, k
  of the supervised layers and the fused loss (``aream_fast.losses.aream.aream_loss``);
* ``"ours-reuse"`` -- ``--pseudo-from-forward``: pseudo labels from the training forward's own records
  (``aream_fast.pseudo_labels.cam.cams_from_output``), no extra forward, no flip;
* ``"cls-only"``      -- the same step with no AReAM at all: fused attention, classification losses only.

:func:`build_step_case` builds a model (random init, or a given one), its optimizer, a synthetic batch and
returns a :class:`StepCase` whose ``step()`` runs one full training step. The official twin
(:class:`aream_fast.official.model.OfficialMCTformerV2`) is loaded with the same weights as our model.

Shapes: images (B, 3, S, S) ImageNet-normalised, labels (B, K) multi-hot float.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STEP_MODES = ("official", "ours", "ours-reuse", "cls-only")

# official MCTformer settings (docs/semantics.md, "Affinity loss", "Training details"): layer_index 7 of 12 ->
# supervised 7..11, refinement 0..6
DEFAULT_SUPERVISED_LAYERS = (7, 8, 9, 10, 11)
AREAM_WEIGHT = 0.1


def check_mode(mode: str) -> str:
    """Validate a step mode name and return it."""
    if mode not in STEP_MODES:
        raise ValueError(f"mode must be one of {STEP_MODES}, got {mode!r}")
    return mode


def make_ours_step(model: nn.Module, *, par: Optional[nn.Module], supervised_layers: Sequence[int],
                   aream: bool = True, pseudo_from_forward: bool = False, aream_weight: float = AREAM_WEIGHT,
                   loss_backend: str = "auto", defer_loss_grad: bool = True):
    """The engine's own step (``aream_fast.engine.aream_task.AReAMStep``) for modes "ours", "ours-reuse" and, with
    ``aream=False``, "cls-only": exactly what ``scripts/train.py`` runs per step (eager, fp32).

    ``supervised_layers`` must be the deep layers [layer_index, depth) (official split); refinement uses the
    layers before ``layer_index``, the class->patch attention all layers (docs/semantics.md, "CAM refinement").
    """
    import contextlib

    from aream_fast.engine.aream_task import AReAMStep
    from aream_fast.losses.aream import aream_loss
    from aream_fast.models.records import LayerSplit
    from aream_fast.pseudo_labels.labeler import PseudoLabeler

    depth = int(model.depth)
    supervised = tuple(int(l) for l in supervised_layers)
    layer_index = min(supervised)
    if supervised != tuple(range(layer_index, depth)):
        raise ValueError(f"supervised_layers must be the deep layers layer_index..{depth - 1} (official split), "
                         f"got {supervised}")
    labeler = None
    if aream:
        if par is None:
            raise ValueError("par must be a PAR module when aream=True")
        labeler = PseudoLabeler(LayerSplit.from_depth(depth, layer_index), par=par, patch_size=model.patch_size)
    return AReAMStep(train_model=model, pseudo_model=model, labeler=labeler, pseudo_from_forward=pseudo_from_forward,
                     aream_weight=aream_weight, loss_fn=aream_loss, loss_backend=loss_backend,
                     autocast=contextlib.nullcontext, defer_loss_grad=defer_loss_grad)


def ours_training_step(areamstep, optimizer: Optional[torch.optim.Optimizer], images: Tensor,
                       labels: Tensor) -> Dict[str, Tensor]:
    """total, terms = AReAMStep(images, labels, aream_active=True); zero_grad; backward; optimizer step.
    Returns the detached loss terms ("loss", "loss_cls", and "loss_aff" when AReAM is on)."""
    total, terms = areamstep(images, labels, True)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    total.backward()
    if optimizer is not None:
        optimizer.step()
    out = {"loss": total.detach(), "loss_cls": terms["loss_cls"]}
    if "loss_aff" in terms:
        out["loss_aff"] = terms["loss_aff"]
    return out


def synthetic_batch(batch: int, img_size: int, num_classes: int, *, seed: int = 0,
                    classes_per_image: int = 2) -> Tuple[Tensor, Tensor]:
    """A deterministic benchmark batch: smooth random images (B, 3, S, S), ImageNet-normalised-like, and
    multi-hot labels (B, K) with ``classes_per_image`` classes per image (PAR's cost depends on it)."""
    if batch < 1 or img_size < 16 or num_classes < 1:
        raise ValueError(f"batch ({batch}), img_size ({img_size}) and num_classes ({num_classes}) must be positive")
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, max(img_size // 32, 2), max(img_size // 32, 2), generator=g)
    images = F.interpolate(coarse, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = images + 0.1 * torch.randn(batch, 3, img_size, img_size, generator=g)
    labels = torch.zeros(batch, num_classes)
    for i in range(batch):
        for j in range(min(classes_per_image, num_classes)):
            labels[i, (i * 7 + j * 3) % num_classes] = 1.0
    return images, labels


@dataclasses.dataclass
class StepCase:
    """A ready-to-run training step. ``step()`` runs one full step and returns its detached loss terms."""

    mode: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    images: Tensor
    labels: Tensor
    step_fn: Callable[[], Dict[str, Tensor]]

    def step(self) -> Dict[str, Tensor]:
        return self.step_fn()


def build_step_case(mode: str, *, model_name: str = "mct_deit_small", img_size: int = 448, batch: int = 4,
                    num_classes: int = 20, supervised_layers: Sequence[int] = DEFAULT_SUPERVISED_LAYERS,
                    drop_path: float = 0.1, device: str = "cpu", seed: int = 0, lr: float = 6.25e-5,
                    model: Optional[nn.Module] = None, loss_backend: str = "auto",
                    attention_backend: Optional[str] = None, model_kwargs: Optional[dict] = None,
                    defer_loss_grad: bool = True) -> StepCase:
    """Build model (or take ``model``), AdamW (official lr 6.25e-5, wd 0.05) and a synthetic batch for ``mode``.

    For "official", our model is built (same seed) and its weights are loaded into the official-formulation
    twin, which replaces it. ``model_kwargs`` go to ``build_model`` (architecture overrides for tiny test models).
    ``attention_backend`` of our model: None picks our Triton flash kernel on CUDA (SDPA for "cls-only") and SDPA on
    CPU (the loss backend "auto" likewise picks Triton on CUDA), so on a GPU the same benchmark measures the
    Triton path. ``defer_loss_grad`` (ours, ours-reuse): the loss's q/k gradients are made in each supervised
    layer's backward (``aream_fast.losses.deferred``, the trainer's eager default) or, with False, in the
    forward with the loss value (``--loss-grad forward``).
    """
    check_mode(mode)
    torch.manual_seed(seed)
    if model is None:
        from aream_fast.models import build_model

        if attention_backend is None:  # cls-only keeps SDPA: the fastest step without AReAM
            attention_backend = "triton" if str(device).startswith("cuda") and mode != "cls-only" else "auto"
        model = build_model(model_name, num_classes=num_classes, img_size=img_size, drop_path=drop_path,
                            attention_backend=attention_backend, **(model_kwargs or {}))
    model = model.to(device)
    images, labels = synthetic_batch(batch, img_size, num_classes, seed=seed)
    images, labels = images.to(device), labels.to(device)
    supervised = tuple(int(l) for l in supervised_layers)
    if mode == "official":
        from aream_fast.official.model import OfficialMCTformerV2
        from aream_fast.official.pseudo_labels import OfficialPAR
        from aream_fast.official.step import official_training_step

        twin = OfficialMCTformerV2.from_model(model, drop_path=drop_path)
        del model
        model = twin.train()
        par = OfficialPAR().to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)

        def step_fn():
            return official_training_step(model, optimizer, images, labels, par=par, supervised_layers=supervised)
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        par = None
        if mode != "cls-only":
            from aream_fast.pseudo_labels.par import PAR

            par = PAR().to(device)

        areamstep = make_ours_step(model, par=par, supervised_layers=supervised, aream=mode != "cls-only",
                                   pseudo_from_forward=mode == "ours-reuse", loss_backend=loss_backend,
                                   defer_loss_grad=defer_loss_grad)

        def step_fn():
            return ours_training_step(areamstep, optimizer, images, labels)
    return StepCase(mode=mode, model=model, optimizer=optimizer, images=images, labels=labels, step_fn=step_fn)
