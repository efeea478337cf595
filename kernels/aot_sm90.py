"""Ahead-of-time sm_90 compile sweep of every kept autotune config of every Triton kernel, without a GPU.

Each op's launcher (the Python body of its ``torch.library.triton_op``) is run on ``meta`` tensors at the
training shape with ``wrap_triton`` replaced by a recorder, so the sweep sees exactly the arguments, strides and
constexprs a real launch passes. For every recorded launch, the autotune configs that survive the kernel's own
``early_config_prune`` are specialised as a real launch would be (``tt.divisibility=16`` on pointers and on ints
divisible by 16, ints equal to 1 as constexprs, the ``triton.heuristics`` values) and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``; ptxas (shipped in the triton wheel)
reports registers and spills (``TRITON_DUMP_PTXAS_LOG=1``); Triton's metadata gives the shared memory; the PTX says
whether ``wgmma`` was used.

Must run with ``TRITON_INTERPRET=0`` and ``AREAM_FAST_SKIP_AUTOTUNE=0`` set before triton is imported, so run it
as its own process: ``python -m aream_fast.kernels.aot_sm90 [--kernels ...] [--variants ...] [--json FILE]
[--markdown FILE]`` (``make compile-check`` runs all of it). Training shape: ViT-S/16 at 448 px, B=64, H=6, d=64,
N=804 (784 patches + 20 class tokens), L=5 supervised layers; q/k/v of the attention are views of the packed
(B, N, 3, H, d) qkv output.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

H100_SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90 (227 KB opt-in)
VARIANTS = ("bf16", "fp32-ieee", "fp32-tf32")
# training shape (ViT-S/16, 448 px)
SHAPE = dict(L=5, B=64, H=6, N=804, D=64, C=20, K=20)


@dataclass
class Row:
    """One compiled (kernel, variant, config)."""
    kernel: str
    variant: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    wgmma: bool
    wgmma_expected: bool
    compile_s: float

    @property
    def config(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"

    def problems(self) -> list[str]:
        """What the test asserts: no spills, shared memory within the H100 limit, wgmma where the tile allows."""
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores}/{self.spill_loads} bytes")
        if self.shared_bytes > H100_SMEM_LIMIT:
            out.append(f"shared memory {self.shared_bytes} > {H100_SMEM_LIMIT}")
        if self.wgmma_expected and not self.wgmma:
            out.append("no wgmma")
        return out


class _Recorder:
    """Stands in for ``torch.library.wrap_triton``: ``wrap(kernel)[grid](*args, **kwargs)`` is recorded."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        recorder = self

        class _Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    recorder.launches.append((kernel, args, kwargs))
                return run
        return _Launch()


def _unwrap(kernel):
    """(JITFunction, autotuner or None, list of heuristics dicts outermost first)."""
    import triton
    autotuner, heuristics = None, []
    while not isinstance(kernel, triton.JITFunction):
        if isinstance(kernel, triton.runtime.Autotuner):
            autotuner = kernel
        elif isinstance(kernel, triton.runtime.Heuristics):
            heuristics.append(kernel.values)
        kernel = kernel.fn
    return kernel, autotuner, heuristics


_DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32", "torch.float64": "fp64",
           "torch.int64": "i64", "torch.int32": "i32"}


def _specialise(fn, named: dict):
    """Signature, constexprs and attrs of a real launch with these argument values."""
    import torch
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = named[name]
        param = fn.params[i]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _DTYPES[str(value.dtype)]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name] = "constexpr"
            constexprs[name] = None
        else:
            raise TypeError(f"argument {name} of {fn.__name__}: unsupported value {value!r}")
    return signature, constexprs, attrs


def _dot_m_block(kernel_name: str, meta: dict) -> int:
    """The M extent of the kernel's main dots (wgmma needs >= 64 rows per warpgroup)."""
    if kernel_name == "_flash_bwd_dkdv_kernel":
        return meta["BLOCK_N"]  # dK/dV computes k @ q^T: the owned key block is M
    if kernel_name == "_class_attn_kernel":
        return meta["BLOCK_C"]
    return meta.get("BLOCK_M", 0)


