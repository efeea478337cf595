"""Checkpoints that survive interruption: atomic writes, full training state, RNG streams, auto-resume.

A checkpoint is one ``torch.save`` dict::

    {"format": 1, "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "epoch": e, "batch_in_epoch": i, "global_step": t, "best_map": float, "rng": {...},
     "config": TrainConfig.to_dict(), "metrics": {...}}

``epoch`` / ``batch_in_epoch`` is the position of the **next** batch to train: a checkpoint written after the
last batch of epoch e stores (e + 1, 0). The data order of every epoch is a pure function of (seed, epoch),
so resuming re-creates the epoch's order and skips the ``batch_in_epoch`` batches already done.

Writes go to ``<path>.tmp`` then ``os.replace`` (atomic on POSIX), so a kill during saving never leaves a
truncated ``checkpoint.pth``.
"""
from __future__ import annotations

import glob
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pth"
BEST_NAME = "checkpoint_best.pth"
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


def find_resume_checkpoint(run_dir: Optional[str], runs_root: str, run_name: str) -> Optional[str]:
    """``--resume auto``: ``<run_dir>/checkpoint.pth`` if a run dir is given, else the newest
    ``<runs_root>/<run_name>/*/checkpoint.pth`` (by modification time). None if nothing is found."""
    if run_dir is not None:
        path = os.path.join(run_dir, CHECKPOINT_NAME)
        return path if os.path.isfile(path) else None
    candidates = glob.glob(os.path.join(runs_root, run_name, "*", CHECKPOINT_NAME))
    if not candidates:
        return None
    return max(candidates, key=os.path.getmtime)
