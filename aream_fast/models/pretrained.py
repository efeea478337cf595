"""Load a local DeiT / ViT checkpoint in timm's layout into a ``WSSSViT`` (docs/semantics.md, "Model" "Loading DeiT-S").

Rules (official ``main_voc_mctformer.py``):
1. ``head.*`` entries whose shape differs from the model's are dropped (Linear 1000 vs the conv head).
2. ``pos_embed``: the checkpoint's class-token slot is repeated C times for an MCT model (C class tokens);
   the patch grid is resized with bicubic interpolation (align_corners False, size-based) when the
   checkpoint's grid differs from the model's.
3. ``cls_token`` (1, 1, D) is repeated C times for an MCT model.
4. ``load_state_dict(strict=False)``; missing / unexpected keys are reported and logged.
Nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, List, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class LoadReport(NamedTuple):
    """What ``load_pretrained`` did. missing_keys / unexpected_keys as ``load_state_dict`` reports them;
    dropped_keys: checkpoint entries removed for a shape mismatch; adapted_keys: entries repeated/resized."""

    path: str
    missing_keys: List[str]
    unexpected_keys: List[str]
    dropped_keys: List[str]
    adapted_keys: List[str]


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, Tensor]:
    """Read a checkpoint file: a plain state dict, or a dict with the state dict under "model" or
    "state_dict". Raises FileNotFoundError / ValueError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint not found: {path!r} (aream-fast never downloads "
                                f"weights; pass a local timm/DeiT checkpoint file)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means: not a (safe) checkpoint; re-raised below
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint (torch.load with weights_only=True "
                         f"failed: {type(err).__name__}: {err})") from err
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, Tensor) for v in ckpt.values()):
        raise ValueError(f"{path!r} is not a model checkpoint: expected a state dict of tensors (or one under "
                         f"'model' / 'state_dict'), got {type(ckpt).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def _resize_grid(patch_pos: Tensor, old: tuple, new: tuple) -> Tensor:
    """(1, h0*w0, D) -> (1, h*w, D), bicubic, align_corners False, size-based (official load path)."""
    d = patch_pos.shape[-1]
    x = patch_pos.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=new, mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d).to(patch_pos.dtype)


def adapt_state_dict(model: nn.Module, state: Dict[str, Tensor], path: str = "<state dict>"):
    """Apply the docs/semantics.md, "Model" loading rules; returns (adapted state dict, dropped keys, adapted keys)."""
    own = model.state_dict()
    c = int(model.num_prefix_tokens)
    state = dict(state)
    dropped: List[str] = []
    adapted: List[str] = []
    for key in [k for k in state if k.startswith("head.")]:
        if key not in own or own[key].shape != state[key].shape:
            dropped.append(key)
            del state[key]
    ckpt_prefix = None
    if "cls_token" in state:
        tok = state["cls_token"]
        if tok.dim() != 3 or tok.shape[-1] != model.embed_dim:
            raise ValueError(f"{path}: cls_token has shape {tuple(tok.shape)}, expected (1, n, {model.embed_dim})")
        ckpt_prefix = tok.shape[1]
        if tok.shape[1] != c:
            if tok.shape[1] != 1:
                raise ValueError(f"{path}: cls_token has {tok.shape[1]} tokens; can only load 1 or {c}")
            state["cls_token"] = tok.repeat(1, c, 1)
            adapted.append("cls_token")
    if "pos_embed" in state:
        pos = state["pos_embed"]
        if pos.dim() != 3 or pos.shape[-1] != model.embed_dim:
            raise ValueError(f"{path}: pos_embed has shape {tuple(pos.shape)}, expected (1, n, {model.embed_dim})")
        n = pos.shape[1]
        if ckpt_prefix is None:  # infer the prefix count: the rest must be a square patch grid
            ckpt_prefix = next((p for p in (1, c, 0, 2) if n - p > 0 and math.isqrt(n - p) ** 2 == n - p), None)
        n_patches = n - ckpt_prefix if ckpt_prefix is not None else -1
        g = math.isqrt(n_patches) if n_patches > 0 else 0
        if ckpt_prefix is None or g * g != n_patches:
            raise ValueError(f"{path}: cannot split pos_embed of shape {tuple(pos.shape)} into class slots and a "
                             f"square patch grid")
        cls_pos, patch_pos = pos[:, :ckpt_prefix], pos[:, ckpt_prefix:]
        changed = False
        if ckpt_prefix != c:
            if ckpt_prefix != 1:
                raise ValueError(f"{path}: pos_embed has {ckpt_prefix} class slots; can only load 1 or {c}")
            cls_pos = cls_pos.repeat(1, c, 1)
            changed = True
        if (g, g) != tuple(model.grid_size):
            patch_pos = _resize_grid(patch_pos, (g, g), tuple(model.grid_size))
            changed = True
        if changed:
            state["pos_embed"] = torch.cat([cls_pos, patch_pos], dim=1)
            adapted.append("pos_embed")
    for key, value in list(state.items()):
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                             f"{tuple(own[key].shape)} in the model (wrong architecture?)")
    return state, dropped, adapted


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike]) -> LoadReport:
    """Load a local timm-layout DeiT/ViT checkpoint into ``model`` with the docs/semantics.md, "Model" rules,
    strict=False.
    A ``Conformer`` is loaded by ``aream_fast.models.conformer.load_conformer_pretrained`` (docs/semantics.md,
    "Conformer").

    Returns a ``LoadReport`` (missing / unexpected / dropped / adapted keys), also logged at INFO level.
    Raises FileNotFoundError for a missing file and ValueError (naming the file) for a file that is not a
    checkpoint or does not fit the architecture.
    """
    from aream_fast.models.conformer import Conformer, load_conformer_pretrained  # lazy: conformer imports us

    if isinstance(model, Conformer):  # official Conformer layout (docs/semantics.md, "Conformer")
        return load_conformer_pretrained(model, path)
    path = os.fspath(path)
    state = read_state_dict(path)
    state, dropped, adapted = adapt_state_dict(model, state, path)
    own = model.state_dict()
    if not any(k in own for k in state):
        raise ValueError(f"{path!r} shares no parameter name with the model: not a timm ViT/DeiT checkpoint")
    result = model.load_state_dict(state, strict=False)
    report = LoadReport(path=path, missing_keys=list(result.missing_keys),
                        unexpected_keys=list(result.unexpected_keys), dropped_keys=dropped, adapted_keys=adapted)
    logger.info("loaded %s: missing keys %s, unexpected keys %s, dropped %s, adapted %s", path,
                report.missing_keys, report.unexpected_keys, dropped, adapted)
    return report
