"""Building the run's pieces from a :class:`TrainConfig`: data root, datasets, model."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from torch import nn

from aream_fast.engine.config import TrainConfig

DATA_CACHE = "data_cache"


def synthetic_root(cfg: TrainConfig) -> str:
    """Default synthetic cache: ``data_cache/<name keyed by the generation parameters>`` (gitignored)."""
    from aream_fast.data.synthetic import default_synthetic_root

    name = default_synthetic_root(cfg.synthetic_train_size, cfg.synthetic_val_size, cfg.image_size,
                                  seed=0).name
    return os.path.join(DATA_CACHE, name)


def resolve_data_root(cfg: TrainConfig, *, create: bool, progress: bool = False) -> str:
    """The dataset root. Synthetic: written once (``ensure_synthetic``) when ``create`` (rank 0 only)."""
    if cfg.dataset == "synthetic":
        from aream_fast.data import ensure_synthetic

        root = cfg.data_root or synthetic_root(cfg)
        if create:
            ensure_synthetic(root, num_train=cfg.synthetic_train_size, num_val=cfg.synthetic_val_size,
                             image_size=cfg.image_size, seed=0, progress=progress)
        return str(root)
    if cfg.data_root is None:
        raise ValueError(f"--data-root is required for --dataset {cfg.dataset} (e.g. VOCdevkit/VOC2012)")
    return cfg.data_root


def model_overrides(cfg: TrainConfig) -> Dict[str, Any]:
    return {k: v for k, v in (("embed_dim", cfg.embed_dim), ("depth", cfg.depth), ("num_heads", cfg.num_heads))
            if v is not None}


def build_model_from_config(cfg: TrainConfig, num_classes: int, *, pretrained: Optional[str] = None) -> nn.Module:
    """``aream_fast.models.build_model`` with the config's name, size overrides, drop path and backend."""
    from aream_fast.models import build_model

    return build_model(cfg.model, num_classes, img_size=cfg.image_size, drop_path=cfg.drop_path,
                       pretrained=pretrained, attention_backend=cfg.attention_backend, **model_overrides(cfg))


def build_split(cfg: TrainConfig, root: str, split: str, *, train: bool, native_size: bool = False,
                with_masks: Optional[bool] = None, progress: bool = False):
    """One split via ``aream_fast.data.build_dataset``. native_size: no resize (CAM inference)."""
    from aream_fast.data import build_dataset

    return build_dataset(cfg.dataset, root, split, train=train,
                         image_size=None if native_size else cfg.image_size, with_masks=with_masks,
                         skip_bad_images=cfg.skip_bad_images, progress=progress)


def build_cam_eval_split(cfg: TrainConfig, root: str, split: str, *, mask_dir: Optional[str] = None,
                         progress: bool = False):
    """Native-size split with masks for scoring CAMs. VOC with no ``mask_dir``: the official ground truth
    ``SegmentationClass`` (spec §5.3) when it holds every listed mask, else the default folder
    (``SegmentationClassAug``), as ``scripts/evaluate.py`` does. ``dataset.files.mask_dir`` tells which."""
    from aream_fast.data import build_dataset
    from aream_fast.data.layout import DatasetLayoutError

    def build(folder: Optional[str]):
        return build_dataset(cfg.dataset, root, split, train=False, image_size=None, with_masks=True,
                             mask_dir=folder, skip_bad_images=cfg.skip_bad_images, progress=progress)

    if mask_dir is None and cfg.dataset == "voc":
        try:
            return build("SegmentationClass")
        except DatasetLayoutError:
            pass
    return build(mask_dir)


def load_model_from_checkpoint(path: str, device: Any = "cpu"):
    """(model in eval mode, its TrainConfig) from a training checkpoint (``checkpoint*.pth``)."""
    from aream_fast.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, map_location=device)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model_from_config(cfg, int(ckpt["num_classes"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg
