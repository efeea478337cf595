"""One prepared GPU run (``make gpu-check``): CUDA-only tests and GPU benchmarks at the training shape.

Made for a lent machine with one NVIDIA GPU, its own preinstalled torch / triton / timm / pytest (no downloads,
no installs; torch 2.11 + triton 3.6 there, the project's pins here), in at most ~8 minutes. Runs from a plain
checkout (the repository root is put on ``sys.path``; ``aream_fast/__init__.py`` maps ``kernels/`` to
``aream_fast.kernels``) or after ``pip install --no-deps --no-build-isolation -e .``.

Sections, each fail-soft (an error is recorded with its traceback and the next section runs), results written
after every section to ``OUT/gpu_results.json`` and ``OUT/gpu_results.md`` (GPU name, versions, numbers):

* ``environment``: GPU, capability, versions; measured bf16 matmul rate (8192^3) as the practical peak.
* ``tests``: ``pytest -m gpu tests`` and ``tests/kernels/test_kernel_aream_loss.py`` with compiled kernels
  (``TRITON_INTERPRET=0``; fp16/bf16 parity, torch.compile, bit-equal repeats).
* ``loss``: AReAM loss forward + backward at ViT-S/448 (L=5, B=64, H=6, N=804, d=64, C=20, bf16): Triton vs the
  tiled torch backend vs the materialised official formulation; median time, peak ``max_memory_allocated``
  above its start, achieved TFLOP/s and fraction of the bf16 peak, error against the official value.
* ``attention``: our flash attention with exports (LSE + class attention) vs PyTorch SDPA, forward and
  forward + backward, at B=64, H=6, N=804, d=64, bf16 (q/k/v views of a packed qkv); and, forward only, PyTorch's
  flash SDPA (which returns the LSE) + our class-attention kernel (``class_attention_from_lse``), the option for
  layers that need only the LSE.
* ``train_step``: the full training step at 448 px (mct_deit_small, K=20, bf16 autocast): official / ours /
  ours-reuse / cls-only, at the largest batch (of 64, 48, 32, 16, 8, 4) the official step fits, side by side.

Targets (issue 13): loss fwd+bwd >= 50 % of bf16 tensor-core peak; ours-reuse <= 1.10x cls-only time and
<= 1.05x its memory; official / ours memory >= 5x. The markdown lists each against its measurement.

``--smoke`` runs every section on tiny shapes (CPU, Triton under ``TRITON_INTERPRET=1``) to test the script
itself (tests/kernels/test_gpu_check.py); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTIONS = ("environment", "tests", "loss", "attention", "train_step")
BF16_DENSE_PEAK_TFLOPS = 989.0  # H100/H200 SXM datasheet, dense bf16
TRAIN = dict(L=5, B=64, H=6, N=804, D=64, C=20, classes=20, img=448, batches=(64, 48, 32, 16, 8, 4))
SMOKE = dict(L=2, B=2, H=2, N=21, D=16, C=3, classes=3, img=48, batches=(2,),
             step=dict(num_classes=3, supervised_layers=(2, 3), model_kwargs={"embed_dim": 32, "depth": 4,
                                                                            "num_heads": 2}))


class Context:
    def __init__(self, args):
        import torch

        self.args = args
        self.smoke = args.smoke
        self.shape = SMOKE if args.smoke else TRAIN
        self.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
        self.dtype = torch.float32 if args.smoke else torch.bfloat16
        self.deadline = time.monotonic() + args.budget_s
        self.peak_tflops = BF16_DENSE_PEAK_TFLOPS

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def median_time(self, fn, warmup: int, iters: int) -> float:
        """Median seconds of ``fn()`` (CUDA events on a GPU, after ``warmup`` untimed calls)."""
        import torch

        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def peak_memory_mib(self, fn) -> dict:
        """Peak ``max_memory_allocated`` of one ``fn()`` call: absolute and above the allocation at its start."""
        import torch

        if self.device != "cuda":
            fn()
            return {"peak_mib": None, "peak_above_start_mib": None}
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mib": round(peak / 2 ** 20, 1), "peak_above_start_mib": round((peak - start) / 2 ** 20, 1)}

    def free(self):
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------ sections
def section_environment(ctx: Context) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": ctx.device}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not importable: {exc}"
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2 ** 30, 1))
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        t = ctx.median_time(lambda: a @ b, warmup=3, iters=10)
        info["bf16_matmul_tflops_measured"] = round(2 * n ** 3 / t / 1e12, 1)
        del a, b
    else:
        info["gpu"] = "none (smoke run on CPU)"
    return info


def section_tests(ctx: Context) -> dict:
    """CUDA-only tests with compiled kernels, one fixed config per kernel (AREAM_FAST_SKIP_AUTOTUNE=1)."""
    env = dict(os.environ, TRITON_INTERPRET="0", AREAM_FAST_SKIP_AUTOTUNE="1", PYTHONPATH=str(REPO))
    if ctx.smoke:  # the plumbing only: one quick interpreter test file
        env["TRITON_INTERPRET"] = "1"
        targets = ["tests/kernels/test_kernel_aream_loss.py", "-k", "pair_counts"]
    else:
        targets = ["tests", "-m", "gpu", "tests/kernels/test_kernel_aream_loss.py"]
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
           "--continue-on-collection-errors"]
    timeout = max(30.0, min(240.0, ctx.remaining() - 240))
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"status": "failed", "command": " ".join(cmd), "error": f"timed out after {timeout:.0f} s",
                "tail": out[-3000:]}
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    return {"status": "ok" if res.returncode == 0 else "failed", "returncode": res.returncode,
            "command": " ".join(cmd), "summary": summary, "tail": (res.stdout + res.stderr)[-4000:]}


def _rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def section_loss(ctx: Context) -> dict:
    import torch

    from aream_fast import aream_loss, aream_loss_reference, aream_loss_triton

    s = ctx.shape
    L, B, H, N, D, C = s["L"], s["B"], s["H"], s["N"], s["D"], s["C"]
    P = N - C
    scale = D ** -0.5
    torch.manual_seed(0)
    q0 = torch.randn(L, B, H, N, D, device=ctx.device).to(ctx.dtype)
    k0 = torch.randn(L, B, H, N, D, device=ctx.device).to(ctx.dtype)
    labels = torch.randint(0, s["classes"], (B, P), device=ctx.device)
    labels[torch.rand(B, P, device=ctx.device) < 0.2] = 255

    def run(provider):
        q = q0.detach().clone().requires_grad_(True)
        k = k0.detach().clone().requires_grad_(True)
        if provider == "triton":
            loss = aream_loss_triton(q, k, labels, scale=scale, num_prefix_tokens=C)
        elif provider == "torch_tiled":
            loss = aream_loss(list(q.unbind(0)), list(k.unbind(0)), labels, scale=scale, num_prefix_tokens=C,
                              backend="torch")
        else:  # official: materialised (L, B, H, N, N) logits
            logits = torch.einsum("lbhid,lbhjd->lbhij", q, k) * scale
            loss = aream_loss_reference(logits, labels, num_prefix_tokens=C)
        dq, dk = torch.autograd.grad(loss, (q, k))
        return loss.detach(), dq, dk

    def forward_only(provider):
        with torch.no_grad():
            if provider == "triton":
                return aream_loss_triton(q0, k0, labels, scale=scale, num_prefix_tokens=C)
            if provider == "torch_tiled":
                return aream_loss(list(q0.unbind(0)), list(k0.unbind(0)), labels, scale=scale,
                                  num_prefix_tokens=C, backend="torch")
            logits = torch.einsum("lbhid,lbhjd->lbhij", q0, k0) * scale
            return aream_loss_reference(logits, labels, num_prefix_tokens=C)

    useful_fwd = 2.0 * L * B * P * P * H * D  # merged-head logits
    useful = 3 * useful_fwd  # + dQ = G K and dK = G^T Q
    iters = 2 if ctx.smoke else 10
    rows, ref = {}, None
    for provider in ("official", "torch_tiled", "triton"):
        row = {}
        if ctx.remaining() < 10:
            rows[provider] = {"error": f"skipped: time budget ({ctx.remaining():.0f} s left)"}
            continue
        try:
            out = run(provider)  # warm-up (autotune, compile), and the values for the error check
            if provider == "official":
                ref = out
            else:
                row.update(loss_rel_err=_rel_err(out[0], ref[0]), dq_rel_err=_rel_err(out[1], ref[1]),
                           dk_rel_err=_rel_err(out[2], ref[2]))
            del out
            row["fwd_bwd_ms"] = round(1e3 * ctx.median_time(lambda: run(provider), 1, iters), 3)
            row["fwd_ms"] = round(1e3 * ctx.median_time(lambda: forward_only(provider), 1, iters), 3)
            row.update(ctx.peak_memory_mib(lambda: run(provider)))
            row["useful_tflops"] = round(useful / (row["fwd_bwd_ms"] / 1e3) / 1e12, 1)
            row["fraction_of_bf16_peak"] = round(row["useful_tflops"] / ctx.peak_tflops, 3)
        except Exception as exc:  # one provider failing (e.g. out of memory) leaves the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        rows[provider] = row
        ctx.free()
    base = rows.get("official", {}).get("fwd_bwd_ms")
    for row in rows.values():
        if base and row.get("fwd_bwd_ms"):
            row["time_vs_official"] = round(row["fwd_bwd_ms"] / base, 3)
    return {"shape": dict(L=L, B=B, H=H, N=N, d=D, C=C, dtype=str(ctx.dtype)), "useful_gflop": useful / 1e9,
            "providers": rows}


def section_attention(ctx: Context) -> dict:
    import torch
    import torch.nn.functional as F

    from aream_fast import class_attention_from_lse, flash_attention

    s = ctx.shape
    B, H, N, D, C = s["B"], s["H"], s["N"], s["D"], s["C"]
    scale = D ** -0.5
    torch.manual_seed(0)
    qkv0 = torch.randn(B, N, 3, H, D, device=ctx.device).to(ctx.dtype)
    grad_o = torch.randn(B, H, N, D, device=ctx.device).to(ctx.dtype)

    def inputs():
        qkv = qkv0.detach().clone().requires_grad_(True)
        return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def ours(backward: bool):
        qkv, (q, k, v) = inputs()
        o, lse, cls = flash_attention(q, k, v, scale=scale, num_prefix_tokens=C, return_lse=True,
                                      return_class_attention=True)
        if backward:
            torch.autograd.grad(o, qkv, grad_o)
        return o

    def sdpa(backward: bool):
        qkv, (q, k, v) = inputs()
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        if backward:
            torch.autograd.grad(o, qkv, grad_o)
        return o

    def sdpa_lse_class_attention(backward: bool):
        """Layers that need only the LSE: PyTorch's flash SDPA (returns it) + our class-attention kernel."""
        if backward:
            raise NotImplementedError("forward only (its backward is SDPA's)")
        _, (q, k, v) = inputs()
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)
        return out[0], class_attention_from_lse(q, k, out[1], scale=scale, num_prefix_tokens=C)

    with torch.no_grad():
        qkv, (q, k, v) = inputs()
        o_ours, _, cls_ours = flash_attention(q, k, v, scale=scale, num_prefix_tokens=C, return_lse=True,
                                              return_class_attention=True)
        err = _rel_err(o_ours, sdpa(False))
    flops_fwd = 4.0 * B * H * N * N * D
    iters = 2 if ctx.smoke else 20
    rows = {}
    providers = [("sdpa", sdpa), ("ours_flash_exports", ours)]
    if ctx.device == "cuda":
        providers.append(("sdpa_flash_lse+class_attn", sdpa_lse_class_attention))
    for name, fn in providers:
        row = {}
        try:
            row["fwd_ms"] = round(1e3 * ctx.median_time(lambda: fn(False), 2, iters), 3)
            row["fwd_tflops"] = round(flops_fwd / (row["fwd_ms"] / 1e3) / 1e12, 1)
            if name == "sdpa_flash_lse+class_attn":
                with torch.no_grad():
                    row["class_attn_rel_err_vs_ours"] = _rel_err(fn(False)[1], cls_ours)
            else:
                row["fwd_bwd_ms"] = round(1e3 * ctx.median_time(lambda: fn(True), 2, iters), 3)
                row.update(ctx.peak_memory_mib(lambda: fn(True)))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        rows[name] = row
        ctx.free()
    for name, row in rows.items():
        if name != "sdpa" and rows["sdpa"].get("fwd_ms") and row.get("fwd_ms"):
            row["fwd_ms_vs_sdpa"] = round(row["fwd_ms"] / rows["sdpa"]["fwd_ms"], 3)
    if rows["sdpa"].get("fwd_bwd_ms") and rows["ours_flash_exports"].get("fwd_bwd_ms"):
        ours_row = rows["ours_flash_exports"]
        ours_row["fwd_bwd_ms_vs_sdpa"] = round(ours_row["fwd_bwd_ms"] / rows["sdpa"]["fwd_bwd_ms"], 3)
    return {"shape": dict(B=B, H=H, N=N, d=D, C=C, dtype=str(ctx.dtype)), "output_rel_err_vs_sdpa": err,
            "providers": rows}


