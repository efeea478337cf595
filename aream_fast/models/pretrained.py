"""Load a local DeiT / ViT checkpoint in timm's layout into a ``WSSSViT`` (docs/semantics.md, "Model" "Loading DeiT-S").

Rules (official ``main_voc_mctformer.py``):
1. ``head.*`` entries whose shape differs from the model's are dropped (Linear 1000 vs the conv head).
2. ``pos_embed``: the checkpoint's class-token slot is repeated C times for an MCT model (C class tokens);
   the patch grid is resized with bicubic interpolation (align_corners False, size-based) when the
   checkpoint's grid differs from the model's.
3. ``cls_token`` (1, 1, D) is repeated C times for an MCT model.
4. ``load_state_dict(strict=False)``; missing / unexpected keys are reported and logged.
5. A file that fills fewer than half of the model's backbone (non-head) tensors is refused unless
   ``allow_partial`` (``--allow-partial-pretrained``): a checkpoint of another depth or family would otherwise
   leave most of the model at its random init without a word.
Nothing is ever downloaded. A ``checkpoint.pth`` of this project is read too (its "model" weights; the numpy
RNG state it also holds is allowed through ``torch.load``'s weights-only unpickler, nothing else is).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, List, NamedTuple, Tuple, Union

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
    loaded: int = 0  # backbone (non-head) tensors of the model filled from the file
    backbone: int = 0  # backbone (non-head) tensors of the model

    def summary(self) -> str:
        """One line: how much of the backbone the file filled, and the key lists (first few of each)."""
        def few(keys: List[str]) -> str:
            return f"{len(keys)}" + (f" {keys[:6]}{' ...' if len(keys) > 6 else ''}" if keys else "")

        return (f"pretrained {self.path}: loaded {self.loaded} of the model's {self.backbone} backbone tensors; "
                f"missing {few(self.missing_keys)}, unexpected {few(self.unexpected_keys)}, dropped (head shape) "
                f"{few(self.dropped_keys)}, adapted {self.adapted_keys}")

    def as_dict(self) -> Dict[str, object]:
        """For manifest.json."""
        return {"path": self.path, "loaded": self.loaded, "backbone": self.backbone,
                "missing_keys": list(self.missing_keys), "unexpected_keys": list(self.unexpected_keys),
                "dropped_keys": list(self.dropped_keys), "adapted_keys": list(self.adapted_keys)}


# what a checkpoint.pth of this project holds besides tensors: numpy's RNG state (an ndarray of uint32 and its
# dtype); allowed by name in the weights-only unpickler, so reading one never runs arbitrary pickled code
_RNG_STATE_GLOBALS = ("numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                      "numpy.core.multiarray._reconstruct", "numpy.dtypes.UInt32DType")


def _unpickler_reason(err: BaseException) -> str:
    """One line of a ``torch.load`` failure: the weights-only unpickler's own reason, not torch's advice to
    retry with weights_only=False (wrong for a file that is not a checkpoint, unsafe for a foreign one)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        text = text.split("Please use", 1)[0]
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _load_weights_only(path: str):
    """``torch.load(weights_only=True)``; when the only foreign objects are numpy RNG state (this project's own
    checkpoint format), again with exactly those classes allowed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - decided below, re-raised when not our format
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - not a zip checkpoint at all: the first error tells more
            raise first
        if not unsafe or not unsafe <= set(_RNG_STATE_GLOBALS):
            raise first
        import importlib

        allowed = []  # the listed ones and the uint32 dtype class (torch does not list it as unsafe)
        for name in sorted(unsafe | {"numpy.dtypes.UInt32DType"}):
            module, _, attr = name.rpartition(".")
            try:
                allowed.append(getattr(importlib.import_module(module), attr))
            except (ImportError, AttributeError):
                continue
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, Tensor]:
    """Read a checkpoint file: a plain state dict, or a dict with the state dict under "model" or
    "state_dict". Raises FileNotFoundError / ValueError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint not found: {path!r} (aream-fast never downloads "
                                f"weights; pass a local timm/DeiT checkpoint file)")
    try:
        ckpt = _load_weights_only(path)
    except Exception as err:  # any unpickling failure means: not a (safe) checkpoint; re-raised below
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint (torch.load with weights_only=True "
                         f"failed: {_unpickler_reason(err)})") from err
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


def _token_tensor(state: Dict[str, Tensor], key: str, model: nn.Module, path) -> Tensor:
    """``state[key]`` (cls_token / pos_embed), checked to be (1, n, embed_dim); else a ValueError with the
    architecture hint."""
    t = state[key]
    if t.dim() != 3 or t.shape[-1] != model.embed_dim:
        raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, expected (1, n, {model.embed_dim})."
                         + architecture_hint(model, state))
    return t


