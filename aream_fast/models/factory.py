"""``build_model``: named ViT configurations for WSSS."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from aream_fast.models.pretrained import load_pretrained
from aream_fast.models.vit import WSSSViT

# name -> (mct, architecture). Small = DeiT-S / ViT-S (384, 6 heads), Base = DeiT-B / ViT-B (768, 12 heads).
MODEL_CONFIGS: Dict[str, Tuple[bool, Dict[str, Any]]] = {
    "mct_deit_small": (True, dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, patch_size=16)),
    "mct_deit_base": (True, dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16)),
    "vit_small": (False, dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, patch_size=16)),
    "vit_base": (False, dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16)),
}

_OVERRIDABLE = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "in_chans")

# Conformer-S (docs/semantics.md, "Conformer"); built by ``aream_fast.models.conformer.Conformer``. No position
# embedding, so
# img_size is not stored. Tiny test models override base_channel / channel_ratio / embed_dim / num_heads.
CONFORMER_CONFIGS: Dict[str, Dict[str, Any]] = {
    "conformer_small": dict(base_channel=64, channel_ratio=4, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
}
_CONFORMER_OVERRIDABLE = ("base_channel", "channel_ratio", "embed_dim", "depth", "num_heads", "mlp_ratio",
                          "in_chans")


def build_model(name: str, num_classes: int, img_size: Union[int, Tuple[int, int]] = 224, drop_path: float = 0.1,
                pretrained: Optional[Union[str, os.PathLike]] = None, attention_backend: str = "auto",
                allow_partial_pretrained: bool = False, **overrides: Any) -> nn.Module:
    """Build "mct_deit_small", "mct_deit_base", "vit_small", "vit_base" or "conformer_small".

    num_classes: K foreground classes (= C class tokens for the MCT models). img_size: training size (int or
    (H, W), multiple of 16): sets the stored position-embedding grid. drop_path: stochastic-depth rate of the
    last block (linear from 0). pretrained: path of a local timm/DeiT checkpoint (``load_pretrained``; its
    ``LoadReport`` is kept as ``model.pretrained_report``); allow_partial_pretrained: accept a file that fills
    fewer than half of the backbone's tensors.
    attention_backend: "auto" (= "sdpa"), "sdpa", "triton" or "xformers" (the latter two CUDA only).
    overrides: architecture fields for tiny test models (embed_dim, depth, num_heads, mlp_ratio, patch_size,
    in_chans). "conformer_small": img_size is only checked and kept (no position embedding); overrides base_channel,
    channel_ratio, embed_dim, depth, num_heads, mlp_ratio, in_chans; pretrained: an official-layout Conformer
    checkpoint.
    """
    if name in CONFORMER_CONFIGS:
        from aream_fast.models.conformer import Conformer, load_conformer_pretrained

        bad = sorted(set(overrides) - set(_CONFORMER_OVERRIDABLE))
        if bad:
            raise ValueError(f"build_model got unknown keyword arguments {bad}; allowed overrides for {name}: "
                             f"{_CONFORMER_OVERRIDABLE}")
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(hw) != 2 or any(int(v) <= 0 or int(v) % 16 for v in hw):
            raise ValueError(f"img_size must be a positive multiple of 16 (int or (H, W)), got {img_size!r}")
        model = Conformer(num_classes, drop_path=drop_path, attention_backend=attention_backend, img_size=hw,
                          **{**CONFORMER_CONFIGS[name], **overrides})
        model.model_name = name
        if pretrained is not None:
            model.pretrained_report = load_conformer_pretrained(model, pretrained,
                                                                allow_partial=allow_partial_pretrained)
        return model
    if name not in MODEL_CONFIGS:
        choices = sorted(MODEL_CONFIGS) + sorted(CONFORMER_CONFIGS)
        raise ValueError(f"unknown model name {name!r}; choose one of {choices}")
    bad = sorted(set(overrides) - set(_OVERRIDABLE))
    if bad:
        raise ValueError(f"build_model got unknown keyword arguments {bad}; allowed overrides: {_OVERRIDABLE}")
    mct, arch = MODEL_CONFIGS[name]
    arch = {**arch, **overrides}
    model = WSSSViT(num_classes, mct=mct, img_size=img_size, drop_path=drop_path,
                    attention_backend=attention_backend, **arch)
    model.model_name = name
    if pretrained is not None:
        model.pretrained_report = load_pretrained(model, pretrained, allow_partial=allow_partial_pretrained)
    return model
