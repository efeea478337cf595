"""Building a run's pieces from its config sections: data root, datasets, model, and a model from a checkpoint."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import nn

from aream_fast.engine.config import DataConfig, ModelConfig, TrainConfig

DATA_CACHE = "data_cache"


def synthetic_root(data: DataConfig) -> str:
    """Default synthetic cache: ``data_cache/<name keyed by the generation parameters>`` (gitignored)."""
    from aream_fast.data.synthetic import default_synthetic_root

    name = default_synthetic_root(data.synthetic_train_size, data.synthetic_val_size, data.image_size, seed=0).name
    return os.path.join(DATA_CACHE, name)


def resolve_data_root(data: DataConfig, *, create: bool, progress: bool = False) -> str:
    """The dataset root, absolute. Synthetic: written once (``ensure_synthetic``) when ``create`` (rank 0)."""
    if data.dataset == "synthetic":
        from aream_fast.data import ensure_synthetic

        root = data.data_root or synthetic_root(data)
        if create:
            ensure_synthetic(root, num_train=data.synthetic_train_size, num_val=data.synthetic_val_size,
                             image_size=data.image_size, seed=0, progress=progress)
        return os.path.abspath(str(root))
    if data.data_root is None:
        raise ValueError(f"--data-root is required for --dataset {data.dataset} (e.g. VOCdevkit/VOC2012)")
    return os.path.abspath(data.data_root)


def build_model_from_config(model: ModelConfig, num_classes: int, *, image_size: int,
                            pretrained: Optional[str] = None) -> nn.Module:
    """``aream_fast.models.build_model`` with the section's name, size overrides, drop path and backend."""
    from aream_fast.models import build_model

    return build_model(model.model, num_classes, img_size=image_size, drop_path=model.drop_path,
                       pretrained=pretrained, attention_backend=model.attention_backend,
                       allow_partial_pretrained=model.allow_partial_pretrained, **model.overrides())


def build_split(data: DataConfig, root: str, split: str, *, train: bool, native_size: bool = False,
                with_masks: Optional[bool] = None, progress: bool = False):
    """One split via ``aream_fast.data.build_dataset``. native_size: no resize (CAM inference)."""
    from aream_fast.data import build_dataset

    return build_dataset(data.dataset, root, split, train=train,
                         image_size=None if native_size else data.image_size, with_masks=with_masks,
                         skip_bad_images=data.skip_bad_images, progress=progress)


def build_cam_eval_split(data: DataConfig, root: str, split: str, *, mask_dir: Optional[str] = None,
                         progress: bool = False):
    """Native-size split with masks for scoring CAMs. VOC with no ``mask_dir``: the official ground truth
    ``SegmentationClass`` (docs/semantics.md, "Evaluation") when it holds every listed mask, else the default
    folder (``SegmentationClassAug``), as ``scripts/evaluate.py`` does. ``dataset.files.mask_dir`` tells which."""
    from aream_fast.data import build_dataset
    from aream_fast.data.layout import DatasetLayoutError

    def build(folder: Optional[str]):
        return build_dataset(data.dataset, root, split, train=False, image_size=None, with_masks=True,
                             mask_dir=folder, skip_bad_images=data.skip_bad_images, progress=progress)

    if mask_dir is None and data.dataset == "voc":
        try:
            return build("SegmentationClass")
        except DatasetLayoutError:
            pass
    return build(mask_dir)


def load_checkpoint_model(path: str, device: Any = "cpu") -> Tuple[nn.Module, TrainConfig, Dict[str, Any]]:
    """(model in eval mode, its TrainConfig, the checkpoint dict without its weights) from a stage-one
    checkpoint (``checkpoint*.pth``; the flat config of older checkpoints is read too)."""
    from aream_fast.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, map_location=device)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a training checkpoint of this project (no 'model' / 'config' entry)")
    cfg = TrainConfig.from_dict(ckpt["config"], validate=False)
    model = build_model_from_config(cfg.model, int(ckpt["num_classes"]), image_size=cfg.data.image_size)
    model.load_state_dict(ckpt.pop("model"))
    return model.to(device).eval(), cfg, ckpt


def load_model_from_checkpoint(path: str, device: Any = "cpu") -> Tuple[nn.Module, TrainConfig]:
    """(model in eval mode, its TrainConfig) from a stage-one checkpoint (``checkpoint*.pth``; the flat config of
    older checkpoints is read too). The one checkpoint -> model path of the library and the scripts."""
    model, cfg, _ = load_checkpoint_model(path, device)
    return model, cfg


def checkpoint_data_root(checkpoint: str, data: DataConfig, ckpt: Mapping[str, Any]) -> str:
    """The absolute dataset root of the run that wrote ``checkpoint``, from any working directory: the absolute
    root the checkpoint stores (since issue 15), else the ``data_root`` of the run's manifest.json next to it,
    else the config's root (``--data-root``, or the default synthetic cache) when absolute, or tried relative to
    the working directory and to each folder above the checkpoint (runs/<name>/<stamp>/ lies under the folder
    training ran in). ``FileNotFoundError`` listing every place looked at when none is a folder."""
    candidates = []
    if ckpt.get("data_root"):
        candidates.append(str(ckpt["data_root"]))
    manifest = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "manifest.json")
    if os.path.isfile(manifest):
        try:
            with open(manifest) as fh:
                stored = json.load(fh).get("data_root")
        except (OSError, ValueError):
            stored = None
        if stored:
            candidates.append(str(stored))
    root = data.data_root or (synthetic_root(data) if data.dataset == "synthetic" else None)
    if root is not None:
        if os.path.isabs(root):
            candidates.append(root)
        else:
            candidates.append(os.path.abspath(root))
            folder = os.path.dirname(os.path.abspath(checkpoint))
            for _ in range(4):
                folder = os.path.dirname(folder)
                candidates.append(os.path.join(folder, root))
    seen = list(dict.fromkeys(candidates))
    for candidate in seen:
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(f"the dataset root of checkpoint {checkpoint} was not found; looked in: "
                            f"{', '.join(seen) or '(nothing recorded)'}; pass --data-root")
