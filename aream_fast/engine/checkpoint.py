"""Checkpoints that survive interruption: atomic writes, full training state, RNG streams, auto-resume.

A checkpoint is one ``torch.save`` dict::

    {"format": 1, "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "epoch": e, "batch_in_epoch": i, "global_step": t, "best_map": float, "rng": {...},
     "config": TrainConfig.to_dict(), "metrics": {...}}

``epoch`` / ``batch_in_epoch`` is the position of the **next** batch to train: a checkpoint written after the
last batch of epoch e stores (e + 1, 0). The data order of every epoch is a pure function of (seed, epoch),
so resuming re-creates the epoch's order and skips the ``batch_in_epoch`` batches already done.

Writes go to ``<path>.tmp`` then ``os.replace`` (atomic on POSIX), so a kill during saving never leaves a
truncated ``checkpoint.pth``. The previous ``checkpoint.pth`` is kept as ``checkpoint_prev.pth``
(:func:`rotate_save`): when the newest does not load (a disk error, a file truncated by a copy), resuming falls
back to the previous one and says which was skipped and why (:func:`load_first_good`).
"""
from __future__ import annotations

import glob
import os
import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pth"
BEST_NAME = "checkpoint_best.pth"
PREVIOUS_NAME = "checkpoint_prev.pth"
FORMAT_VERSION = 1


def capture_rng_state() -> Dict[str, Any]:
    """The python, numpy, torch CPU (and CUDA, when initialised) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path + '.tmp'``, fsync, then ``os.replace`` onto ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rotate_save(obj: Any, path: str, previous: str) -> None:
    """:func:`atomic_save` to ``path``, the file it replaces kept as ``previous`` (the last two good ones)."""
    tmp = f"{path}.new"
    atomic_save(obj, tmp)
    if os.path.isfile(path):
        os.replace(path, previous)
    os.replace(tmp, path)


def load_first_good(paths: List[str], map_location: Any = "cpu"
                    ) -> Tuple[Optional[str], Optional[Dict[str, Any]], List[Tuple[str, str]]]:
    """The first of ``paths`` that loads: (path, checkpoint, [(skipped path, why), ...]); (None, None, skipped)
    when none does. Missing files are not reported as skipped."""
    skipped: List[Tuple[str, str]] = []
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            return path, load_checkpoint(path, map_location=map_location), skipped
        except (RuntimeError, ValueError) as exc:
            skipped.append((path, str(exc)))
    return None, None, skipped


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save`; clear errors for a missing or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        # our checkpoints hold numpy / python RNG state (not plain tensors), so weights_only=False;
        # only load checkpoints you wrote
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # re-raised with the path: a truncated or non-torch file
        raise RuntimeError(f"could not read checkpoint {path!r}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION or "model" not in ckpt:
        raise ValueError(f"{path!r} is not an aream-fast training checkpoint (format {FORMAT_VERSION})")
    return ckpt


def resume_candidates(run_dir: str) -> List[str]:
    """The checkpoints of a run folder to resume from, best first: ``checkpoint.pth``, ``checkpoint_prev.pth``
    (and a ``checkpoint.pth.new`` left complete by a kill between the two renames of :func:`rotate_save`)."""
    names = (CHECKPOINT_NAME, f"{CHECKPOINT_NAME}.new", PREVIOUS_NAME)
    return [os.path.join(run_dir, n) for n in names if os.path.isfile(os.path.join(run_dir, n))]


def run_is_finished(run_dir: str) -> bool:
    """True when ``summary.json`` says the run finished (its CAMs were written): nothing to resume."""
    import json

    try:
        with open(os.path.join(run_dir, "summary.json")) as fh:
            return json.load(fh).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        return False


def find_run_dirs(runs_root: str, run_name: str) -> List[str]:
    """``--resume auto`` without ``--run-dir``: the unfinished run folders ``<runs_root>/<run_name>/*`` holding a
    checkpoint, newest first (by the newest checkpoint's modification time)."""
    dirs = [d for d in glob.glob(os.path.join(runs_root, run_name, "*")) if os.path.isdir(d)]
    dirs = [d for d in dirs if resume_candidates(d) and not run_is_finished(d)]
    return sorted(dirs, key=lambda d: max(os.path.getmtime(p) for p in resume_candidates(d)), reverse=True)


def find_resume_checkpoint(run_dir: Optional[str], runs_root: str, run_name: str) -> Optional[str]:
    """The newest checkpoint of ``run_dir`` or of the newest unfinished run of ``run_name``; None if none."""
    if run_dir is None:
        dirs = find_run_dirs(runs_root, run_name)
        run_dir = dirs[0] if dirs else None
    candidates = resume_candidates(run_dir) if run_dir is not None else []
    return candidates[0] if candidates else None
