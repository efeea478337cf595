"""Peak memory of one benchmark case, measured in a fresh subprocess (helper for benchmarks/test_bench_*.py).

A process's peak RSS only grows, so the peak of one case cannot be read inside a pytest process that already
ran other cases. ``step_peak_memory`` runs the case through ``benchmarks/profile_memory.py``'s child mode (one
fresh process per case: CPU peak RSS above the post-build RSS, CUDA ``max_memory_allocated`` above the
post-build allocation; out-of-memory and timeouts come back as a status, not an exception).
"""
from __future__ import annotations

import os
import platform
from typing import Dict, Optional, Sequence



def profile_module():
    """``benchmarks/profile_memory.py`` (the profiler; a script and a module)."""
    from benchmarks import profile_memory

    return profile_memory


def machine_info() -> Dict[str, str]:
    """Device, CPU model, nproc, torch and triton versions (for extra_info and the benchmark JSON)."""
    import torch

    prof = profile_module()
    info = {
        "cpu_model": prof.cpu_model(),
        "nproc": str(os.cpu_count()),
        "torch": torch.__version__,
        "triton": prof.package_version("triton"),
        "python": platform.python_version(),
    }
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({info['cpu_model']})"
    return info


def start_benchmark(benchmark, group: str, **fields) -> Dict[str, object]:
    """Name a pytest-benchmark ``group`` and record the machine (:func:`machine_info`) and ``fields`` in its
    ``extra_info``, which is returned for the measurements that follow."""
    benchmark.group = group
    info = benchmark.extra_info
    info.update(machine_info())
    info.update(fields)
    return info


def step_peak_memory(mode: str, *, size: int, batch: int, model: str = "mct_deit_small", num_classes: int = 20,
                     supervised_layers: Sequence[int] = (7, 8, 9, 10, 11), steps: int = 1, warmup: int = 1,
                     device: str = "auto", mem_limit_gb: float = 12.0, timeout: float = 600.0,
                     model_kwargs: Optional[str] = None) -> Dict[str, object]:
    """Peak memory (MiB) of ``warmup + steps`` full training steps of ``mode`` in a fresh subprocess.

    Returns {"status": ok|oom|timeout|error, "note": str} and, when ok: "peak_mem_mib" (CPU: peak RSS above the
    post-build RSS, optimizer state included; CUDA: max_memory_allocated above the post-build allocation),
    "step_peak_mib" (one steady-state step's peak above its start: CPU live tensors from torch.profiler,
    CUDA max_memory_allocated; needs ``warmup`` >= 1), "step_time_s" (first timed step).
    """
    prof = profile_module()
    argv = ["--sizes", str(size), "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
            "--model", model, "--num-classes", str(num_classes), "--device", device,
            "--mem-limit-gb", str(mem_limit_gb), "--timeout", str(timeout),
            "--supervised-layers", *[str(l) for l in supervised_layers]]
    if model_kwargs:
        argv += ["--model-kwargs", model_kwargs]
    args = prof.parse_args(argv)
    res = prof.run_case(mode, size, args)
    out = {"status": res["status"], "note": res.get("note", "")}
    if res["status"] == prof.STATUS_OK:
        out["peak_mem_mib"] = round(float(res["peak_bytes"]) / (1 << 20), 1)
        if res.get("step_peak_bytes") is not None:
            out["step_peak_mib"] = round(float(res["step_peak_bytes"]) / (1 << 20), 1)
        times = res.get("times") or []
        out["step_time_s"] = round(float(times[0]), 3) if times else None
        out["peak_source"] = res.get("peak_source", "")
    return out


def _spawn_child(builder, kwargs, repeats, queue):  # pragma: no cover - runs in the spawned process
    import gc

    import torch

    try:
        fn = builder(**kwargs)
        gc.collect()
        pid = os.getpid()
        cuda = torch.cuda.is_available() and kwargs.get("device", "cpu").startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (peak RSS) to the current RSS
            base = _status_kib(pid, "VmRSS") * 1024
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _status_kib(pid, "VmHWM") * 1024 - base
        queue.put({"status": "ok", "peak_mem_mib": round(peak / (1 << 20), 1)})
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the benchmark with it
        queue.put({"status": "error", "note": f"{type(exc).__name__}: {exc}"})


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def peak_memory_spawn(builder, kwargs: Dict[str, object], *, repeats: int = 1,
                      timeout: float = 600.0) -> Dict[str, object]:
    """Peak memory (MiB) of ``repeats`` calls of ``builder(**kwargs)()`` in a fresh (spawned) process, above the
    memory in use once ``builder`` returned. ``builder`` must be a module-level function (it is pickled by
    name). Returns {"status": "ok", "peak_mem_mib": float} or {"status": "error" | "timeout", "note": str}."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_spawn_child, args=(builder, kwargs, repeats, q))
    proc.start()
    import time

    deadline = time.monotonic() + timeout
    res = None
    try:
        while res is None:
            try:
                res = q.get(timeout=0.5)
            except queue_mod.Empty:
                if not proc.is_alive():
                    try:
                        res = q.get(timeout=1.0)
                    except queue_mod.Empty:
                        res = {"status": "error", "note": f"child died (exit code {proc.exitcode})"}
                elif time.monotonic() > deadline:
                    res = {"status": "timeout", "note": f"no result after {timeout:g} s"}
    finally:
        if proc.is_alive():
            proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return res


def cached_peak(cache: Dict, key, builder, kwargs: Dict[str, object], **spawn_kwargs) -> Dict[str, object]:
    """:func:`peak_memory_spawn` of ``builder(**kwargs)`` once per ``key`` of ``cache`` (a dict the benchmark
    module keeps), so a case's peak is measured once however many benchmarks report it."""
    if key not in cache:
        cache[key] = peak_memory_spawn(builder, kwargs, **spawn_kwargs)
    return cache[key]
