"""Mixed-precision choice for ``--amp``.

* CUDA: bf16 autocast where the GPU supports it (no loss scaling needed), else fp16 autocast + GradScaler.
* CPU: bf16 autocast is only worth it where the CPU has fast bf16 matmuls. On CPUs without native bf16
  units it is several times slower than fp32 (and at small widths the autocast casts can dominate), so we
  **measure**: a few interleaved forward+backward passes of the real model (or, without a model, of a
  transformer-MLP-sized layer) in fp32 and in bf16 autocast, and use bf16 only if it is at least 20 % faster.
  The decision and both timings are returned as a human-readable ``reason`` that the trainer logs and the run
  manifest stores. (On the AVX512-BF16 CPU this was developed on, bf16 autocast measured ~1.8x faster for
  the demo model, so ``--amp`` picks bf16 there; on CPUs without bf16 units it picks fp32.)
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class Precision:
    """autocast dtype (None = fp32, no autocast), whether a GradScaler is needed, and why."""

    dtype: Optional[torch.dtype]
    use_scaler: bool
    reason: str

    @property
    def name(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).replace("torch.", "")

    def autocast(self, device: torch.device):
        """Context manager: autocast to ``dtype`` on ``device``, or a no-op for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def make_scaler(self, device: torch.device) -> Optional["torch.amp.GradScaler"]:
        return torch.amp.GradScaler(device.type) if self.use_scaler else None


def _time_once(layer: nn.Module, x: torch.Tensor, dtype: Optional[torch.dtype]) -> float:
    ctx = contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)
    t0 = time.perf_counter()
    with ctx:
        y = layer(x)
    y.float().sum().backward()
    return time.perf_counter() - t0


def measure_cpu_bf16(width: int = 192, tokens: int = 512, repeats: int = 5) -> tuple:
    """Seconds per forward+backward of Linear(width, 4*width) -> GELU -> Linear(4*width, width) on (tokens,
    width), in fp32 and in bf16 autocast: the best of ``repeats`` interleaved runs each (interleaving keeps
    a busy machine from favouring one side). Returns (fp32_s, bf16_s). ~0.1-0.5 s; leaves the RNG untouched."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        x = torch.randn(tokens, width, requires_grad=True)
        _time_once(layer, x, None), _time_once(layer, x, torch.bfloat16)  # warm-up
        fp32 = bf16 = float("inf")
        for _ in range(repeats):
            fp32 = min(fp32, _time_once(layer, x, None))
            bf16 = min(bf16, _time_once(layer, x, torch.bfloat16))
    finally:
        torch.random.set_rng_state(gen_state)  # the measurement must not shift the training RNG stream
    return fp32, bf16


def measure_model_step(model: nn.Module, image_size: int, batch: int = 4, repeats: int = 5,
                       request=None, objective: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None
                       ) -> tuple:
    """(fp32_s, bf16_s): forward+backward of ``model`` itself on a (batch, 3, S, S) CPU input, in fp32 and in
    bf16 autocast, ``repeats`` interleaved pairs. Returned: the median fp32 time and the median fp32 time times
    the median per-pair bf16/fp32 ratio (pairs run back to back see the same machine load, so the ratio is
    robust on a shared machine). Gradients are cleared afterwards and the RNG is untouched (DropPath draws
    happen inside ``fork_rng``); the parameters do not change. ``objective(model, x)`` -> the scalar that is
    back-propagated (default: a stage-one model's class + patch logits summed); callers restore buffers
    (BatchNorm statistics) themselves when the model has any (``aream_fast.engine.optim.preserve_buffers``)."""
    def once(dtype: Optional[torch.dtype]) -> float:
        ctx = contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)
        t0 = time.perf_counter()
        with ctx:
            if objective is None:
                out = model(x, request)
                value = out.class_logits.float().sum() + out.patch_logits.float().sum()
            else:
                value = objective(model, x)
        value.backward()
        return time.perf_counter() - t0

    with torch.random.fork_rng(devices=[]):
        x = torch.randn(batch, 3, image_size, image_size)
        once(None), once(torch.bfloat16)  # warm-up
        fp32, ratios = [], []
        for _ in range(repeats):
            a = once(None)
            b = once(torch.bfloat16)
            fp32.append(a)
            ratios.append(b / a)
    for p in model.parameters():
        p.grad = None
    fp32_med = float(sorted(fp32)[len(fp32) // 2])
    return fp32_med, fp32_med * float(sorted(ratios)[len(ratios) // 2])


def choose_precision(device: torch.device, amp: bool, *, width: int = 192,
                     probe: Optional[Callable[[], tuple]] = None, cpu_mode: str = "measure") -> Precision:
    """Pick the training precision for ``--amp`` on ``device`` (see module docstring).

    cpu_mode: "measure" (default), or "bf16" / "fp32" to force the CPU choice (``--cpu-amp``).
    probe: on CPU, a zero-argument callable returning (fp32_s, bf16_s) for one real training forward+backward
    (the trainer passes :func:`measure_model_step` on its model); default: the MLP micro-benchmark.
    """
    if not amp:
        return Precision(None, False, "--amp not given: fp32")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, False, "CUDA with bf16 support: bf16 autocast, no loss scaling")
        return Precision(torch.float16, True, "CUDA without bf16: fp16 autocast + GradScaler")
    if device.type == "cpu":
        if cpu_mode == "bf16":
            return Precision(torch.bfloat16, False, "CPU: bf16 autocast forced by --cpu-amp bf16")
        if cpu_mode == "fp32":
            return Precision(None, False, "CPU: fp32 forced by --cpu-amp fp32")
        if cpu_mode != "measure":
            raise ValueError(f"cpu_mode must be 'measure', 'bf16' or 'fp32', got {cpu_mode!r}")
        if probe is not None:
            fp32_s, bf16_s = probe()
            what = "model forward+backward"
        else:
            fp32_s, bf16_s = measure_cpu_bf16(width=width)
            what = f"MLP(width {width}) forward+backward"
        timing = f"measured {what}: fp32 {fp32_s * 1e3:.1f} ms, bf16 autocast {bf16_s * 1e3:.1f} ms"
        if bf16_s < 0.8 * fp32_s:
            return Precision(torch.bfloat16, False, f"CPU: bf16 autocast chosen ({timing})")
        return Precision(None, False, f"CPU: fp32 chosen, bf16 autocast is not >= 20 % faster here ({timing})")
    return Precision(None, False, f"--amp ignored on device type {device.type!r}: fp32")


def precision_from_name(name: str, device: torch.device, reason: str) -> Precision:
    """Rebuild a :class:`Precision` from its ``name`` (as stored in a checkpoint) for ``device``."""
    if name == "fp32":
        return Precision(None, False, reason)
    if name in ("bfloat16", "float16"):
        dtype = getattr(torch, name)
        return Precision(dtype, dtype == torch.float16 and device.type == "cuda", reason)
    raise ValueError(f"unknown precision name {name!r} (expected fp32, bfloat16 or float16)")
