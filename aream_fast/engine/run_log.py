"""Run-directory logging: metrics to ``metrics.csv`` + ``metrics.jsonl`` (+ TensorBoard when installed), a
text log ``train.log``, and the run manifest ``manifest.json`` (config, versions, device, seed, command line).

Only rank 0 writes; other ranks get a logger whose methods do nothing but print errors.
TensorBoard is imported lazily; its absence is logged once and is not an error.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import socket
import sys
from typing import Any, Dict, List, Optional

import numpy as np
import torch


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


class RunLogger:
    """Writes one record per :meth:`log_metrics` call to CSV and JSONL; mirrors :meth:`info` to train.log."""

    def __init__(self, run_dir: str, *, enabled: bool = True, use_tensorboard: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled
        self._csv_fields: Optional[List[str]] = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._text = open(os.path.join(run_dir, "train.log"), "a", buffering=1)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        self._csv_path = os.path.join(run_dir, "metrics.csv")
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is an optional extra
                self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"))
            except ImportError as exc:
                self.info(f"TensorBoard not installed ({exc.__class__.__name__}: {exc}); logging to CSV/JSONL only")

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        stamp = _dt.datetime.now().strftime("%H:%M:%S")
        line = f"[{stamp}] {message}"
        # tqdm.write keeps progress bars intact
        try:
            from tqdm import tqdm
            tqdm.write(line, file=sys.stdout)
        except ImportError:
            print(line, flush=True)
        self._text.write(line + "\n")

    def log_metrics(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        """One row: any flat mapping of scalars; ``step`` (global step) goes to TensorBoard's x axis."""
        if not self.enabled:
            return
        row = {k: _jsonable(v) for k, v in record.items()}
        self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
        # CSV: one file with the union of columns seen so far; rewritten (small) when a new column appears
        fields = list(self._csv_fields or [])
        new = [k for k in row if k not in fields]
        if new or self._csv_fields is None:
            fields += new
            rows = []
            if os.path.exists(self._csv_path) and self._csv_fields is not None:
                with open(self._csv_path, newline="") as fh:
                    rows = list(csv.DictReader(fh))
            with open(self._csv_path + ".tmp", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(self._csv_path + ".tmp", self._csv_path)
            self._csv_fields = fields
        with open(self._csv_path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self._csv_fields).writerow(row)
        if self._tb is not None and step is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._text.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # an optional package that is absent or broken is reported as None
        return None


def write_manifest(run_dir: str, config: Dict[str, Any], *, device: torch.device, world_size: int,
                   precision: str, precision_reason: str, extra: Optional[Dict[str, Any]] = None) -> str:
    """``manifest.json``: config, package versions, device, seed, command line, start time."""
    manifest = {
        "config": config,
        "seed": config.get("run", {}).get("seed") if isinstance(config.get("run"), dict) else config.get("seed"),
        "command": sys.argv,
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {name: _version(name) for name in ("torch", "timm", "numpy", "triton", "PIL", "aream_fast")},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "world_size": world_size,
        "precision": precision,
        "precision_reason": precision_reason,
    }
    if extra:
        manifest.update(extra)
    path = os.path.join(run_dir, "manifest.json")
    os.makedirs(run_dir, exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(manifest, fh, indent=2, default=str)
    os.replace(path + ".tmp", path)
    return path
