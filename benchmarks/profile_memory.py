#!/usr/bin/env python
"""Peak memory and step time of one full AReAM training step against input size, per mode.

Modes (``benchmarks.step_cases``): ``official`` (the official formulation), ``ours`` (default path: pseudo
labels from a separate no-grad forward with flip), ``ours-reuse`` (``--pseudo-from-forward``) and ``cls-only``
(the same step without AReAM: fused attention, classification losses only). The old names ``baseline`` and
``limit`` are still accepted by ``--modes`` / ``--mode`` as aliases of ``official`` and ``cls-only``.

Every (mode, size) case runs in a **fresh subprocess** (this script re-invoked with ``--child``):

* CPU: peak RSS of the child (``VmHWM``, reset through ``/proc/self/clear_refs`` after the model, optimizer
  and batch are built; ``ru_maxrss`` if that is not possible) minus its RSS at that moment;
* CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated after the build.

A case that runs out of memory is recorded as ``oom``, not a crash: the child limits its own address space
(``RLIMIT_AS`` = its size after the build + ``--mem-limit-gb`` + slack) and the parent kills it when its RSS
grows more than ``--mem-limit-gb`` above the post-build RSS (the cap is lowered to what the machine has
available, and the row says so). A case past ``--timeout`` seconds is recorded as ``timeout``. Once a mode
fails at a size, its larger sizes are recorded as ``skipped`` (the curve ends there).

Writes ``<out>.csv``, ``<out>.md`` (markdown table with ratios to the official and the cls-only step at each size)
and ``<out>.png`` (memory and time against size, a marker where each curve ends). Each row names the
device, torch and triton versions.

Example (the measurement in benchmarks/RESULTS.md)::

    .venv/bin/python benchmarks/profile_memory.py --sizes 224 320 448 512 640 --batch 4 --steps 2 \
        --out docs/figures/memory_step
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MODES = ("official", "ours", "ours-reuse", "cls-only")
# Names used before the official / cls-only renaming, still accepted on the command line.
MODE_ALIASES = {"baseline": "official", "limit": "cls-only"}
RATIO_REFS = ("official", "cls-only")  # CSV columns <metric>_vs_official, <metric>_vs_cls_only
STATUS_OK, STATUS_OOM, STATUS_TIMEOUT, STATUS_ERROR, STATUS_SKIPPED = "ok", "oom", "timeout", "error", "skipped"
CSV_FIELDS = [
    "mode", "size", "batch", "status", "peak_mem_mib", "step_peak_mib", "step_time_s", "step_time_min_s", "steps",
    "mem_vs_official", "time_vs_official", "mem_vs_cls_only", "time_vs_cls_only", "step_peak_vs_official",
    "step_peak_vs_cls_only", "loss",
    "t_forward_s", "t_pseudo_cam_s", "t_par_labels_s", "t_loss_fwd_s", "t_rest_s",
    "model", "supervised_layers", "num_classes", "loss_grad", "mem_limit_gb", "device", "cpu_model", "nproc", "threads",
    "torch", "triton", "timestamp", "note",
]
_AS_SLACK_BYTES = 2 << 30  # address space beyond the cap that non-tensor growth (malloc arenas, stacks) may use


# --------------------------------------------------------------------------------------------------------------
# machine description
# --------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    """Installed version of a distribution, without importing it ("absent" if not installed)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _proc_status_kib(pid: int, key: str) -> Optional[int]:
    """A ``kB`` field (VmRSS, VmHWM, VmSize) of /proc/<pid>/status, in KiB; None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def mem_available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes (None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# --------------------------------------------------------------------------------------------------------------
# child: one case
# --------------------------------------------------------------------------------------------------------------


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    msg = str(exc).lower()
    return name == "OutOfMemoryError" or "out of memory" in msg or "can't allocate memory" in msg or (
        "cannot allocate memory" in msg)


class ComponentTimer:
    """Wall-clock time per step component, by wrapping the functions a step calls (outermost call only: a
    model forward inside the pseudo-label CAM counts as "pseudo_cam"). On CUDA each wrapped call synchronises,
    so it is only installed with ``--breakdown``; on CPU it costs one clock read per call.

    Components: ``forward`` (training forward), ``pseudo_cam`` (pseudo-label CAMs: separate forward + refinement,
    or refinement from the training forward's records), ``par_labels`` (PAR, thresholds, fusion, per-patch
    labels / seg_to_aff), ``loss_fwd`` (AReAM loss forward); ``rest`` = step - their sum (backward, optimizer,
    classification loss).
    """

    COMPONENTS = ("forward", "pseudo_cam", "par_labels", "loss_fwd")

    def __init__(self, sync=None):
        self.sync = sync
        self.active = None
        self.totals = {c: 0.0 for c in self.COMPONENTS}

    def wrap(self, component: str, fn):
        def wrapped(*a, **kw):
            if self.active is not None:
                return fn(*a, **kw)
            self.active = component
            if self.sync:
                self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if self.sync:
                    self.sync()
                self.totals[component] += time.perf_counter() - t0
                self.active = None
        return wrapped

    def reset(self):
        self.totals = {c: 0.0 for c in self.COMPONENTS}

    def install_module_hooks(self):
        """Wrap the pseudo-label and loss entry points by module attribute (looked up at call time)."""
        import aream_fast.official.pseudo_labels as official_pl
        import aream_fast.official.step as official_step
        import aream_fast.pseudo_labels.cam as cam
        import aream_fast.losses.aream as loss
        import aream_fast.pseudo_labels.labels as pseudo_labels

        for mod, name, comp in ((cam, "pseudo_label_cams", "pseudo_cam"), (cam, "cams_from_output", "pseudo_cam"),
                                (pseudo_labels, "cams_to_patch_labels", "par_labels"),
                                (loss, "aream_loss", "loss_fwd"),
                                (official_pl, "gen_msf_cam", "pseudo_cam"),
                                (official_pl, "official_cam_to_seg", "par_labels"),
                                (official_pl, "fuse_segs", "par_labels"),
                                (official_pl, "official_seg_to_aff", "par_labels"),
                                (official_step, "official_affinity_loss", "loss_fwd")):
            setattr(mod, name, self.wrap(comp, getattr(mod, name)))

    def install_forward_hook(self, model):
        model.forward = self.wrap("forward", model.forward)


def profiled_step_peak(case) -> int:
    """Peak bytes of live CPU tensors during one more step, above those alive when it starts (weights, grads,
    optimizer state): the cumulative sum of the allocator's alloc/free records of ``torch.profiler`` with
    ``profile_memory=True``. Unlike RSS, it does not see what the C allocator keeps after a free."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        case.step()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def run_child(args: argparse.Namespace) -> int:
    """Build one case, announce the post-build memory, run warm-up + timed steps, write the JSON result."""
    import gc
    import resource

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result: Dict[str, object] = {"status": STATUS_ERROR, "note": ""}

    def write_result() -> None:
        with open(args.result_file, "w") as f:
            json.dump(result, f)

    from benchmarks.step_cases import build_step_case

    cuda = device.startswith("cuda")
    timer = None
    if not cuda or args.breakdown:
        timer = ComponentTimer(sync=torch.cuda.synchronize if cuda else None)
        timer.install_module_hooks()  # before the step is built: it binds aream_loss at construction
    case = build_step_case(args.mode, model_name=args.model, img_size=args.size, batch=args.batch,
                           num_classes=args.num_classes, supervised_layers=tuple(args.supervised_layers),
                           device=device, seed=0, model_kwargs=json.loads(args.model_kwargs) or None,
                           defer_loss_grad=args.loss_grad == "layer")
    if timer is not None:
        timer.install_forward_hook(case.model)
    gc.collect()
    pid = os.getpid()
    peak_source = "cuda.max_memory_allocated"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        peak_source = "VmHWM after clear_refs"
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        except OSError:
            peak_source = "ru_maxrss (peak RSS could not be reset)"
        base = (_proc_status_kib(pid, "VmRSS") or 0) * 1024
        if args.mem_limit_gb > 0:
            vm_size = (_proc_status_kib(pid, "VmSize") or 0) * 1024
            limit = vm_size + int(args.mem_limit_gb * (1 << 30)) + _AS_SLACK_BYTES
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with open(args.result_file + ".ready", "w") as f:
        f.write(str(base))
    result["base_bytes"] = base
    times: List[float] = []
    peak_warm, steady = 0, base
    parts: Dict[str, float] = {}
    loss = float("nan")
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:  # steady state: optimizer state exists; measure the step's own peak too
                if timer is not None:
                    timer.reset()
                gc.collect()
                if cuda:
                    torch.cuda.synchronize()
                    peak_warm = torch.cuda.max_memory_allocated() - base
                    steady = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            terms = case.step()
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            loss = float(terms["loss"])
            if i >= args.warmup:
                times.append(dt)
    except Exception as exc:  # noqa: BLE001 - recorded, then re-raised for anything but out-of-memory
        if _is_oom(exc):
            result.update(status=STATUS_OOM, note=f"{type(exc).__name__}: {str(exc)[:200]}")
            write_result()
            return 0
        raise
    if timer is not None and times:  # before the profiled step below, which must not count
        parts = {c: v / len(times) for c, v in timer.totals.items()}
        parts["rest"] = sum(times) / len(times) - sum(parts.values())
    step_peak = None
    if cuda:
        hwm = torch.cuda.max_memory_allocated()
        dev_name = torch.cuda.get_device_name()
        if args.warmup > 0:
            step_peak = hwm - steady
    else:
        if peak_source.startswith("VmHWM"):
            hwm = (_proc_status_kib(pid, "VmHWM") or 0) * 1024
        else:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        dev_name = f"cpu ({cpu_model()})"
        if args.alloc_profile:
            try:
                step_peak = profiled_step_peak(case)
            except Exception as exc:  # noqa: BLE001 - out-of-memory is a result; anything else propagates
                if _is_oom(exc):
                    result.update(status=STATUS_OOM, note=f"profiled step: {type(exc).__name__}: {str(exc)[:200]}")
                    write_result()
                    return 0
                raise
    # peak: above the post-build memory, over warm-up + timed steps (includes the optimizer state created by
    # the first step); step_peak: live tensors of one steady-state step above its start
    peak = max(hwm - base, peak_warm) if cuda and args.warmup > 0 else hwm - base
    result["step_peak_bytes"] = step_peak
    result.update(status=STATUS_OK, peak_bytes=peak, times=times, loss=loss, device=dev_name,
                  threads=torch.get_num_threads(), peak_source=peak_source, parts=parts)
    write_result()
    return 0