_STEP_MODES = (("official", "baseline"), ("ours", "ours"), ("ours-reuse", "ours-reuse"), ("cls-only", "limit"))


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def section_train_step(ctx: Context) -> dict:
    """Steps run under ``torch.autocast(bfloat16)`` on a GPU (as the trainer's ``--amp``; ``--step-fp32`` for
    plain fp32), every mode alike."""
    import contextlib

    import torch

    from benchmarks.step_cases import build_step_case

    s = ctx.shape
    amp = ctx.device == "cuda" and not ctx.args.step_fp32

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    common = dict(model_name="mct_deit_small", img_size=s["img"], device=ctx.device,
                  **s.get("step", {"num_classes": 20}))
    tried, batch = [], None
    for candidate in s["batches"]:  # largest batch the official step fits
        case = None
        try:
            case = build_step_case("baseline", batch=candidate, **common)
            with autocast():
                case.step()
            ctx.sync()
            batch = candidate
            break
        except Exception as exc:
            if not _is_oom(exc):
                raise
            tried.append(candidate)
        finally:
            del case
            ctx.free()
    if batch is None:
        raise RuntimeError(f"the official step fits none of the batches {s['batches']}")
    iters = 2 if ctx.smoke else 5
    rows = {}
    for name, mode in _STEP_MODES:
        row = {}
        case = None
        if ctx.remaining() < 15:
            rows[name] = {"error": f"skipped: time budget ({ctx.remaining():.0f} s left)"}
            continue
        try:
            case = build_step_case(mode, batch=batch, **common)

            def step():
                with autocast():
                    return case.step()

            row["step_ms"] = round(1e3 * ctx.median_time(step, 2, iters), 2)
            row.update(ctx.peak_memory_mib(step))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            del case
            ctx.free()
        rows[name] = row
    limit = rows["cls-only"]
    for row in rows.values():
        if limit.get("step_ms") and row.get("step_ms"):
            row["time_vs_cls_only"] = round(row["step_ms"] / limit["step_ms"], 3)
        if limit.get("peak_mib") and row.get("peak_mib"):
            row["memory_vs_cls_only"] = round(row["peak_mib"] / limit["peak_mib"], 3)
    if rows["official"].get("peak_mib") and rows["ours"].get("peak_mib"):
        rows["official"]["memory_vs_ours"] = round(rows["official"]["peak_mib"] / rows["ours"]["peak_mib"], 2)
    return {"img_size": s["img"], "batch": batch, "batches_that_did_not_fit": tried, "model": "mct_deit_small",
            "precision": "bf16 autocast" if amp else "fp32", "modes": rows}


