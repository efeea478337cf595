"""Training configuration: one typed dataclass, its command line, and its validation.

Two kinds of defaults live here:

* the **demo** defaults (what ``python scripts/train.py --amp --compile`` runs with no other argument): a small
  MCTformer-style ViT (embed 192, depth 6, 3 heads, 96 px, 2.8 M parameters; layers 0-3 refine, 4-5 get the
  AReAM loss, the official 7-of-12 split scaled) trained from random init on the built-in synthetic dataset
  (400 train / 64 val images, batch 16, 15 epochs = 375 steps, the first 5 epochs classification only), sized
  to finish data generation, compilation, training, CAM writing and evaluation in under 10 minutes on a
  2-core CPU;
* the **official** recipe (spec §7, MCTformer path), documented in ``--help`` and selected with
  ``--preset official``: mct_deit_small, 224 px, batch 64, 60 epochs, lr 5e-4 * 64 / 512, wd 0.05,
  5 warm-up epochs from 1e-6, cosine to 1e-5, cls_epochs 10, layer_index 7, bg scores 0.35 / 0.55, λ = 0.1.

Learning-rate schedule (documented deviation): we step the schedule per **optimizer step** (linear warm-up
from ``warmup_lr`` to ``lr`` over ``warmup_epochs`` worth of steps, then cosine to ``min_lr`` at the last step),
not timm's per-epoch ``step(epoch)`` at the epoch end (spec §7 / §10.6, where epoch 0 runs at 1e-6).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

# The official MCTformer-path recipe (spec §7). Applied by ``--preset official``; every value can still be
# overridden on the command line.
OFFICIAL_PRESET: Dict[str, Any] = {
    "model": "mct_deit_small",
    "dataset": "voc",
    "image_size": 224,
    "embed_dim": None,
    "depth": None,
    "num_heads": None,
    "batch_size": 64,
    "epochs": 60,
    "cls_epochs": 10,
    "lr": 5e-4 * 64 / 512,
    "min_lr": 1e-5,
    "warmup_lr": 1e-6,
    "warmup_epochs": 5,
    "weight_decay": 0.05,
    "drop_path": 0.1,
    "layer_index": 7,
    "aream_weight": 0.1,
    "bg_low": 0.35,
    "bg_high": 0.55,
    "seed": 42,
    "train_split": "train_aug",
    "val_split": "val",
    "cam_split": "train_aug",
}


@dataclass
class TrainConfig:
    """Every knob of a training run. Saved verbatim into the run manifest and every checkpoint."""

    # data
    dataset: str = "synthetic"
    data_root: Optional[str] = None  # None: synthetic -> data_cache/synthetic (created once)
    train_split: str = "train"
    val_split: str = "val"
    cam_split: str = "val"
    synthetic_train_size: int = 400
    synthetic_val_size: int = 64
    image_size: int = 96
    num_workers: int = 0
    skip_bad_images: bool = False
    # model
    model: str = "mct_deit_small"
    embed_dim: Optional[int] = 192
    depth: Optional[int] = 6
    num_heads: Optional[int] = 3
    drop_path: float = 0.1
    pretrained: Optional[str] = None
    attention_backend: str = "auto"
    # optimisation
    epochs: int = 15
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    grad_clip: Optional[float] = None
    # AReAM (spec §2, §3)
    aream: bool = True
    cls_epochs: int = 5
    layer_index: Optional[int] = None  # None: round(depth * 7 / 12), the official 7-of-12 split
    aream_weight: float = 0.1
    layer_weights: Optional[str] = None  # .npy / .json per-layer entropies (DIAG analyze_layers.py)
    pseudo_from_forward: bool = False
    pseudo_scales: Tuple[float, ...] = (1.0,)
    bg_low: float = 0.35
    bg_high: float = 0.55
    loss_backend: str = "auto"
    loss_grad: str = "layer"  # "layer": q/k gradients made in each layer's backward (eager); "forward"
    # precision / compile
    amp: bool = False
    cpu_amp: str = "measure"  # with --amp on CPU: "measure" (bf16 only if faster), "bf16" or "fp32"
    compile: bool = False
    compile_pseudo: bool = True  # the 2B-image pseudo-label forward as its own compiled graph (else eager)
    compile_backend: str = "inductor"  # "aot_eager" compiles fast (tests: same dynamo guards, no codegen)
    # run control
    seed: int = 0
    run_dir: Optional[str] = None
    run_name: Optional[str] = None
    resume: Optional[str] = None
    save_every_steps: int = 0
    max_steps: Optional[int] = None
    log_every: int = 1
    val_every: int = 1
    # CAMs after training
    make_cams: bool = True
    cam_scales: Tuple[float, ...] = (1.0,)
    cam_flip: bool = True
    cam_overlays: int = 0
    debug_recompiles: bool = False
    device: Optional[str] = None  # None: cuda if available else cpu

    def derived_layer_index(self, depth: int) -> int:
        """First supervised layer (0-based); layers < it refine, layers >= it get the AReAM loss."""
        if self.layer_index is not None:
            index = self.layer_index
        else:
            # official: 7 of 12 layers refine (spec §2, §7); keep the same fraction for smaller depths
            index = int(math.floor(depth * 7 / 12 + 0.5))
        if not 1 <= index <= depth - 1:
            raise ValueError(f"layer_index must be in [1, depth - 1] = [1, {depth - 1}], got {index}")
        return index

    def mode_name(self) -> str:
        if not self.aream:
            return "baseline"
        return "aream-fwd" if self.pseudo_from_forward else "aream"

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("pseudo_scales", "cam_scales"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}")
        kw = dict(d)
        for key in ("pseudo_scales", "cam_scales"):
            if key in kw and kw[key] is not None:
                kw[key] = tuple(float(s) for s in kw[key])
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the argument for any inconsistent value."""
        def positive(name: str, value, allow_zero: bool = False) -> None:
            if value is None:
                return
            if value < 0 or (value == 0 and not allow_zero):
                raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

        positive("--epochs", self.epochs)
        positive("--batch-size", self.batch_size)
        positive("--lr", self.lr)
        positive("--min-lr", self.min_lr, allow_zero=True)
        positive("--warmup-lr", self.warmup_lr, allow_zero=True)
        positive("--warmup-epochs", self.warmup_epochs, allow_zero=True)
        positive("--weight-decay", self.weight_decay, allow_zero=True)
        positive("--cls-epochs", self.cls_epochs, allow_zero=True)
        positive("--aream-weight", self.aream_weight, allow_zero=True)
        positive("--num-workers", self.num_workers, allow_zero=True)
        positive("--save-every-steps", self.save_every_steps, allow_zero=True)
        positive("--max-steps", self.max_steps)
        positive("--log-every", self.log_every)
        positive("--val-every", self.val_every)
        positive("--grad-clip", self.grad_clip)
        positive("--synthetic-train-size", self.synthetic_train_size)
        positive("--synthetic-val-size", self.synthetic_val_size)
        if self.dataset != "synthetic" and not self.data_root:
            raise ValueError(f"--data-root is required for --dataset {self.dataset} (e.g. VOCdevkit/VOC2012)")
        if self.image_size % 16 != 0 or self.image_size <= 0:
            raise ValueError(f"--image-size must be a positive multiple of 16, got {self.image_size}")
        if not 0.0 <= self.bg_low <= 1.0 or not 0.0 <= self.bg_high <= 1.0:
            raise ValueError(f"--bg-low/--bg-high must be in [0, 1], got {self.bg_low}, {self.bg_high}")
        if self.aream and self.cls_epochs >= self.epochs:
            raise ValueError(f"--cls-epochs ({self.cls_epochs}) must be < --epochs ({self.epochs}) for the AReAM "
                             f"term to ever be active; pass --no-aream for a classification-only run")
        for name, scales in (("--pseudo-scales", self.pseudo_scales), ("--cam-scales", self.cam_scales)):
            if len(scales) == 0 or any(s <= 0 for s in scales):
                raise ValueError(f"{name} must be a non-empty list of positive floats, got {list(scales)}")
        if self.loss_grad not in ("layer", "forward"):
            raise ValueError(f"--loss-grad must be 'layer' or 'forward', got {self.loss_grad!r}")
        if self.resume is not None and self.resume != "auto" and not self.resume:
            raise ValueError("--resume must be a checkpoint path or 'auto'")
        return self


