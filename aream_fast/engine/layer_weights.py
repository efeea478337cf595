"""Entropy layer weights for AReAM's 'E' mode (spec §2 'Layer weighting', §3.1 item 4, §4).

Input: a file of per-layer attention entropies E (one per block, as ``scripts/analyze_layers.py`` writes):
``.npy`` (a 1-D array) or ``.json`` (a list, or a dict with an ``"entropy"`` / ``"entropies"`` list).
e = (E - min E) / (max E - min E) over all layers. Loss weights e_l for the supervised layers
(l >= layer_index), refinement weights 1 - e_l for l < layer_index. Not renormalised (as officially).
"""
from __future__ import annotations

import json
import os
from typing import Tuple

import numpy as np


def load_entropies(path: str) -> np.ndarray:
    """Read per-layer entropies (L,) float64 from .npy or .json; ``ValueError`` naming the file otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--layer-weights file {path!r} does not exist")
    if path.endswith(".npy"):
        values = np.load(path, allow_pickle=False)
    elif path.endswith(".json"):
        with open(path) as fh:
            content = json.load(fh)
        if isinstance(content, dict):
            for key in ("entropy", "entropies", "layer_entropy"):
                if key in content:
                    content = content[key]
                    break
            else:
                raise ValueError(f"--layer-weights JSON {path!r} is a dict without an 'entropy' or 'entropies' "
                                 f"key (keys: {sorted(content)})")
        values = np.asarray(content, dtype=np.float64)
    else:
        raise ValueError(f"--layer-weights must be a .npy or .json file, got {path!r}")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"--layer-weights {path!r} must hold a 1-D vector of per-layer entropies, "
                         f"got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"--layer-weights {path!r} holds non-finite entropies: {values.tolist()}")
    return values


def entropy_layer_weights(entropies: np.ndarray, depth: int, layer_index: int) -> Tuple[Tuple[float, ...],
                                                                                           Tuple[float, ...]]:
    """(loss weights for layers layer_index..depth-1, refinement weights for layers 0..layer_index-1)."""
    entropies = np.asarray(entropies, dtype=np.float64)
    if entropies.shape != (depth,):
        raise ValueError(f"layer entropies must have one value per model block ({depth}), got shape "
                         f"{entropies.shape}")
    span = entropies.max() - entropies.min()
    if span <= 0:
        raise ValueError("layer entropies are all equal: min-max normalisation is undefined")
    e = (entropies - entropies.min()) / span
    loss_weights = tuple(float(v) for v in e[layer_index:])
    refine_weights = tuple(float(1.0 - v) for v in e[:layer_index])
    return loss_weights, refine_weights