_FUNCTIONS = {"environment": section_environment, "tests": section_tests, "loss": section_loss,
              "attention": section_attention, "train_step": section_train_step}
# seconds a section needs at least; skipped (and recorded) when less of the budget is left
_MIN_SECONDS = {"environment": 5, "tests": 40, "loss": 40, "attention": 20, "train_step": 60}


# ------------------------------------------------------------------------------------------------------- report
def _targets(results: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) of issue 13's three targets, where the sections produced the numbers."""
    out = []
    loss = results["sections"].get("loss", {}).get("data", {}).get("providers", {}).get("triton", {})
    if "fraction_of_bf16_peak" in loss:
        frac = loss["fraction_of_bf16_peak"]
        out.append(("loss fwd+bwd >= 50 % of bf16 peak (useful FLOPs)", f"{100 * frac:.1f} %",
                    "met" if frac >= 0.5 else "not met"))
    modes = results["sections"].get("train_step", {}).get("data", {}).get("modes", {})
    reuse = modes.get("ours-reuse", {})
    if "time_vs_cls_only" in reuse:
        out.append(("ours-reuse time <= 1.10x cls-only", f"{reuse['time_vs_cls_only']:.3f}x",
                    "met" if reuse["time_vs_cls_only"] <= 1.10 else "not met"))
    if "memory_vs_cls_only" in reuse:
        out.append(("ours-reuse memory <= 1.05x cls-only", f"{reuse['memory_vs_cls_only']:.3f}x",
                    "met" if reuse["memory_vs_cls_only"] <= 1.05 else "not met"))
    official = modes.get("official", {})
    if "memory_vs_ours" in official:
        out.append(("official / ours memory >= 5x", f"{official['memory_vs_ours']:.2f}x",
                    "met" if official["memory_vs_ours"] >= 5 else "not met"))
    return out