def _floats(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(s) for s in text.replace(",", " ").split())
    except ValueError as exc:  # argparse turns this into a clean usage error
        raise argparse.ArgumentTypeError(f"expected comma-separated floats, got {text!r}") from exc


def _optional_int(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "default", "") else int(text)


def build_parser() -> argparse.ArgumentParser:
    """The ``scripts/train.py`` command line. Defaults shown are the demo defaults."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="train.py",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Train an AReAM classifier (MCTformer-style ViT + affinity loss on deep-layer attention), then write "
            "CAMs for a split and print their mIoU. With no arguments besides --amp --compile it trains a small "
            "model on the built-in synthetic dataset in under 10 minutes on a 2-core CPU. Official VOC recipe "
            "(spec §7): --preset official --data-root VOCdevkit/VOC2012 --pretrained deit_small.pth "
            "(mct_deit_small, 224 px, batch 64, 60 epochs, lr 6.25e-5, wd 0.05, warm-up 5 epochs from 1e-6, "
            "cosine to 1e-5, cls-epochs 10, layer-index 7, bg 0.35/0.55, aream-weight 0.1, seed 42). "
            "Multi-GPU/CPU: torchrun --nproc_per_node N scripts/train.py ... (reads LOCAL_RANK/RANK/WORLD_SIZE)."),
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, choices=["synthetic", "voc", "coco"])
    g.add_argument("--data-root", default=d.data_root,
                   help="dataset root; synthetic default: data_cache/synthetic (written once)")
    g.add_argument("--train-split", default=d.train_split)
    g.add_argument("--val-split", default=d.val_split, help="split for per-epoch val mAP (best checkpoint)")
    g.add_argument("--cam-split", default=d.cam_split, help="split whose CAMs are written and scored at the end")
    g.add_argument("--synthetic-train-size", type=int, default=d.synthetic_train_size)
    g.add_argument("--synthetic-val-size", type=int, default=d.synthetic_val_size)
    g.add_argument("--image-size", type=int, default=d.image_size, help="training crop (multiple of 16)")
    g.add_argument("--num-workers", type=int, default=d.num_workers)
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable/corrupt images with a warning instead of stopping")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model,
                   choices=["mct_deit_small", "mct_deit_base", "vit_small", "vit_base"])
    g.add_argument("--embed-dim", type=_optional_int, default=d.embed_dim,
                   help="override the architecture's width ('none' = the named model's)")
    g.add_argument("--depth", type=_optional_int, default=d.depth, help="override the number of blocks")
    g.add_argument("--num-heads", type=_optional_int, default=d.num_heads, help="override the number of heads")
    g.add_argument("--drop-path", type=float, default=d.drop_path)
    g.add_argument("--pretrained", default=d.pretrained, help="local timm/DeiT state dict (.pth)")
    g.add_argument("--attention-backend", default=d.attention_backend,
                   choices=["auto", "sdpa", "triton", "xformers"])
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--min-lr", type=float, default=d.min_lr)
    g.add_argument("--warmup-lr", type=float, default=d.warmup_lr)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW decay; not applied to 1-D params, biases, pos_embed")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g = p.add_argument_group("AReAM")
    g.add_argument("--no-aream", dest="aream", action="store_false",
                   help="baseline: classification loss only (same seed, data order and budget); AReAM is on unless this flag is given%(default).0s")
    g.add_argument("--cls-epochs", type=int, default=d.cls_epochs, help="classification-only warm-up epochs")
    g.add_argument("--layer-index", type=_optional_int, default=d.layer_index,
                   help="first supervised layer; default round(depth*7/12) (official 7 of 12)")
    g.add_argument("--aream-weight", type=float, default=d.aream_weight, help="λ in L_cls + λ·L_aream")
    g.add_argument("--layer-weights", default=d.layer_weights,
                   help="per-layer entropies (.npy/.json, one per block, from analyze_layers.py): "
                        "min-max normalised e; loss weights e_l, refinement weights 1-e_l (spec §2/§3.1 'E')")
    g.add_argument("--pseudo-from-forward", action="store_true",
                   help="pseudo labels from the training forward's CAM and attention (no extra forward/flip)")
    g.add_argument("--pseudo-scales", type=_floats, default=d.pseudo_scales)
    g.add_argument("--bg-low", type=float, default=d.bg_low)
    g.add_argument("--bg-high", type=float, default=d.bg_high)
    g.add_argument("--loss-backend", default=d.loss_backend, choices=["auto", "torch", "triton"])
    g.add_argument("--loss-grad", default=d.loss_grad, choices=["layer", "forward"],
                   help="where the AReAM loss's q/k gradients are made: 'layer' (default) inside each supervised "
                        "layer's backward (nothing held across the memory peak; one extra q k^T matmul per layer), "
                        "'forward' with the loss value (fastest; holds 2 gradients per layer until the "
                        "backward). --compile always uses 'forward'")
    g = p.add_argument_group("precision / compile")
    g.add_argument("--amp", action="store_true",
                   help="CUDA: bf16 autocast (fp16 + GradScaler without bf16); CPU: bf16 only if measured faster")
    g.add_argument("--cpu-amp", default=d.cpu_amp, choices=["measure", "bf16", "fp32"],
                   help="what --amp means on CPU: measure fp32 vs bf16 autocast on the model and pick the faster, "
                        "or force one")
    g.add_argument("--compile", action="store_true", help="torch.compile the model and the AReAM loss")
    g.add_argument("--compile-backend", default=d.compile_backend,
                   help="torch.compile backend (inductor; aot_eager / eager for debugging)")
    g.add_argument("--no-compile-pseudo", dest="compile_pseudo", action="store_false",
                   help="with --compile: run the pseudo-label forward (2B images, no grad) eagerly")
    g.add_argument("--debug-recompiles", action="store_true",
                   help="log torch._dynamo compile counters every step")
    g = p.add_argument_group("run control")
    g.add_argument("--preset", choices=["demo", "official"], default="demo",
                   help="official: spec §7 MCTformer recipe (explicit flags still win)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--run-dir", default=d.run_dir,
                   help="default runs/<run-name>/<timestamp>")
    g.add_argument("--run-name", default=d.run_name, help="default <dataset>-<aream|aream-fwd|baseline>")
    g.add_argument("--resume", nargs="?", const="auto", default=d.resume,
                   help="checkpoint path, or 'auto' (latest checkpoint.pth of the run dir / run name)")
    g.add_argument("--save-every-steps", type=int, default=d.save_every_steps,
                   help="also checkpoint every N optimizer steps (0: once per epoch)")
    g.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="stop (with a checkpoint) after this many global steps; the schedule still spans --epochs")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--val-every", type=int, default=d.val_every)
    g.add_argument("--device", default=d.device)
    g = p.add_argument_group("CAMs after training")
    g.add_argument("--no-cams", dest="make_cams", action="store_false")
    g.add_argument("--cam-scales", type=_floats, default=d.cam_scales)
    g.add_argument("--no-cam-flip", dest="cam_flip", action="store_false")
    g.add_argument("--cam-overlays", type=int, default=d.cam_overlays, help="write PNG overlays for N images")
    return p


def config_from_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse a command line into a validated :class:`TrainConfig` (preset values under explicit flags)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    preset = values.pop("preset")
    if preset == "official":
        # explicit flags win over the preset: re-parse with the preset as defaults
        parser.set_defaults(**OFFICIAL_PRESET)
        values = vars(parser.parse_args(argv))
        values.pop("preset")
    cfg = TrainConfig(**values)
    try:
        return cfg.validate()
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