# --------------------------------------------------------------------------------------------------------------
# parent: run cases in subprocesses
# --------------------------------------------------------------------------------------------------------------


def run_case(mode: str, size: int, args: argparse.Namespace) -> Dict[str, object]:
    """Run one case in a fresh subprocess; returns the child's result dict (status ok/oom/timeout/error) with
    ``mem_limit_gb`` the cap actually enforced."""
    cap_gb = float(args.mem_limit_gb)
    note = ""
    avail = mem_available_bytes()
    if cap_gb > 0 and avail is not None:
        # leave 1.5 GiB to the rest of the machine: never let a case push the host into its OOM killer
        usable = max(avail - (3 << 29), 1 << 29) / (1 << 30)
        if usable < cap_gb:
            note = f"cap lowered from {cap_gb:g} GiB to {usable:.1f} GiB (MemAvailable)"
            cap_gb = usable
    with tempfile.TemporaryDirectory(prefix="aream_profile_") as tmp:
        result_file = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode, "--size", str(size),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--model", args.model, "--num-classes", str(args.num_classes), "--device", args.device,
               "--threads", str(args.threads), "--mem-limit-gb", str(cap_gb), "--result-file", result_file,
               "--model-kwargs", args.model_kwargs, "--loss-grad", args.loss_grad,
               *(["--breakdown"] if args.breakdown else []),
               *([] if args.alloc_profile else ["--no-alloc-profile"]),
               "--supervised-layers", *[str(l) for l in args.supervised_layers]]
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        stderr_path = os.path.join(tmp, "stderr.txt")
        t_start = time.monotonic()
        killed_for = None
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
            base = None
            while proc.poll() is None:
                if base is None and os.path.exists(result_file + ".ready"):
                    try:
                        with open(result_file + ".ready") as f:
                            base = int(f.read().strip() or 0)
                    except (OSError, ValueError):
                        base = None
                if cap_gb > 0 and base is not None and not args.device.startswith("cuda"):
                    rss = _proc_status_kib(proc.pid, "VmRSS")
                    if rss is not None and rss * 1024 - base > cap_gb * (1 << 30):
                        killed_for = STATUS_OOM
                        proc.kill()
                        break
                if time.monotonic() - t_start > args.timeout:
                    killed_for = STATUS_TIMEOUT
                    proc.kill()
                    break
                time.sleep(0.02)
            proc.wait()
        elapsed = time.monotonic() - t_start
        if killed_for == STATUS_OOM:
            res = {"status": STATUS_OOM, "note": f"RSS grew past the {cap_gb:.1f} GiB cap; killed"}
        elif killed_for == STATUS_TIMEOUT:
            res = {"status": STATUS_TIMEOUT, "note": f"killed after {args.timeout:g} s"}
        elif os.path.exists(result_file):
            with open(result_file) as f:
                res = json.load(f)
            if proc.returncode != 0 and res.get("status") == STATUS_OK:
                res["status"] = STATUS_ERROR
        else:
            with open(stderr_path) as f:
                tail = f.read()[-600:].strip().replace("\n", " | ")
            # killed by a signal (the kernel OOM killer sends SIGKILL) or died before writing a result
            status = STATUS_OOM if proc.returncode in (-9, 137) else STATUS_ERROR
            res = {"status": status, "note": f"exit {proc.returncode}: {tail}"}
        if res.get("status") == STATUS_ERROR and not res.get("note"):
            with open(stderr_path) as f:
                res["note"] = f.read()[-600:].strip().replace("\n", " | ")
        res["wall_s"] = elapsed
        res["mem_limit_gb"] = round(cap_gb, 2)
        if note:
            res["note"] = (res.get("note", "") + "; " + note).strip("; ")
        return res


