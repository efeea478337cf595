"""Run configuration: one dataclass per component, each field documented once, and the command line made from
the fields.

A run's config is a tree of small sections (torchtitan style): ``DataConfig``, ``ModelConfig``,
``OptimConfig``, ``PrecisionConfig``, ``RunConfig`` are shared by every task; a task adds its own sections
(``AReAMConfig`` and ``CamConfig`` for stage one, see :class:`TrainConfig`). Each field carries its help text,
and optionally its flag spelling and choices, in its metadata; :func:`add_arguments` turns a config class into
argparse flags (``--image-size`` for ``image_size``; booleans that default to True get ``--no-<name>``).

Field names are unique across the sections of a config, so a flat dict of field names (the format of
checkpoints written before the sections existed) maps onto the sections unambiguously (``from_dict``).

Precedence on the command line: the dataclass defaults < the ``--preset`` (an override dict) < the ``--config``
file (JSON or TOML, nested by section or flat) < explicit flags.

Why not a library (tyro, jsonargparse): the documented flags include spellings those generate differently
(``--resume`` with an optional value, ``--no-aream`` for ``aream``, ``--no-cams`` for ``make_cams``); the
generator here is the one place that maps fields to flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Type, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, *, flag: Optional[str] = None, choices: Optional[Sequence[str]] = None,
           parse: Optional[Callable[[str], Any]] = None, nargs: Optional[str] = None, const: Any = None) -> Any:
    """A config field with its command-line documentation (``help``) and, optionally, its flag spelling,
    choices, a parser for its text, or argparse ``nargs``/``const``."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "parse": parse,
                                            "nargs": nargs, "const": const})


def parse_floats(text: str) -> Tuple[float, ...]:
    """'0.5,1,1.5' or '0.5 1 1.5' -> (0.5, 1.0, 1.5)."""
    try:
        return tuple(float(s) for s in text.replace(",", " ").split())
    except ValueError as exc:  # argparse turns this into a clean usage error
        raise argparse.ArgumentTypeError(f"expected comma-separated floats, got {text!r}") from exc


def parse_optional_int(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "default", "") else int(text)


def parse_optional_float(text: str) -> Optional[float]:
    return None if text.lower() in ("none", "") else float(text)