def architecture_hint(model: nn.Module, state: Dict[str, Tensor]) -> str:
    """'' or a sentence saying how the checkpoint's width / depth differ from the model's and which flags fix it."""
    width = next((state[k].shape[-1] for k in ("cls_token", "pos_embed") if k in state and state[k].dim() == 3),
                 None)
    if width is None and "patch_embed.proj.weight" in state:
        width = state["patch_embed.proj.weight"].shape[0]
    blocks = [int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()]
    depth = max(blocks) + 1 if blocks else None
    parts = []
    if width is not None and width != getattr(model, "embed_dim", width):
        parts.append(f"{width} wide (the model {model.embed_dim})")
    if depth is not None and depth != getattr(model, "depth", depth):
        parts.append(f"{depth} blocks deep (the model {model.depth})")
    if not parts:
        return ""
    return (f" The checkpoint is {' and '.join(parts)}: the demo's defaults are --embed-dim 192 --depth 6 "
            f"--num-heads 3; pass --embed-dim none --depth none --num-heads none for the named --model's size "
            f"(DeiT-S / ViT-S: 384 wide, 12 deep, 6 heads), or set the three to the checkpoint's.")


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
        tok = _token_tensor(state, "cls_token", model, path)
        ckpt_prefix = tok.shape[1]
        if tok.shape[1] != c:
            if tok.shape[1] != 1:
                raise ValueError(f"{path}: cls_token has {tok.shape[1]} tokens; can only load 1 or {c}")
            state["cls_token"] = tok.repeat(1, c, 1)
            adapted.append("cls_token")
    if "pos_embed" in state:
        pos = _token_tensor(state, "pos_embed", model, path)
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
                             f"{tuple(own[key].shape)} in the model (wrong architecture?)."
                             + architecture_hint(model, state))
    return state, dropped, adapted


def backbone_coverage(own: Dict[str, Tensor], state: Dict[str, Tensor], is_head) -> Tuple[int, int]:
    """(backbone tensors of ``own`` that ``state`` fills, backbone tensors of ``own``); ``is_head(key)`` names the
    head tensors a pretrained file is not expected to hold."""
    wanted = [k for k in own if not is_head(k)]
    return sum(k in state for k in wanted), len(wanted)


def refuse_partial(report: LoadReport, allow_partial: bool, hint: str = "") -> None:
    """``ValueError`` (with the report) when the file filled fewer than half of the backbone, unless allowed."""
    if allow_partial or 2 * report.loaded >= report.backbone:
        return
    raise ValueError(f"{report.summary()}. Refusing a pretrained file that leaves most of the backbone at its "
                     f"random init (pass --allow-partial-pretrained to accept it).{hint}")


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike], *, allow_partial: bool = False) -> LoadReport:
    """Load a local timm-layout DeiT/ViT checkpoint (or this project's ``checkpoint.pth``) into ``model`` with the
    docs/semantics.md, "Model" rules, strict=False.
    A ``Conformer`` is loaded by ``aream_fast.models.conformer.load_conformer_pretrained`` (docs/semantics.md,
    "Conformer").

    Returns a ``LoadReport`` (missing / unexpected / dropped / adapted keys, backbone coverage), also logged at
    INFO level. Raises FileNotFoundError for a missing file and ValueError (naming the file) for a file that is
    not a checkpoint, does not fit the architecture, or (unless ``allow_partial``) fills fewer than half of
    the model's backbone tensors; the model is left untouched then.
    """
    from aream_fast.models.conformer import Conformer, load_conformer_pretrained  # lazy: conformer imports us

    if isinstance(model, Conformer):  # official Conformer layout (docs/semantics.md, "Conformer")
        return load_conformer_pretrained(model, path, allow_partial=allow_partial)
    path = os.fspath(path)
    state = read_state_dict(path)
    state, dropped, adapted = adapt_state_dict(model, state, path)
    own = model.state_dict()
    if not any(k in own for k in state):
        raise ValueError(f"{path!r} shares no parameter name with the model: not a timm ViT/DeiT checkpoint")
    loaded, backbone = backbone_coverage(own, state, lambda k: k.startswith("head."))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    report = LoadReport(path=path, missing_keys=missing, unexpected_keys=unexpected, dropped_keys=dropped,
                        adapted_keys=adapted, loaded=loaded, backbone=backbone)
    refuse_partial(report, allow_partial, architecture_hint(model, state))
    model.load_state_dict(state, strict=False)
    logger.info("loaded %s", report.summary())
    return report
