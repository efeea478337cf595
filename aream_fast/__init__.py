"""aream-fast: AReAM (attention re-activation for weakly supervised semantic segmentation) without any
N x N attention matrix.

Public API (stable; other ViT-WSSS code imports these names)::

    from aream_fast import aream_loss, AReAMLoss, seg_to_patch_labels, aream_loss_reference

Names are resolved lazily so that ``import aream_fast`` stays cheap and optional parts (Triton, timm)
are only imported when used.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

__version__ = "0.1.0"


def _map_checkout_kernels() -> None:
    """Make ``aream_fast.kernels`` importable from a plain checkout (``PYTHONPATH=<repo>``, no install).

    ``pyproject.toml`` installs the root ``kernels/`` folder as ``aream_fast.kernels``; an install (regular or
    editable) finds it through its own finder and this does nothing. From a checkout nothing maps it, so the
    folder ``<repo>/kernels`` is registered here under that name (its ``__init__`` only; the kernel modules,
    and Triton, are still imported on first use)."""
    name = __name__ + ".kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_map_checkout_kernels()

# public name -> module that defines it
_EXPORTS = {
    # loss (issue: fused AReAM loss)
    "aream_loss": "aream_fast.losses.aream",
    "AReAMLoss": "aream_fast.losses.aream",
    "deferred_aream_loss": "aream_fast.losses.deferred",
    "DeferredGrads": "aream_fast.losses.deferred",
    "aream_loss_reference": "aream_fast.official.loss",
    "seg_to_patch_labels": "aream_fast.pseudo_labels.patch_labels",
    "pair_counts": "aream_fast.losses.pairs",
    "apply_aream_to_timm": "aream_fast.integrations.timm",
    "AReAMRecorder": "aream_fast.integrations.timm",
    # model records
    "AttentionRequest": "aream_fast.models.records",
    "AttentionRecords": "aream_fast.models.records",
    "ViTOutput": "aream_fast.models.records",
    # models and CAMs
    "build_model": "aream_fast.models",
    "load_pretrained": "aream_fast.models",
    "pseudo_label_cams": "aream_fast.pseudo_labels.cam",
    "inference_cam": "aream_fast.pseudo_labels.cam",
    "cams_from_output": "aream_fast.pseudo_labels.cam",
    "PresentCAMs": "aream_fast.pseudo_labels.cam",
    "present_classes": "aream_fast.pseudo_labels.cam",
    "save_cam_npy": "aream_fast.pseudo_labels.seeds",
    "load_cam_npy": "aream_fast.pseudo_labels.seeds",
    "attention_apply": "aream_fast.pseudo_labels.refine",
    "class_patch_attention": "aream_fast.models.attention",
    "LoadReport": "aream_fast.models",
    # pseudo labels
    "PAR": "aream_fast.pseudo_labels.par",
    "cams_to_patch_labels": "aream_fast.pseudo_labels.labels",
    # data and metrics
    "build_dataset": "aream_fast.data",
    "ensure_synthetic": "aream_fast.data",
    "ThresholdSweep": "aream_fast.evaluation.metrics",
    "multilabel_map": "aream_fast.evaluation.metrics",
    # over-smoothing diagnostics and entropy layer weights
    "entropy_to_layer_weights": "aream_fast.analysis.entropy",
    "layer_entropies": "aream_fast.analysis.entropy",
    "layer_affinity_diagnostics": "aream_fast.analysis.diagnostics",
    # Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1)
    "flash_attention": "aream_fast.kernels.flash_attention",
    "attention_apply_triton": "aream_fast.kernels.flash_attention",
    "class_attention_from_lse": "aream_fast.kernels.flash_attention",
    "aream_loss_triton": "aream_fast.kernels.aream_loss",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aream_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