def _compile(fn, named: dict, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialise(fn, named)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    # a cache hit would skip ptxas and its report
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    with contextlib.redirect_stdout(log):
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": num_warps, "num_stages": num_stages})
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not spills:
        raise RuntimeError(f"no ptxas report for {fn.__name__} (TRITON_DUMP_PTXAS_LOG unsupported?): {text[-500:]}")
    return (int(regs[-1]), int(spills[-1][0]), int(spills[-1][1]), int(out.metadata.shared),
            "wgmma.mma_async" in out.asm["ptx"], "tt.dot" in out.asm["ttir"])


def _launches(variant: str):
    """Record every kernel launch of the loss and attention ops at the training shape (meta tensors)."""
    import torch

    from . import aream_loss, flash_attention

    torch.backends.cuda.matmul.allow_tf32 = variant == "fp32-tf32"
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    s = SHAPE
    meta = dict(device="meta", dtype=dtype)
    recorder = _Recorder()
    saved = aream_loss.wrap_triton, flash_attention.wrap_triton
    aream_loss.wrap_triton = flash_attention.wrap_triton = recorder
    try:
        # AReAM loss: stacked (L, B, H, N, d) queries / keys
        q = torch.empty(s["L"], s["B"], s["H"], s["N"], s["D"], **meta)
        k = torch.empty_like(q)
        labels = torch.empty(s["B"], s["N"] - s["C"], device="meta", dtype=torch.int64)
        coefs = torch.empty(3, device="meta", dtype=torch.float32)
        scale = s["D"] ** -0.5
        aream_loss._aream_loss_fwd._init_fn(q, k, labels, coefs, scale, s["C"], 255)
        aream_loss._aream_loss_bwd._init_fn(q, k, labels, coefs, torch.empty(s["L"], device="meta"), scale,
                                            s["C"], 255)
        # attention: q/k/v views of the packed qkv output
        qkv = torch.empty(s["B"], s["N"], 3, s["H"], s["D"], **meta).permute(2, 0, 3, 1, 4)
        o = torch.empty(s["B"], s["H"], s["N"], s["D"], **meta)
        lse = torch.empty(s["B"], s["H"], s["N"], device="meta", dtype=torch.float32)
        flash_attention._flash_attention_fwd._init_fn(qkv[0], qkv[1], qkv[2], scale, s["C"], True)
        flash_attention._flash_attention_bwd._init_fn(torch.empty_like(o), lse, qkv[0], qkv[1], qkv[2], o, lse,
                                                      scale)
        values = torch.empty(s["B"], s["K"], s["N"] - s["C"], device="meta", dtype=torch.float32)
        flash_attention._attention_apply._init_fn(q, k, torch.empty(s["L"], s["B"], s["H"], s["N"], device="meta"),
                                                  values, torch.empty(s["L"], device="meta"), scale, s["C"])
    finally:
        aream_loss.wrap_triton, flash_attention.wrap_triton = saved
    return recorder.launches


def sweep(kernels=None, variants=VARIANTS, max_configs=None, progress=True) -> list[Row]:
    """Compile the kept configs of the named kernels (all when None) for each variant ("bf16", "fp32-ieee",
    "fp32-tf32"); ``max_configs`` keeps the first n kept configs of each (kernel, variant) for a quick run."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("AREAM_FAST_SKIP_AUTOTUNE", "0") == "1":
        raise RuntimeError("run with TRITON_INTERPRET=0 and AREAM_FAST_SKIP_AUTOTUNE=0 (set before triton import)")
    from tqdm import tqdm

    jobs = []
    for variant in variants:
        for kernel, args, kwargs in _launches(variant):
            fn, autotuner, heuristics = _unwrap(kernel)
            if kernels is not None and fn.__name__ not in kernels:
                continue
            named = dict(zip(fn.arg_names, args))
            named.update(kwargs)
            if autotuner is None:
                configs = [(dict(), kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))]
            else:
                kept = autotuner.configs
                if autotuner.early_config_prune is not None:
                    kept = autotuner.early_config_prune(kept, named, **kwargs)
                configs = [(c.kwargs, c.num_warps, c.num_stages) for c in kept]
            for cfg_kwargs, warps, stages in configs[:max_configs]:
                full = {k: v for k, v in named.items() if k not in ("num_warps", "num_stages")}
                full.update(cfg_kwargs)
                for values in reversed(heuristics):  # innermost heuristics run first
                    for name, rule in values.items():
                        full[name] = rule(full)
                jobs.append((fn, variant, full, warps, stages))
    rows = []
    for fn, variant, full, warps, stages in tqdm(jobs, desc="sm_90 compile", disable=not progress, file=sys.stderr):
        start = time.perf_counter()
        regs, st, ld, smem, wgmma, has_dot = _compile(fn, full, warps, stages)
        m_block = _dot_m_block(fn.__name__, full)
        tensor_core = full.get("DOT_PRECISION", full.get("DOT_PREC")) != "ieee"
        rows.append(Row(fn.__name__, variant, full.get("BLOCK_M", full.get("BLOCK_C", 0)), full.get("BLOCK_N", 0),
                        warps, stages, regs, st, ld, smem, wgmma, has_dot and tensor_core and m_block >= 64,
                        round(time.perf_counter() - start, 2)))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| kernel | variant | config (BMxBN warps stages) | regs | spill st/ld (B) | smem (KB) | wgmma |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mma = "yes" if r.wgmma else ("no (tile/precision)" if not r.wgmma_expected else "**no**")
        lines.append(f"| `{r.kernel}` | {r.variant} | {r.config} | {r.registers} | {r.spill_stores}/{r.spill_loads}"
                     f" | {r.shared_bytes / 1024:.0f} | {mma} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="*", default=None, help="kernel function names (default: all)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--max-configs", type=int, default=None, help="first n kept configs per kernel/variant")
    parser.add_argument("--json", default=None, help="write one JSON object per row to this file ('-': stdout)")
    parser.add_argument("--markdown", default=None, help="write the markdown table to this file")
    args = parser.parse_args(argv)
    rows = sweep(args.kernels, args.variants, args.max_configs)
    if args.json == "-":
        for r in rows:
            print(json.dumps(asdict(r)))
    elif args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(asdict(r)) + "\n" for r in rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows))
    bad = [(r, p) for r in rows for p in r.problems()]
    for r, p in bad:
        print(f"FAIL {r.kernel} {r.variant} {r.config}: {p}", file=sys.stderr)
    print(f"{len(rows)} configs compiled, {len(bad)} problems, {sum(r.compile_s for r in rows):.0f} s",
          file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
