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
        self.rows_written = 0  # metrics rows in metrics.jsonl (earlier invocations included)
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._text = open(os.path.join(run_dir, "train.log"), "a", buffering=1)
        self._jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        self._csv_path = os.path.join(run_dir, "metrics.csv")
        self._rewrite(read_metrics(self._jsonl_path))  # a torn last line (SIGKILL mid-write) is dropped
        self._jsonl = open(self._jsonl_path, "a", buffering=1)
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is an optional extra
                self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"))
            except ImportError as exc:
                self.info(f"TensorBoard not installed ({exc.__class__.__name__}: {exc}); logging to CSV/JSONL only")

    def _rewrite(self, rows: List[Dict[str, Any]]) -> None:
        """metrics.jsonl := ``rows``; metrics.csv := the same rows (union of their columns), both atomically."""
        with open(self._jsonl_path + ".tmp", "w") as fh:
            fh.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        os.replace(self._jsonl_path + ".tmp", self._jsonl_path)
        fields: List[str] = []
        for row in rows:
            fields += [k for k in row if k not in fields]
        self._write_csv(fields, rows)
        self.rows_written = len(rows)

    def _write_csv(self, fields: List[str], rows: List[Dict[str, Any]]) -> None:
        with open(self._csv_path + ".tmp", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(self._csv_path + ".tmp", self._csv_path)
        self._csv_fields = fields or None

    def rewind(self, rows: Optional[int], *, after_step: Optional[int] = None) -> int:
        """Resume: keep the first ``rows`` metrics rows (what the checkpoint being resumed had logged), so the
        steps re-run after it are logged exactly once. ``rows`` None (checkpoints written before the count was
        stored): keep the rows whose ``step`` is <= ``after_step``. Returns the number of rows dropped."""
        if not self.enabled:
            return 0
        self._jsonl.close()
        kept = read_metrics(self._jsonl_path)
        before = len(kept)
        if rows is not None:
            kept = kept[:rows]
        elif after_step is not None:
            kept = [r for r in kept if not isinstance(r.get("step"), int) or r["step"] <= after_step]
        self._rewrite(kept)
        self._jsonl = open(self._jsonl_path, "a", buffering=1)
        return before - len(kept)

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
        self.rows_written += 1
        # CSV: one file with the union of columns seen so far; rewritten (small) when a new column appears
        if self._csv_fields is None or any(k not in self._csv_fields for k in row):
            rows = read_metrics(self._jsonl_path)[:-1]
            fields = list(self._csv_fields or [])
            self._write_csv(fields + [k for k in row if k not in fields], rows)
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


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` ([] when it does not exist); a torn last line is dropped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the line a kill interrupted, and nothing after it
    return rows


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # an optional package that is absent or broken is reported as None
        return None


def write_manifest(run_dir: str, config: Dict[str, Any], *, device: torch.device, world_size: int,
                   precision: str, precision_reason: str, extra: Optional[Dict[str, Any]] = None) -> str:
    """``manifest.json``: config, package versions, device, seed, command line, start time.

    A resumed run keeps the history: ``invocations`` lists every invocation (command, start time, host, the
    checkpoint it resumed from, thread count), oldest first; ``command`` / ``started_utc`` stay those of the first
    invocation, everything else describes the latest."""
    path = os.path.join(run_dir, "manifest.json")
    now = _dt.datetime.now(_dt.timezone.utc).isoformat()
    invocation = {"command": sys.argv, "started_utc": now, "host": socket.gethostname(),
                  "resumed_from": (extra or {}).get("resumed_from"), "torch_threads": torch.get_num_threads(),
                  "device": str(device), "world_size": world_size, "precision": precision}
    history: List[Dict[str, Any]] = []
    if os.path.isfile(path):
        try:
            with open(path) as fh:
                previous = json.load(fh)
            history = list(previous.get("invocations") or
                           [{k: previous.get(k) for k in ("command", "started_utc", "host")}])
        except (OSError, ValueError, AttributeError):  # unreadable: keep it beside the new one, say so
            os.replace(path, path + ".unreadable")
            print(f"WARNING: {path} was unreadable; kept as {path}.unreadable", file=sys.stderr)
    history.append(invocation)
    manifest = {
        "config": config,
        "seed": config.get("run", {}).get("seed") if isinstance(config.get("run"), dict) else config.get("seed"),
        "command": history[0].get("command"),
        "started_utc": history[0].get("started_utc"),
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
        "invocations": history,
    }
    if extra:
        manifest.update(extra)
    os.makedirs(run_dir, exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(manifest, fh, indent=2, default=str)
    os.replace(path + ".tmp", path)
    return path
