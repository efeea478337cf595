"""CAM seed files: the official ``np.save(path, {"key": int64 (k,), "cam": float32 (k, H, W)})`` layout
(docs/semantics.md, "CAM seeds"), written by ``scripts/make_cams.py`` and read by evaluation and stage two.
``key`` holds the present foreground class indices (0-based, background excluded); ``cam`` their maps at the
image's native size, min-max normalised to [0, 1].
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import numpy as np
from torch import Tensor


def save_cam_npy(path: Union[str, os.PathLike], keys, cam) -> None:
    """Write the official seed file: ``np.save(path, {"key": int64 (k,), "cam": float32 (k, H, W)})``."""
    keys = np.asarray(keys.cpu() if isinstance(keys, Tensor) else keys).astype(np.int64)
    cam = np.asarray(cam.cpu() if isinstance(cam, Tensor) else cam).astype(np.float32)
    if keys.ndim != 1 or cam.ndim != 3 or cam.shape[0] != keys.shape[0]:
        raise ValueError(f"keys must be (k,) and cam (k, H, W) with the same k, got {keys.shape} and {cam.shape}")
    np.save(path, {"key": keys, "cam": cam})


def load_cam_npy(path: Union[str, os.PathLike], num_classes: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Read a seed file; returns (keys int64 (k,), cam float32 (k, H, W)).

    With ``num_classes`` (foreground classes) the keys must lie in [0, num_classes), and a (K, H, W) ``cam``
    holding every class is accepted too (the key rows are taken). A missing file is ``FileNotFoundError``; an
    unreadable file, a wrong layout or non-finite values are ``ValueError`` naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CAM file not found: {path}")
    try:
        obj = np.load(path, allow_pickle=True)
        obj = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read CAM file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict) or "key" not in obj or "cam" not in obj:
        raise ValueError(f"CAM file {path} must hold a dict with 'key' and 'cam', got {type(obj).__name__}"
                         + (f" with keys {sorted(obj)}" if isinstance(obj, dict) else ""))
    keys = np.asarray(obj["key"]).reshape(-1).astype(np.int64)
    cams = np.asarray(obj["cam"], dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"CAM file {path}: 'cam' must be (k, H, W), got shape {cams.shape}")
    if num_classes is not None and keys.size and (keys.min() < 0 or keys.max() >= num_classes):
        raise ValueError(f"CAM file {path}: keys {keys.tolist()} outside [0, {num_classes})")
    if cams.shape[0] != keys.size:
        if num_classes is not None and cams.shape[0] == num_classes:
            cams = cams[keys]
        else:
            raise ValueError(f"CAM file {path}: 'cam' has {cams.shape[0]} maps for {keys.size} keys")
    if not np.isfinite(cams).all():
        raise ValueError(f"CAM file {path}: 'cam' holds NaN or infinite values")
    return keys, cams