def _table(rows: dict, keys: list[str]) -> list[str]:
    lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in rows.items():
        cells = [str(row.get(k, row.get("error", "") if k == keys[-1] else "")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    env = results["sections"].get("environment", {}).get("data", {})
    lines = [f"# GPU check ({results['started_utc']})", "",
             f"GPU: **{env.get('gpu', '?')}** (capability {env.get('capability', '?')}), torch {env.get('torch', '?')},"
             f" triton {env.get('triton', '?')}, Python {env.get('python', '?')}; measured bf16 matmul "
             f"{env.get('bf16_matmul_tflops_measured', '?')} TFLOP/s. Command: `{results['command']}`. "
             f"Total {results.get('total_s', '?')} s.", ""]
    if results.get("smoke"):
        lines += ["**Smoke run (tiny shapes, CPU): the numbers mean nothing.**", ""]
    lines += ["## Sections", "", "| section | status | seconds |", "|---|---|---|"]
    for name, sec in results["sections"].items():
        lines.append(f"| {name} | {sec['status']} | {sec.get('seconds', '')} |")
    lines.append("")
    for name, sec in results["sections"].items():
        if sec["status"] == "error":
            lines += [f"### {name}: error", "", "```", sec["error"][-2000:], "```", ""]
    tests = results["sections"].get("tests", {}).get("data")
    if tests:
        lines += ["## CUDA-only tests", "", f"`{tests['command']}`: {tests.get('summary') or tests.get('error')}", ""]
    loss = results["sections"].get("loss", {}).get("data")
    if loss:
        lines += ["## AReAM loss forward + backward", "", f"Shape {loss['shape']}, {loss['useful_gflop']:.0f} useful "
                  "GFLOP per fwd+bwd; peak = max_memory_allocated above the start of one fwd+bwd (includes the copies of q, k "
                  "and their gradients, the same for every provider).", ""]
        lines += _table(loss["providers"], ["fwd_ms", "fwd_bwd_ms", "time_vs_official", "peak_above_start_mib",
                                            "useful_tflops", "fraction_of_bf16_peak", "dq_rel_err"])
        lines.append("")
    attn = results["sections"].get("attention", {}).get("data")
    if attn:
        lines += ["## Attention (forward with exports vs SDPA)", "",
                  f"Shape {attn['shape']}; output error vs SDPA {attn['output_rel_err_vs_sdpa']:.2e}.", ""]
        lines += _table(attn["providers"], ["fwd_ms", "fwd_bwd_ms", "fwd_ms_vs_sdpa", "fwd_bwd_ms_vs_sdpa",
                                            "peak_above_start_mib", "fwd_tflops", "class_attn_rel_err_vs_ours"])
        lines.append("")
    step = results["sections"].get("train_step", {}).get("data")
    if step:
        lines += ["## Full training step", "", f"{step['model']}, {step['img_size']} px, {step['precision']}, "
                  f"batch {step['batch']} "
                  f"(largest the official step fits; did not fit: {step['batches_that_did_not_fit']}).", ""]
        lines += _table(step["modes"], ["step_ms", "time_vs_cls_only", "peak_mib", "memory_vs_cls_only",
                                        "memory_vs_ours"])
        lines.append("")
    targets = _targets(results)
    if targets:
        lines += ["## Issue 13 targets", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {v} |" for t, m, v in targets]
        lines.append("")
    return "\n".join(lines)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_results.md").write_text(markdown(results))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO), help="folder for gpu_results.json / gpu_results.md")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections after this")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: tests this script only")
    parser.add_argument("--step-fp32", action="store_true", help="training steps in fp32 instead of bf16 autocast")
    parser.add_argument("--inject-failure", default=None, choices=SECTIONS,
                        help="make this section raise (tests the fail-soft path)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("AREAM_FAST_SKIP_AUTOTUNE", "1")
    elif os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("gpu_check: unset TRITON_INTERPRET (the GPU check runs the compiled kernels)", file=sys.stderr)
        return 2
    started = time.monotonic()
    results = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "smoke": args.smoke,
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "sections": {}}
    out = Path(args.out)
    try:
        ctx = Context(args)
    except Exception:
        results["sections"]["environment"] = {"status": "error", "error": traceback.format_exc()}
        write(results, out)
        return 1
    if ctx.device != "cuda" and not args.smoke:
        print("gpu_check: no CUDA device; sections that need one will record errors", file=sys.stderr)
    for name in args.sections:
        if ctx.remaining() < _MIN_SECONDS[name]:
            results["sections"][name] = {"status": "skipped", "error": f"time budget: {ctx.remaining():.0f} s left"}
            continue
        t0 = time.monotonic()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            if args.inject_failure == name:
                raise RuntimeError(f"injected failure in section {name!r} (--inject-failure)")
            data = _FUNCTIONS[name](ctx)
            status = data.pop("status", "ok") if isinstance(data, dict) else "ok"
            results["sections"][name] = {"status": status, "data": data}
        except Exception:
            results["sections"][name] = {"status": "error", "error": traceback.format_exc()}
        results["sections"][name]["seconds"] = round(time.monotonic() - t0, 1)
        results["total_s"] = round(time.monotonic() - started, 1)
        ctx.free()
        write(results, out)
        print(f"gpu_check: {name} {results['sections'][name]['status']} "
              f"({results['sections'][name]['seconds']} s)", file=sys.stderr, flush=True)
    write(results, out)
    print(markdown(results))
    return 0 if all(sec["status"] == "ok" for sec in results["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