def _median(xs: List[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def profile(args: argparse.Namespace) -> List[Dict[str, object]]:
    """All cases (sizes ascending, modes in the given order); a mode that fails at a size is skipped above it."""
    torch_v, triton_v = package_version("torch"), package_version("triton")
    rows: List[Dict[str, object]] = []
    ended: Dict[str, str] = {}
    for size in sorted(args.sizes):
        for mode in args.modes:
            row: Dict[str, object] = {
                "mode": mode, "size": size, "batch": args.batch, "steps": args.steps,
                "model": args.model if json.loads(args.model_kwargs) == {} else f"{args.model} {args.model_kwargs}",
                "supervised_layers": " ".join(str(l) for l in args.supervised_layers),
                "num_classes": args.num_classes, "cpu_model": cpu_model(), "nproc": os.cpu_count(),
                "torch": torch_v, "triton": triton_v, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "threads": args.threads if args.threads > 0 else "default", "loss_grad": args.loss_grad,
            }
            if mode in ended:
                row.update(status=STATUS_SKIPPED, note=f"curve ended: {ended[mode]}",
                           mem_limit_gb=args.mem_limit_gb, device="")
                rows.append(row)
                print(f"[profile] {mode:>10} {size:4d}px: skipped ({ended[mode]})", flush=True)
                continue
            res = run_case(mode, size, args)
            row["status"] = res["status"]
            row["note"] = res.get("note", "")
            row["mem_limit_gb"] = res.get("mem_limit_gb", args.mem_limit_gb)
            row["device"] = res.get("device", "")
            if res["status"] == STATUS_OK:
                times = list(res.get("times", []))
                row["peak_mem_mib"] = round(float(res["peak_bytes"]) / (1 << 20), 1)
                if res.get("step_peak_bytes") is not None:
                    row["step_peak_mib"] = round(float(res["step_peak_bytes"]) / (1 << 20), 1)
                row["step_time_s"] = round(_median(times), 3) if times else ""
                row["step_time_min_s"] = round(min(times), 3) if times else ""
                row["loss"] = round(float(res.get("loss", float("nan"))), 5)
                row["threads"] = res.get("threads", row["threads"])
                for comp, v in (res.get("parts") or {}).items():
                    row[f"t_{comp}_s"] = round(float(v), 3)
            else:
                ended[mode] = f"{res['status']} at {size}px"
            rows.append(row)
            print(f"[profile] {mode:>10} {size:4d}px: {row['status']:>7}  peak {row.get('peak_mem_mib', '-')} MiB"
                  f"  step {row.get('step_time_s', '-')} s  ({res.get('wall_s', 0):.0f} s wall) {row['note']}",
                  flush=True)
    add_ratios(rows)
    return rows


def add_ratios(rows: List[Dict[str, object]]) -> None:
    """Fill mem/time ratios against the official and the cls-only step measured at the same size in the same run."""
    by_key = {(r["mode"], r["size"]): r for r in rows}
    for r in rows:
        if r.get("status") != STATUS_OK:
            continue
        for ref in RATIO_REFS:
            other = by_key.get((ref, r["size"]))
            col = ref.replace("-", "_")
            if other is None or other.get("status") != STATUS_OK:
                continue
            if float(other["peak_mem_mib"]) > 0:
                r[f"mem_vs_{col}"] = round(float(r["peak_mem_mib"]) / float(other["peak_mem_mib"]), 3)
            if r.get("step_peak_mib") not in ("", None) and other.get("step_peak_mib") not in ("", None) and \
                    float(other["step_peak_mib"]) > 0:
                r[f"step_peak_vs_{col}"] = round(float(r["step_peak_mib"]) / float(other["step_peak_mib"]), 3)
            if other.get("step_time_s") not in ("", None) and float(other["step_time_s"]) > 0:
                r[f"time_vs_{col}"] = round(float(r["step_time_s"]) / float(other["step_time_s"]), 3)


def write_csv(rows: List[Dict[str, object]], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})


def markdown_table(rows: List[Dict[str, object]]) -> str:
    """A markdown table: one line per (size, mode), ratios to the official and the cls-only step of the same size."""
    def fmt(v, suffix=""):
        return "—" if v in ("", None) else f"{v}{suffix}"

    lines = [
        "| size | mode | status | peak MiB | step s | mem / official | time / official | mem / cls-only "
        "| time / cls-only | step peak MiB, live tensors (/ official, / cls-only) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (int(r["size"]), MODES.index(r["mode"]) if r["mode"] in MODES else 9)):
        status = r["status"] if r["status"] == STATUS_OK else f"**{r['status']}**"
        lines.append(f"| {r['size']} | {r['mode']} | {status} | {fmt(r.get('peak_mem_mib'))} | "
                     f"{fmt(r.get('step_time_s'))} | {fmt(r.get('mem_vs_official'), '×')} | "
                     f"{fmt(r.get('time_vs_official'), '×')} | {fmt(r.get('mem_vs_cls_only'), '×')} | "
                     f"{fmt(r.get('time_vs_cls_only'), '×')} | {fmt(r.get('step_peak_mib'))} "
                     f"({fmt(r.get('step_peak_vs_official'), '×')}, {fmt(r.get('step_peak_vs_cls_only'), '×')}) |")
    timed = [r for r in rows if r.get("status") == STATUS_OK and r.get("t_rest_s") not in ("", None)]
    if timed:
        lines += ["", "Where the step time goes (s per step; outermost call of each component, wall clock):", "",
                  "| size | mode | forward | pseudo CAM | PAR + labels | loss fwd | rest (bwd, optim) | step |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(timed, key=lambda r: (int(r["size"]), MODES.index(r["mode"]) if r["mode"] in MODES else 9)):
            lines.append(f"| {r['size']} | {r['mode']} | {fmt(r.get('t_forward_s'))} | {fmt(r.get('t_pseudo_cam_s'))} "
                         f"| {fmt(r.get('t_par_labels_s'))} | {fmt(r.get('t_loss_fwd_s'))} | {fmt(r.get('t_rest_s'))} "
                         f"| {fmt(r.get('step_time_s'))} |")
    first = rows[0] if rows else {}
    devices = sorted({str(r.get("device")) for r in rows if r.get("device")})
    lines.append("")
    lines.append(f"model {first.get('model')}, batch {first.get('batch')}, supervised layers "
                 f"{first.get('supervised_layers')}, K = {first.get('num_classes')}, loss gradients "
                 f"'{first.get('loss_grad')}'; device: {', '.join(devices)}; "
                 f"nproc {first.get('nproc')}; torch {first.get('torch')}, triton {first.get('triton')}; "
                 f"memory cap {first.get('mem_limit_gb')} GiB per case. Peak MiB: peak memory above the memory "
                 f"in use once model, optimizer and batch were built, over warm-up + timed steps (so it includes the "
                 f"AdamW state the first step creates). Step peak, live tensors: peak of one steady-state step above "
                 f"the memory in use when it starts (CPU: live tensors of one extra step recorded by torch.profiler with "
                 f"profile_memory, which does not count what the C allocator retains after frees; CUDA: "
                 f"max_memory_allocated). Peak MiB on CPU is peak RSS (VmHWM) of the case's process.")
    notes = [f"- {r['mode']} {r['size']}px: {r['status']} — {r['note']}" for r in rows
             if r.get("note") and r["status"] != STATUS_SKIPPED]
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines) + "\n"


def replot(csv_path: str, png_path: str) -> None:
    """Redraw the PNG from a CSV this script wrote (``--replot CSV``)."""
    with open(csv_path) as f:
        plot(list(csv.DictReader(f)), png_path)


def plot(rows: List[Dict[str, object]], path: str) -> None:
    """Memory and time against size, one line per mode; a cross (and its status) where a curve ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"official": "tab:red", "ours": "tab:blue", "ours-reuse": "tab:green", "cls-only": "tab:gray"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "peak_mem_mib", "peak memory (MiB): solid RSS, dashed live tensors"),
                           (axes[1], "step_time_s", "time of one step (s)")):
        for mode in MODES:
            pts = sorted((int(r["size"]), r) for r in rows if r["mode"] == mode)
            if not pts:
                continue
            ok = [(s, float(r[key])) for s, r in pts if r["status"] == STATUS_OK and r.get(key) not in ("", None)]
            c = colors.get(mode, "k")
            if ok:
                ax.plot([s for s, _ in ok], [v for _, v in ok], "o-", color=c, label=mode)
            if key == "peak_mem_mib":  # dashed: one steady-state step's live-tensor peak
                live = [(s, float(r["step_peak_mib"])) for s, r in pts
                        if r["status"] == STATUS_OK and r.get("step_peak_mib") not in ("", None)]
                if live:
                    ax.plot([s for s, _ in live], [v for _, v in live], "s--", color=c, alpha=0.6, markersize=4)
            fail = [(s, r) for s, r in pts if r["status"] in (STATUS_OOM, STATUS_TIMEOUT, STATUS_ERROR)]
            if fail:
                s, r = fail[0]
                y = ok[-1][1] if ok else 1.0
                ax.plot([s], [y], "x", color=c, markersize=12, mew=3)
                tag = r["status"] + (f" (cap {float(r['mem_limit_gb']):.0f} GiB)" if r["status"] == STATUS_OOM and
                                     r.get("mem_limit_gb") not in ("", None) else "")
                ax.annotate(tag, (s, y), textcoords="offset points", xytext=(-70, -16), color=c, fontsize=8)
        ax.set_xlabel("input size (px, square)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    first = rows[0] if rows else {}
    fig.suptitle(f"AReAM training step, {first.get('model')}, batch {first.get('batch')}, "
                 f"{rows[0].get('device') or 'device'}; × = curve ends (oom / timeout)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mode_name(name: str) -> str:
    """A --modes / --mode value with the old names mapped to the new ones (baseline -> official, limit -> cls-only)."""
    return MODE_ALIASES.get(name, name)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 320, 448, 512, 640])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per case (after --warmup)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first (CPU: the C allocator's heap settles after 2-3 steps; before that each "
                        "step page-faults fresh memory and times are inflated)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, type=_mode_name,
                   help="step modes (old names: baseline = official, limit = cls-only)")
    p.add_argument("--out", default="docs/figures/memory_step",
                   help="output prefix: writes <out>.csv, <out>.md and <out>.png")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    p.add_argument("--mem-limit-gb", type=float, default=12.0,
                   help="cap on a case's memory growth above its post-build RSS (GiB, 0 = none)")
    p.add_argument("--model", default="mct_deit_small")
    p.add_argument("--model-kwargs", default="{}",
                   help='JSON architecture overrides for build_model, e.g. \'{"depth": 4}\' (tiny test models)')
    p.add_argument("--num-classes", type=int, default=20)
    p.add_argument("--supervised-layers", type=int, nargs="+", default=[7, 8, 9, 10, 11])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each case (0 = torch default)")
    p.add_argument("--loss-grad", default="layer", choices=["layer", "forward"],
                   help="ours / ours-reuse: the AReAM loss's q/k gradients made in each supervised layer's backward "
                        "(the trainer's eager default) or in the forward with the loss value")
    p.add_argument("--breakdown", action="store_true",
                   help="on CUDA, also time the step components (synchronises around each; always on for CPU)")
    p.add_argument("--no-alloc-profile", dest="alloc_profile", action="store_false",
                   help="CPU: skip the extra torch.profiler step that measures the live-tensor step peak")
    p.add_argument("--replot", default="", metavar="CSV",
                   help="only redraw <out>.png from a CSV written by an earlier run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="ours", choices=MODES, type=_mode_name, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=224, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        if not isinstance(json.loads(args.model_kwargs), dict):
            raise ValueError
    except ValueError:
        p.error(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    for s in args.sizes:
        if s < 16 or s % 16:
            p.error(f"--sizes must be multiples of 16, got {s}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    if args.replot:
        replot(args.replot, args.out + ".png")
        print(f"wrote {args.out}.png")
        return 0
    rows = profile(args)
    write_csv(rows, args.out + ".csv")
    table = markdown_table(rows)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    plot(rows, args.out + ".png")
    print(table)
    print(f"wrote {args.out}.csv, {args.out}.md, {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