def _finite(name: str, value: Optional[float], *, low: Optional[float] = None, allow_low: bool = True,
            high: Optional[float] = None, allow_high: bool = True) -> None:
    """``ValueError`` naming the flag unless ``value`` is None or a finite number within the bounds."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (value == low and not allow_low)):
        raise ValueError(f"{name} must be {'>=' if allow_low else '>'} {low}, got {value}")
    if high is not None and (value > high or (value == high and not allow_high)):
        raise ValueError(f"{name} must be {'<=' if allow_high else '<'} {high}, got {value}")


# ------------------------------------------------------------------------------------------------ sections
@dataclass
class DataConfig:
    """Which images, at which size."""

    TITLE = "data"
    dataset: str = option("synthetic", "dataset layout", choices=("synthetic", "voc", "coco"))
    data_root: Optional[str] = option(None, "dataset root; synthetic: default data_cache/synthetic-v1-n<train>-<val>"
                                            "-s<size>-seed0 from --synthetic-train-size, --synthetic-val-size and "
                                            "--image-size (the demo's: data_cache/synthetic-v1-n400-64-s96-seed0), "
                                            "written once")
    train_split: str = option("train", "training split")
    val_split: str = option("val", "split for per-epoch validation (best checkpoint)")
    synthetic_train_size: int = option(400, "synthetic dataset: number of train images")
    synthetic_val_size: int = option(64, "synthetic dataset: number of val images")
    image_size: int = option(96, "training crop (multiple of 16)")
    num_workers: int = option(0, "data loader worker processes")
    skip_bad_images: bool = option(False, "skip unreadable/corrupt images with a warning instead of stopping")
    full_image_check: bool = option(False, "before training, decode every listed image and mask in full (default: "
                                           "a cheap check of each file's header, size and mode)")

    def validate(self) -> None:
        if self.dataset != "synthetic" and not self.data_root:
            raise ValueError(f"--data-root is required for --dataset {self.dataset} (e.g. VOCdevkit/VOC2012)")
        if self.image_size <= 0 or self.image_size % 16:
            raise ValueError(f"--image-size must be a positive multiple of 16, got {self.image_size}")
        for name in ("synthetic_train_size", "synthetic_val_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")


@dataclass
class ModelConfig:
    """The backbone and its size."""

    TITLE = "model"
    model: str = option("mct_deit_small", "architecture",
                        choices=("mct_deit_small", "mct_deit_base", "vit_small", "vit_base", "conformer_small"))
    embed_dim: Optional[int] = option(192, "override the architecture's width ('none' = the named model's)",
                                      parse=parse_optional_int)
    depth: Optional[int] = option(6, "override the number of blocks ('none' = the named model's)",
                                  parse=parse_optional_int)
    num_heads: Optional[int] = option(3, "override the number of heads ('none' = the named model's)",
                                      parse=parse_optional_int)
    patch_size: Optional[int] = option(None, "ViT models: override the patch size ('none' = the named model's, 16; "
                                             "8 = a 4x finer token grid)", parse=parse_optional_int)
    base_channel: Optional[int] = option(None, "conformer_small only: override the CNN branch's stem width (64)",
                                         parse=parse_optional_int)
    channel_ratio: Optional[int] = option(None, "conformer_small only: override the CNN width multiplier (4)",
                                          parse=parse_optional_int)
    drop_path: float = option(0.1, "stochastic depth rate, in [0, 1)")
    pretrained: Optional[str] = option(None, "local timm/DeiT/Conformer state dict (.pth), or a checkpoint.pth of "
                                             "this project (its model weights), to start from")
    allow_partial_pretrained: bool = option(False, "accept a --pretrained file that leaves most of the backbone's "
                                                   "tensors unloaded (refused by default)")
    attention_backend: str = option("auto", "fused attention backend (triton/xformers: CUDA only)",
                                    choices=("auto", "sdpa", "triton", "xformers"))

    def validate(self) -> None:
        _finite("--drop-path", self.drop_path, low=0.0, high=1.0, allow_high=False)
        if self.patch_size is not None and (self.patch_size <= 0 or 16 % self.patch_size):
            raise ValueError(f"--patch-size must divide 16 (the image size rule), got {self.patch_size}")
        if self.patch_size is not None and self.model == "conformer_small":
            raise ValueError("--patch-size applies to the ViT models, not conformer_small")
        for name in ("embed_dim", "depth", "num_heads", "base_channel", "channel_ratio"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.depth is not None and self.depth < 2:
            raise ValueError(f"--depth must be >= 2 (refine layers below the first supervised layer), got "
                             f"{self.depth}")

    def overrides(self) -> Dict[str, int]:
        """The size overrides that are set, as ``build_model`` keyword arguments."""
        names = ("embed_dim", "depth", "num_heads", "patch_size", "base_channel", "channel_ratio")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


@dataclass
class OptimConfig:
    """AdamW with a per-step warm-up + cosine schedule."""

    TITLE = "optimisation"
    epochs: int = option(15, "training epochs")
    batch_size: int = option(16, "images per process and step")
    lr: float = option(1e-3, "peak learning rate")
    min_lr: float = option(1e-5, "learning rate at the last step (cosine end)")
    warmup_lr: float = option(1e-6, "learning rate at the first step")
    warmup_epochs: float = option(1.0, "linear warm-up length, in epochs (stepped per optimizer step)")
    weight_decay: float = option(0.05, "AdamW decay; not applied to 1-D params, biases, pos_embed")
    grad_clip: Optional[float] = option(None, "clip the gradient norm to this value", parse=parse_optional_float)

    def validate(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError(f"--epochs and --batch-size must be > 0, got {self.epochs} and {self.batch_size}")
        _finite("--lr", self.lr, low=0.0, allow_low=False)
        _finite("--min-lr", self.min_lr, low=0.0)
        _finite("--warmup-lr", self.warmup_lr, low=0.0)
        _finite("--warmup-epochs", self.warmup_epochs, low=0.0)
        _finite("--weight-decay", self.weight_decay, low=0.0)
        _finite("--grad-clip", self.grad_clip, low=0.0, allow_low=False)


@dataclass
class PrecisionConfig:
    """Mixed precision and torch.compile."""

    TITLE = "precision / compile"
    amp: bool = option(False, "CUDA: bf16 autocast (fp16 + GradScaler without bf16); CPU: bf16 only if measured "
                              "faster")
    cpu_amp: str = option("measure", "what --amp means on CPU: measure fp32 vs bf16 autocast on the model and "
                                     "pick the faster, or force one", choices=("measure", "bf16", "fp32"))
    compile: bool = option(False, "torch.compile the model and the loss")
    compile_pseudo: bool = option(True, "with --compile: the pseudo-label forward (2B images, no grad) as its own "
                                        "compiled graph; --no-compile-pseudo runs it eagerly")
    compile_backend: str = option("inductor", "torch.compile backend (inductor; aot_eager / eager for debugging)")
    debug_recompiles: bool = option(False, "log torch._dynamo compile counters every step")


@dataclass
class RunConfig:
    """Where the run lives, how it is seeded, checkpointed, resumed and logged."""

    TITLE = "run control"
    seed: int = option(0, "seed of the model init, the data order and every random draw")
    run_dir: Optional[str] = option(None, "run folder (default runs/<run-name>/<timestamp>)")
    run_name: Optional[str] = option(None, "default <dataset>-<aream|aream-fwd|cls-only>")
    resume: Optional[str] = option(None, "checkpoint path, or 'auto' (latest checkpoint.pth of the run dir / "
                                         "run name)", nargs="?", const="auto")
    save_every_steps: int = option(0, "also checkpoint every N optimizer steps (0: once per epoch)")
    max_steps: Optional[int] = option(None, "stop (with a checkpoint) after this many global steps; the schedule "
                                            "still spans --epochs", parse=parse_optional_int)
    log_every: int = option(1, "log metrics every N steps")
    val_every: int = option(1, "validate every N epochs (and after the last)")
    device: Optional[str] = option(None, "cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    resume_override: bool = option(False, "resume even though the checkpoint's recorded config differs from this "
                                          "command's (the differences are printed and recorded)")
    threads: Optional[int] = option(None, "torch CPU threads (default: OMP_NUM_THREADS if set, else the cores "
                                          "available to this process / local processes; recorded in the manifest). "
                                          "Losses reproduce to the digit only at the same thread count",
                                    parse=parse_optional_int)

    def validate(self) -> None:
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"--threads must be > 0, got {self.threads}")
        for name in ("save_every_steps",):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("log_every", "val_every", "max_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.resume is not None and not self.resume:
            raise ValueError("--resume must be a checkpoint path or 'auto'")
        if self.device is not None:
            import torch

            try:
                dev = torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"--device {self.device!r} is not a device (cpu, cuda, cuda:N)") from exc
            if dev.type not in ("cpu", "cuda"):
                raise ValueError(f"--device must be cpu or cuda[:N], got {self.device!r}")


@dataclass
class AReAMConfig:
    """The affinity loss on the deep layers and the pseudo labels that supervise it (docs/semantics.md)."""

    TITLE = "AReAM"
    aream: bool = option(True, "cls-only run: classification loss only (same seed, data order and budget); "
                               "AReAM is on unless this flag is given", flag="--no-aream")
    cls_epochs: int = option(5, "classification-only warm-up epochs")
    layer_index: Optional[int] = option(None, "first supervised layer; default round(depth*7/12) (official 7 of "
                                              "12)", parse=parse_optional_int)
    aream_weight: float = option(0.1, "λ in L_cls + λ·loss_aff")
    layer_weights: Optional[str] = option(None, "per-layer entropies (.npy/.json, one per block, from "
                                                "analyze_layers.py): min-max normalised e; loss weights e_l, "
                                                "refinement weights 1-e_l (docs/semantics.md, 'Entropy layer "
                                                "weights')")
    pseudo_from_forward: bool = option(False, "pseudo labels from the training forward's CAM and attention (no "
                                              "extra forward/flip)")
    pseudo_scales: Tuple[float, ...] = option((1.0,), "scales of the pseudo-label forward", parse=parse_floats)
    bg_low: float = option(0.35, "low background score (ignore band lower edge)")
    bg_high: float = option(0.55, "high background score (ignore band upper edge)")
    loss_backend: str = option("auto", "affinity loss backend", choices=("auto", "torch", "triton"))
    loss_grad: str = option("layer", "where the affinity loss's q/k gradients are made: 'layer' (default) inside "
                                     "each supervised layer's backward (nothing held across the memory peak; one "
                                     "extra q k^T matmul per layer), 'forward' with the loss value (fastest; holds "
                                     "2 gradients per layer until the backward). --compile always uses 'forward'",
                            choices=("layer", "forward"))

    def validate(self, epochs: int) -> None:
        if self.cls_epochs < 0:
            raise ValueError(f"--cls-epochs must be >= 0, got {self.cls_epochs}")
        _finite("--aream-weight", self.aream_weight, low=0.0)
        _finite("--bg-low", self.bg_low, low=0.0, high=1.0)
        _finite("--bg-high", self.bg_high, low=0.0, high=1.0)
        if self.bg_low > self.bg_high:
            raise ValueError(f"--bg-low ({self.bg_low}) must be <= --bg-high ({self.bg_high}): the ignore band "
                             f"lies between them")
        if self.aream and self.cls_epochs >= epochs:
            raise ValueError(f"--cls-epochs ({self.cls_epochs}) must be < --epochs ({epochs}) for the AReAM "
                             f"term to ever be active; pass --no-aream for a classification-only run")
        if len(self.pseudo_scales) == 0 or any(not math.isfinite(s) or s <= 0 for s in self.pseudo_scales):
            raise ValueError(f"--pseudo-scales must be a non-empty list of positive floats, got "
                             f"{list(self.pseudo_scales)}")
        if self.layer_index is not None and self.layer_index < 1:
            raise ValueError(f"--layer-index must be >= 1, got {self.layer_index}")


@dataclass
class CamConfig:
    """CAM seeds written and scored after training."""

    TITLE = "CAMs after training"
    cam_split: str = option("val", "split whose CAMs are written and scored at the end")
    make_cams: bool = option(True, "write and score CAMs after training", flag="--no-cams")
    cam_scales: Tuple[float, ...] = option((1.0,), "inference scales of the CAMs", parse=parse_floats)
    cam_flip: bool = option(True, "add the flipped view", flag="--no-cam-flip")
    cam_overlays: int = option(0, "write PNG overlays for N images")

    def validate(self) -> None:
        if len(self.cam_scales) == 0 or any(not math.isfinite(s) or s <= 0 for s in self.cam_scales):
            raise ValueError(f"--cam-scales must be a non-empty list of positive floats, got {list(self.cam_scales)}")
        if self.cam_overlays < 0:
            raise ValueError(f"--cam-overlays must be >= 0, got {self.cam_overlays}")


#: fields a resume may change without --resume-override: where and how long the run goes on, logging, the
#: machine (device, threads, workers, compile), where the dataset lies (a moved copy) and the after-training CAM
#: options; the trainer logs their changes. Everything else (model, data,
#: seed, optimisation, loss) must match the checkpoint's recorded config.
RESUME_FREE_FIELDS = frozenset({
    "resume", "resume_override", "run_dir", "run_name", "max_steps", "save_every_steps", "log_every", "device",
    "threads", "num_workers", "compile", "compile_pseudo", "compile_backend", "debug_recompiles", "skip_bad_images",
    "full_image_check", "make_cams", "cam_split", "cam_scales", "cam_flip", "cam_overlays", "pretrained",
    "allow_partial_pretrained", "data_root"})


def config_differences(stored: Mapping[str, Any], current: "SectionedConfig",
                       ignore: frozenset = RESUME_FREE_FIELDS) -> list:
    """['--seed: checkpoint 3, now 4', ...]: the fields (outside ``ignore``) whose value in ``stored`` (a nested or
    flat config dict, e.g. a checkpoint's) differs from ``current``. A stored key this version does not know is a
    difference too."""
    try:
        old = type(current).from_dict(stored, validate=False).flat()
    except (ValueError, TypeError) as exc:
        return [f"the checkpoint's config does not fit this version ({exc})"]
    new = current.flat()
    out = []
    for key, value in new.items():
        if key not in ignore and old.get(key) != value:
            out.append(f"--{key.replace('_', '-')}: checkpoint {old.get(key)!r}, now {value!r}")
    return out


# ------------------------------------------------------------------------------------------- the tree
class SectionedConfig:
    """Mixin of a config made of section dataclasses: flat/nested dict conversion and validation."""

    @classmethod
    def sections(cls) -> Dict[str, Type]:
        # a section's default_factory is its class, or a function returning an instance with other defaults
        # (SegTrainConfig's optimiser)
        return {f.name: f.default_factory if isinstance(f.default_factory, type) else type(f.default_factory())
                for f in fields(cls)}  # type: ignore[misc]

    @classmethod
    def field_owner(cls) -> Dict[str, str]:
        """field name -> section name (the names are unique across sections)."""
        owner: Dict[str, str] = {}
        for section, section_cls in cls.sections().items():
            for f in fields(section_cls):
                if f.name in owner:
                    raise TypeError(f"field {f.name!r} is in sections {owner[f.name]!r} and {section!r}")
                owner[f.name] = section
        return owner

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """Nested plain dict (tuples as lists): what manifests and checkpoints store."""
        out: Dict[str, Dict[str, Any]] = {}
        for name in self.sections():
            section = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        return out

    def flat(self) -> Dict[str, Any]:
        """Flat {field: value} over every section."""
        return {k: v for section in self.to_dict().values() for k, v in section.items()}

    @classmethod
    def from_dict(cls: Type[T], d: Mapping[str, Any], *, validate: bool = True) -> T:
        """Build from a nested ({section: {field: value}}) or flat ({field: value}, the format of checkpoints
        written before the sections existed) dict. Unknown keys are a ``ValueError``."""
        owner = cls.field_owner()
        sections = cls.sections()
        values: Dict[str, Dict[str, Any]] = {name: {} for name in sections}
        for key, value in d.items():
            if key in sections and isinstance(value, Mapping):
                for sub_key, sub_value in value.items():
                    if owner.get(sub_key) != key:
                        raise ValueError(f"config section {key!r} has no field {sub_key!r}")
                    values[key][sub_key] = sub_value
            elif key in owner:
                values[owner[key]][key] = value
            else:
                raise ValueError(f"config has unknown key {key!r}")
        built = {}
        for name, section_cls in sections.items():
            kw = values[name]
            for f in fields(section_cls):
                if f.name in kw and isinstance(f.default, tuple) and kw[f.name] is not None:
                    kw[f.name] = tuple(float(s) for s in kw[f.name])
            built[name] = section_cls(**kw)
        cfg = cls(**built)
        if validate:
            cfg.validate()
        return cfg

    def replace(self: T, **flat_values: Any) -> T:
        """A copy with some fields (by flat name) changed, validated."""
        merged = self.flat()
        merged.update(flat_values)
        return type(self).from_dict(merged)

    def validate(self: T) -> T:
        for name in self.sections():
            section = getattr(self, name)
            if hasattr(section, "validate"):
                section.validate()
        return self


@dataclass
class TrainConfig(SectionedConfig):
    """Every knob of a stage-one (AReAM) training run. Saved into the run manifest and every checkpoint.

    The **demo** defaults (``python scripts/train.py --amp --compile`` with no other argument): a small
    MCTformer-style ViT (embed 192, depth 6, 3 heads, 96 px; layers 0-3 refine, 4-5 get the affinity loss, the
    official 7-of-12 split scaled) trained from random init on the built-in synthetic dataset (400 train / 64 val
    images, batch 16, 15 epochs, the first 5 classification only). ``--preset official`` is the official
    MCTformer recipe (:data:`PRESETS`).

    Learning-rate schedule (documented deviation): stepped per optimizer step (linear warm-up from
    ``warmup_lr`` to ``lr`` over ``warmup_epochs`` worth of steps, then cosine to ``min_lr`` at the last step),
    not timm's per-epoch ``step(epoch)`` (docs/semantics.md, "Optimiser and schedule").
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aream: AReAMConfig = field(default_factory=AReAMConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cams: CamConfig = field(default_factory=CamConfig)

    def validate(self) -> "TrainConfig":
        for section in (self.data, self.model, self.optim, self.run, self.cams):
            section.validate()
        self.aream.validate(self.optim.epochs)
        return self

    def mode_name(self) -> str:
        """'aream', 'aream-fwd' (pseudo labels from the training forward) or 'cls-only' (no AReAM)."""
        if not self.aream.aream:
            return "cls-only"
        return "aream-fwd" if self.aream.pseudo_from_forward else "aream"


# The official MCTformer-path recipe (docs/semantics.md, "Optimiser and schedule"). Presets are override dicts
# of flat field names; explicit flags and a --config file still win.
PRESETS: Dict[str, Dict[str, Any]] = {
    "demo": {},
    "official": {
        "model": "mct_deit_small", "dataset": "voc", "image_size": 224, "embed_dim": None, "depth": None,
        "num_heads": None, "batch_size": 64, "epochs": 60, "cls_epochs": 10, "lr": 5e-4 * 64 / 512,
        "min_lr": 1e-5, "warmup_lr": 1e-6, "warmup_epochs": 5, "weight_decay": 0.05, "drop_path": 0.1,
        "layer_index": 7, "aream_weight": 0.1, "bg_low": 0.35, "bg_high": 0.55, "seed": 42,
        "train_split": "train_aug", "val_split": "val", "cam_split": "train_aug",
    },
    # the official Conformer-S path (TransCAM-style; docs/semantics.md, Conformer and Training details); the same values as
    # aream_fast.pseudo_labels.conformer.CONFORMER_TRAINING (tests/engine/test_conformer_task.py checks it).
    # Trained by aream_fast.engine.conformer_task.ConformerTask (head lr x10, img_box crops).
    "official-conformer": {
        "model": "conformer_small", "dataset": "voc", "image_size": 384, "embed_dim": None, "depth": None,
        "num_heads": None, "batch_size": 8, "epochs": 12, "cls_epochs": 2, "lr": 5e-5, "min_lr": 1e-6,
        "warmup_lr": 1e-6, "warmup_epochs": 1, "weight_decay": 0.01, "drop_path": 0.1, "layer_index": 9,
        "aream_weight": 0.1, "bg_low": 0.35, "bg_high": 0.55, "pseudo_scales": (0.5, 1.0, 1.5),
        "cam_scales": (0.5, 1.0, 1.5), "seed": 42, "train_split": "train_aug", "val_split": "val",
        "cam_split": "train_aug",
    },
}
OFFICIAL_PRESET = PRESETS["official"]


# ------------------------------------------------------------------------------------------- command line
def _flag(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    if f.type in ("bool", bool) and f.default is True:
        return f"--no-{name}"
    return f"--{name}"


def add_arguments(parser: argparse.ArgumentParser, config_cls: Type[SectionedConfig]) -> None:
    """One argparse group per section and one flag per field (dest = the field name), defaults shown."""
    instance = config_cls()  # the defaults of this config (a section's factory may change its class defaults)
    for section_name, section_cls in config_cls.sections().items():
        group = parser.add_argument_group(getattr(section_cls, "TITLE", section_cls.__name__))
        section_defaults = getattr(instance, section_name)
        for f in fields(section_cls):
            md = f.metadata
            flag = _flag(f)
            help_text = md.get("help", "")
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            if kind == "bool":
                on = getattr(section_defaults, f.name) is True
                if on and flag not in help_text:  # a negated flag: say that giving it turns the behaviour off
                    help_text = f"{help_text}; on by default, {flag} turns it off"
                group.add_argument(flag, dest=f.name, action="store_false" if on else "store_true", help=help_text)
                continue
            # a help text that states its own default (e.g. "default runs/<run-name>/<timestamp>") gets no
            # "(default: None)" after it
            shown = "" if "default" in help_text.lower() else " (default: %(default)s)"
            kw: Dict[str, Any] = {"dest": f.name, "default": getattr(section_defaults, f.name),
                                  "help": help_text + shown}
            if md.get("parse") is not None:
                kw["type"] = md["parse"]
            elif kind in ("int", "float"):
                kw["type"] = int if kind == "int" else float
            if md.get("choices"):
                kw["choices"] = list(md["choices"])
            if md.get("nargs"):
                kw["nargs"] = md["nargs"]
                kw["const"] = md.get("const")
            group.add_argument(flag, **kw)


def read_config_file(path: str) -> Dict[str, Any]:
    """A ``--config`` file: JSON or TOML, nested by section or flat field names."""
    if not os.path.isfile(path):
        raise ValueError(f"--config file {path!r} does not exist")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as fh:
                return tomllib.load(fh)
        with open(path) as fh:
            content = json.load(fh)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"--config file {path!r} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: "
                         f"{exc}") from exc
    if not isinstance(content, dict):
        raise ValueError(f"--config file {path!r} must hold an object of sections or fields")
    return content


def build_parser(config_cls: Type[SectionedConfig] = None, *, prog: str = "train.py",
                 description: str = "", presets: Optional[Mapping[str, Mapping[str, Any]]] = None
                 ) -> argparse.ArgumentParser:
    """The command line of ``config_cls`` (default :class:`TrainConfig`) plus ``--preset`` and ``--config``."""
    config_cls = config_cls or TrainConfig
    presets = PRESETS if presets is None and config_cls is TrainConfig else (presets or {"demo": {}})
    p = argparse.ArgumentParser(prog=prog, description=description or _TRAIN_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets), default="demo",
                   help="named override set (explicit flags and --config still win); default demo")
    p.add_argument("--config", default=None, help="JSON or TOML file of config values (nested by section or "
                                                   "flat); explicit flags win over it")
    add_arguments(p, config_cls)
    return p


_TRAIN_DESCRIPTION = (
    "Train an AReAM classifier (MCTformer-style ViT + affinity loss on deep-layer attention), then write CAMs for a "
    "split and print their mIoU. With no arguments besides --amp --compile it trains a small model on the built-in "
    "synthetic dataset in a few minutes on a 2-core CPU. Official VOC recipe: --preset official --data-root "
    "VOCdevkit/VOC2012 --pretrained deit_small.pth (mct_deit_small, 224 px, batch 64, 60 epochs, lr 6.25e-5, "
    "wd 0.05, warm-up 5 epochs from 1e-6, cosine to 1e-5, cls-epochs 10, layer-index 7, bg 0.35/0.55, "
    "aream-weight 0.1, seed 42). Conformer-S recipe: --preset official-conformer --data-root VOCdevkit/VOC2012 "
    "--pretrained conformer_sm.pth. Multi-process: torchrun --nproc_per_node N scripts/train.py ...")


def config_from_args(argv: Optional[Sequence[str]] = None, config_cls: Type[SectionedConfig] = None, *,
                     parser: Optional[argparse.ArgumentParser] = None,
                     presets: Optional[Mapping[str, Mapping[str, Any]]] = None):
    """Parse a command line into a validated config (defaults < preset < --config file < explicit flags)."""
    config_cls = config_cls or TrainConfig
    if presets is None:
        presets = PRESETS if config_cls is TrainConfig else {"demo": {}}
    parser = parser or build_parser(config_cls, presets=presets)
    first, _ = parser.parse_known_args(argv)
    defaults: Dict[str, Any] = dict(presets.get(first.preset, {}))
    if first.config is not None:
        try:
            content = read_config_file(first.config)
            config_cls.from_dict(content, validate=False)  # unknown sections / fields are refused here
        except (ValueError, TypeError) as exc:
            parser.error(str(exc))
        defaults.update(_flatten(content))
    parser.set_defaults(**{k: tuple(v) if isinstance(v, list) else v for k, v in defaults.items()})
    values = vars(parser.parse_args(argv))
    values.pop("preset")
    values.pop("config")
    try:
        return config_cls.from_dict(values)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def _flatten(content: Mapping[str, Any]) -> Dict[str, Any]:
    """{section: {field: v}} and/or {field: v} -> {field: v}."""
    flat: Dict[str, Any] = {}
    for key, value in content.items():
        if isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def config_json(cfg: SectionedConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
