"""CAM seeds -> pseudo masks (PNG, VOC palette), and their score on the train split.

One image (``pseudo_mask``): the seeds ``{"key" (k,), "cam" (k, H, W)}`` (``aream_fast.save_cam_npy``) get a
background plane (constant threshold t, or (1 - max_k cam_k)^α), then optionally

* a random walk on the ViT's own patch affinity (``aream_fast.stage2.random_walk``, a named preset),
* a dense CRF with a named preset (``aream_fast.stage2.dense_crf``) over the k + 1 present labels, as the
  official CAM CRF (Jessie459/AReAM ``infer_crf.py``; docs/semantics.md, Stage two) does,

and the argmax gives ids 0 (background) and key + 1. With ``ignore=True`` the official low / high-α rule of
``main_psa.sh`` replaces the constant background: the same chain runs with bg = (1 - max)^1 ("la") and
(1 - max)^12 ("ha"); pixels where the two labels agree keep that label, the others become 255 (ignored by the
trainers and the scoring). PSA's own rule (``infer_aff`` training labels) differs only where la says foreground
and ha a different foreground class (PSA keeps la there).

Ground truth is never read here while masks are made: only the CAM files, the images (for the CRF and the
ViT affinity) and the split's image-level label file (to tell an image without labels, which has no CAM file,
from a missing CAM). ``score_pseudo_masks`` reads the ground truth afterwards, with the confusion-matrix code of
the CAM evaluation (``aream_fast.evaluation.metrics``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from aream_fast.stage2.random_walk import background_plane, propagate, rw_params, transition_matrix

IGNORE_ALPHAS = (1.0, 12.0)  # official main_psa.sh: infer_crf.py --alpha 1 ("la") and --alpha 12 ("ha")
IGNORE_INDEX = 255
GT_FOLDER_NAMES = ("SegmentationClass", "SegmentationClassAug")


def _crf(image: np.ndarray, probs: Sequence[torch.Tensor], preset: str, iterations: int) -> List[torch.Tensor]:
    """The CRF of every (k+1, H, W) score stack of one image (one bilateral lattice for all of them)."""
    from aream_fast.stage2 import dense_crf  # lazy: the CRF is only needed when asked for

    # the [bg; cams] scores are not normalised over the labels (official CAM CRF; docs/semantics.md, Stage two)
    return [torch.as_tensor(q) for q in dense_crf([image] * len(probs), list(probs), preset=preset,
                                                    iterations=iterations, normalized=False)]


def pseudo_mask(keys, cams, *, bg_threshold: Optional[float] = None, image: Optional[np.ndarray] = None,
                crf: Optional[str] = None, crf_iterations: int = 10, random_walk: Optional[str] = None,
                affinity: Optional[torch.Tensor] = None, patch_size: Optional[int] = None,
                rw_overrides: Optional[Dict[str, Any]] = None, ignore: bool = False) -> np.ndarray:
    """Pseudo mask of one image: (H, W) uint8, 0 background, key + 1 for class key, 255 ignored.

    keys (k,) int class indices; cams (k, H, W) float in [0, 1]. bg_threshold: the constant background score
    (required unless ``ignore``; with a random walk it replaces the preset's background, except for a preset
    whose background is a power and unless ``rw_overrides`` sets one). image (H, W, 3) uint8: needed by the CRF.
    crf: a ``CRF_PRESETS`` name or None. random_walk: a ``RW_PRESETS`` name or None; then ``affinity`` (P, P)
    on the patch grid of ``patch_size`` is required. ignore: the official la / ha rule (module docstring).
    """
    keys = np.asarray(keys).astype(np.int64).reshape(-1)
    cam_t = torch.as_tensor(np.asarray(cams, dtype=np.float32))
    if cam_t.dim() != 3 or cam_t.shape[0] != keys.size:
        raise ValueError(f"cams must be (k, H, W) with k = len(keys) = {keys.size}, got {tuple(cam_t.shape)}")
    if not torch.isfinite(cam_t).all():
        raise ValueError("cams hold NaN or infinite values")
    hh, ww = cam_t.shape[1:]
    if crf is not None:
        if image is None or np.asarray(image).shape != (hh, ww, 3) or np.asarray(image).dtype != np.uint8:
            raise ValueError(f"the CRF needs image as an ({hh}, {ww}, 3) uint8 array, got "
                             f"{None if image is None else (np.asarray(image).shape, np.asarray(image).dtype)}")
    if not ignore and bg_threshold is None:
        raise ValueError("bg_threshold is required (unless ignore=True, which uses the la / ha alphas)")
    if keys.size == 0:
        return np.zeros((hh, ww), dtype=np.uint8)
    if ignore:
        planes = [background_plane(cam_t, power=a) for a in IGNORE_ALPHAS]
    else:
        planes = [None]
    trans = params = None
    if random_walk is not None:
        overrides = dict(rw_overrides or {})
        if not ignore and overrides.get("bg_power") is None and overrides.get("bg_threshold") is None:
            if rw_params(random_walk).bg_threshold is not None:
                overrides["bg_threshold"] = bg_threshold  # the seeds' threshold replaces the preset's constant
        params = rw_params(random_walk, **overrides)
        if affinity is None or patch_size is None:
            raise ValueError("a random walk needs the patch affinity and its patch_size")
        grid = (-(-hh // patch_size), -(-ww // patch_size))
        trans = transition_matrix(affinity, grid, beta=params.beta, radius=params.radius)
    # every background plane's [bg; cams] stack goes through the same chain; the RW propagates them at once
    stacks = []
    for bg in planes:
        if bg is None:
            bg = (background_plane(cam_t, threshold=params.bg_threshold, power=params.bg_power)
                  if params is not None else background_plane(cam_t, threshold=bg_threshold))
        stacks.append(torch.cat([bg[None], cam_t], dim=0))
    scores = torch.cat(stacks, dim=0)
    if trans is not None:
        scores = propagate(scores, trans, params.t, patch_size=patch_size)
    ids = np.concatenate([[0], keys + 1]).astype(np.uint8)
    stacks = list(scores.split(keys.size + 1))
    if crf is not None:
        stacks = _crf(image, stacks, crf, crf_iterations)
    labels = [ids[s.argmax(0).cpu().numpy()] for s in stacks]
    if not ignore:
        return labels[0]
    low, high = labels
    return np.where(low == high, low, IGNORE_INDEX).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# folders and the split
def gt_folders(root: Path, mask_dir: Optional[Path] = None) -> List[Path]:
    """The ground-truth folders of a dataset root (SegmentationClass, SegmentationClassAug, ``mask_dir``)."""
    out = [Path(root) / n for n in GT_FOLDER_NAMES]
    if mask_dir is not None:
        out.append(Path(mask_dir))
    return out


def refuse_gt_folder(path: Path, gt_dirs: Sequence[Path], what: str, action: str,
                     kind: str = "ground-truth folder") -> None:
    """ValueError when ``path`` is, or lies inside, one of ``gt_dirs`` (symlinks resolved). ``what`` names the
    folder in the message ("CAM folder"), ``action`` what was refused ("read CAMs from"), ``kind`` the folders
    refused ("image folder")."""
    real = Path(os.path.realpath(path))
    for g in gt_dirs:
        g_real = Path(os.path.realpath(g))
        if real == g_real or g_real in real.parents:
            raise ValueError(f"{what} {path} is (or is inside) the {kind} {g}; refusing to {action} it")


def best_threshold_from(cam_dir: Path, split: str) -> Tuple[float, str]:
    """The best background threshold of the CAM evaluation sweep: ``cam_eval.json`` (``make_cams.py --eval``,
    key "threshold") or ``eval_<split>.json`` (``scripts/evaluate.py``, key "best_threshold") in ``cam_dir``.
    Returns (threshold, the file it came from)."""
    import json

    for name, key in (("cam_eval.json", "threshold"), (f"eval_{Path(split).stem}.json", "best_threshold")):
        path = Path(cam_dir) / name
        if path.is_file():
            try:
                value = json.loads(path.read_text())[key]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"cannot read the best threshold ({key!r}) from {path}: {e}") from e
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{path}: {key!r} must be a threshold in [0, 1], got {value!r}")
            return float(value), str(path)
    raise FileNotFoundError(f"no CAM evaluation in {cam_dir} (cam_eval.json or eval_{Path(split).stem}.json) to "
                            f"take the best background threshold from: run scripts/evaluate.py --cam-dir "
                            f"{cam_dir} first, or pass --bg-threshold")


def write_pseudo_masks(files, cam_dir: Path, out_dir: Path, *, bg_threshold: Optional[float],
                       crf: Optional[str] = None, crf_iterations: int = 10, random_walk: Optional[str] = None,
                       rw_overrides: Optional[Dict[str, Any]] = None,
                       affinity_fn: Optional[Callable[[np.ndarray], torch.Tensor]] = None,
                       patch_size: Optional[int] = None, ignore: bool = False, progress: bool = True) -> int:
    """Write ``<out_dir>/<name>.png`` for every image of ``files`` (``aream_fast.data.layout.SplitFiles`` with
    image-level ``labels``, no masks needed). ``affinity_fn(image uint8 (H, W, 3)) -> (P, P)`` gives the patch
    affinity for the random walk. A missing CAM of an image with labels and a CAM whose size differs from its
    image raise errors naming the file (CAM files of images outside the split are not read). Returns the count."""
    from tqdm import tqdm

    from aream_fast import load_cam_npy
    from aream_fast.data.image_io import image_size, read_image, write_mask

    cam_dir, out_dir = Path(cam_dir), Path(out_dir)
    if not cam_dir.is_dir():
        raise FileNotFoundError(f"CAM folder {cam_dir} does not exist")
    if files.labels is None:
        raise ValueError("the split needs image-level labels (cls_labels.npy) to tell images without labels from "
                         "missing CAM files")
    out_dir.mkdir(parents=True, exist_ok=True)
    need_image = crf is not None or random_walk is not None
    for name, image_path in tqdm(list(zip(files.names, files.image_paths)), desc=f"pseudo masks -> {out_dir}",
                                 disable=not progress, dynamic_ncols=True):
        cam_path = cam_dir / f"{name}.npy"
        image = read_image(image_path) if need_image else None
        size = image.shape[:2] if image is not None else image_size(image_path)
        if cam_path.is_file():
            try:
                keys, cams = load_cam_npy(cam_path)
            except Exception as e:  # noqa: BLE001 - a corrupt file: re-raised naming it
                raise ValueError(f"cannot read CAM file {cam_path}: {type(e).__name__}: {e}") from e
            if cams.shape[0] != keys.size:
                raise ValueError(f"CAM file {cam_path}: 'cam' has {cams.shape[0]} maps for {keys.size} keys")
            if tuple(cams.shape[1:]) != tuple(size):
                raise ValueError(f"CAM file {cam_path} has size {tuple(cams.shape[1:])}, but its image {image_path} "
                                 f"has size {tuple(size)}")
        elif files.labels[name].any():
            raise FileNotFoundError(f"CAM file missing for image {image_path}: expected {cam_path}")
        else:  # no class label: the official CAM writer writes no file; all background
            keys, cams = np.zeros(0, np.int64), np.zeros((0,) + tuple(size), np.float32)
        affinity = affinity_fn(image) if random_walk is not None and keys.size else None
        mask = pseudo_mask(keys, cams, bg_threshold=bg_threshold, image=image, crf=crf,
                           crf_iterations=crf_iterations, random_walk=random_walk, affinity=affinity,
                           patch_size=patch_size, rw_overrides=rw_overrides, ignore=ignore)
        write_mask(out_dir / f"{name}.png", mask)
        del affinity  # never two images' P x P affinities at once (the next one is built in the next iteration)
    return len(files.names)


def score_pseudo_masks(mask_dir: Path, gt_files) -> Dict[str, Any]:
    """mIoU of ``<mask_dir>/<name>.png`` against ``gt_files`` (SplitFiles with masks), with the CAM evaluation's
    confusion matrix (255 predictions count as misses of the GT class; GT 255 is skipped). Returns
    {"miou", "per_class_iou" (C,), "ignored_fraction" (share of predicted pixels that are 255), "num_images"}."""
    from tqdm import tqdm

    from aream_fast.data.classes import num_classes
    from aream_fast.data.image_io import read_mask
    from aream_fast.evaluation.metrics import confusion_matrix, iou_from_confusion

    num = num_classes(gt_files.dataset) + 1
    cm = np.zeros((num, num + 1), dtype=np.int64)
    ignored = total = 0
    for name, gt_path in tqdm(list(zip(gt_files.names, gt_files.mask_paths)), desc="scoring pseudo masks",
                              leave=False, dynamic_ncols=True):
        pred_path = Path(mask_dir) / f"{name}.png"
        pred, gt = read_mask(pred_path), read_mask(gt_path)
        if pred.shape != gt.shape:
            raise ValueError(f"pseudo mask {pred_path} has size {pred.shape}, ground truth {gt_path} {gt.shape}")
        cm += confusion_matrix(pred, gt, num)
        ignored += int((pred == IGNORE_INDEX).sum())
        total += pred.size
    iou = iou_from_confusion(cm)
    return {"miou": float(iou.mean()), "per_class_iou": iou.tolist(), "ignored_fraction": ignored / max(total, 1),
            "num_images": len(gt_files.names)}

