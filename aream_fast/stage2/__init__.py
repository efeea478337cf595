"""Stage two: from CAM seeds to a segmentation network.

CAM seeds (``.npy``) -> dense CRF / random walk on the ViT's own patch affinity -> pseudo masks (PNG) ->
segmentation network trained by the same engine -> multi-scale + flip (+ CRF) inference -> val mIoU.

Public names are resolved lazily (importing this package imports no model code)::

    from aream_fast.stage2 import dense_crf, CRF_PRESETS, build_seg_model, SEG_MODELS
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "dense_crf": "aream_fast.stage2.crf",
    "CRF_PRESETS": "aream_fast.stage2.crf",
    "CRFParams": "aream_fast.stage2.crf",
    "random_walk": "aream_fast.stage2.random_walk",
    "RW_PRESETS": "aream_fast.stage2.random_walk",
    "build_seg_model": "aream_fast.stage2.seg_models",
    "SEG_MODELS": "aream_fast.stage2.seg_models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aream_fast.stage2' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
