"""Triton flash attention (kernels/flash_attention.py) vs SDPA and eager attention, CUDA only.

Run (on a GPU):  TRITON_INTERPRET=0 .venv/bin/python -m pytest benchmarks/test_bench_tattn_flash.py --benchmark-only
(skips visibly without CUDA; leave AREAM_FAST_SKIP_AUTOTUNE unset so the kernels autotune once, in warm-up).

Setting: DeiT-S width (H = 6, d = 64), batch 8, fp16, N = 197 / 785 (224 / 448 px, one class token).

* ``attn``: O = softmax(scale q kᵀ) v, forward or forward + backward; providers ``eager`` (materialised
  softmax), ``sdpa`` (``F.scaled_dot_product_attention``), ``triton`` (``flash_attention``, which also writes the
  LSE and the class-token rows).
* ``apply``: mean_h softmax(Z)[C:, C:] @ values for values (B, 20, P), no grad; providers ``sdpa-padded``
  (V = [0; values] padded to the head width, the CPU path of aream_fast.models.attention) and ``triton``
  (``attention_apply_triton`` from the saved LSE).

Peak memory: ``torch.cuda.max_memory_allocated`` above the inputs, in ``benchmark.extra_info``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks import memory

B, H, D, C, K = 8, 6, 64, 1, 20
SCALE = D ** -0.5

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels)")


def _inputs(n: int, requires_grad: bool):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen, device="cuda", dtype=torch.float16) for _ in range(3))
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


def _attn(provider: str, q, k, v):
    if provider == "eager":
        return ((q @ k.transpose(-1, -2)) * SCALE).softmax(-1) @ v
    if provider == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=SCALE)
    from aream_fast.kernels.flash_attention import flash_attention

    o, _lse, _cls = flash_attention(q, k, v, scale=SCALE, num_prefix_tokens=C, return_lse=True,
                                    return_class_attention=True)
    return o


def _measure(benchmark, run, base_bytes: int):
    run()  # warm-up (autotune, compile)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    benchmark.extra_info["peak_mem_mib"] = round((torch.cuda.max_memory_allocated() - base_bytes) / 2 ** 20, 2)
    benchmark.extra_info.update(memory.machine_info())
    benchmark.pedantic(run, rounds=20, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("n", [197, 785])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["eager", "sdpa", "triton"])
def test_bench_tattn_attention(benchmark, provider, mode, n):
    benchmark.group = f"attention {mode} B={B} H={H} d={D} N={n} fp16"
    q, k, v = _inputs(n, requires_grad=(mode == "fwd+bwd"))
    g = torch.randn_like(q)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()

    def run():
        if mode == "fwd":
            with torch.no_grad():
                _attn(provider, q, k, v)
        else:
            torch.autograd.grad(_attn(provider, q, k, v), (q, k, v), g)
        torch.cuda.synchronize()

    _measure(benchmark, run, base)


@pytest.mark.parametrize("n", [197, 785])
@pytest.mark.parametrize("provider", ["sdpa-padded", "triton"])
def test_bench_tattn_attention_apply(benchmark, provider, n):
    benchmark.group = f"attention-apply B={B} H={H} d={D} N={n} K={K} fp16"
    from aream_fast.kernels.flash_attention import attention_apply_triton, flash_attention

    q, k, v = _inputs(n, requires_grad=False)
    values = torch.rand(B, K, n - C, device="cuda")
    _, lse, _ = flash_attention(q, k, v, scale=SCALE, return_lse=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()

    def run():
        with torch.no_grad():
            if provider == "triton":
                attention_apply_triton(q, k, lse, values, scale=SCALE, num_prefix_tokens=C)
            else:
                vpad = q.new_zeros(B, H, n, D)
                vpad[:, :, C:, :K] = values.transpose(1, 2).unsqueeze(1).to(q.dtype)
                out = F.scaled_dot_product_attention(q, k, vpad, scale=SCALE)
                out[:, :, C:, :K].float().mean(1).transpose(1, 2)
        torch.cuda.synchronize()

    _measure(benchmark, run, base)
