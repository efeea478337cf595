"""Fused Triton AReAM loss vs the official materialised formulation, forward + backward, CUDA only.

Run (on a GPU):  TRITON_INTERPRET=0 .venv/bin/python -m pytest benchmarks/test_bench_tloss_triton.py --benchmark-only
(skips visibly without CUDA; leave AREAM_FAST_SKIP_AUTOTUNE unset so the kernels autotune once, in warm-up).

Setting: 5 supervised layers, ViT-B width (H = 12, d = 64), batch 8, N = 197 / 785 (224 / 448 px, one class
token), 4 classes, ~20 % ignored patches; fp32 and bf16 inputs.

* reference: ``Z_l = (q_l @ k_l^T) * scale`` per layer, then ``aream_loss_reference`` (official loss code).
* triton: ``aream_fast.kernels.aream_loss.aream_loss_triton`` on the stacked (L, B, H, N, d) q, k.

Peak memory: ``torch.cuda.max_memory_allocated`` during one forward + backward, minus the allocation once the
inputs exist and minus the q/k gradients both methods must produce; in ``benchmark.extra_info``.
"""
from __future__ import annotations

import os

import pytest
import torch

BATCH, HEADS, HEAD_DIM, LAYERS, PREFIX = 8, 12, 64, 5, 1


def _inputs(tokens: int, dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (LAYERS, BATCH, HEADS, tokens, HEAD_DIM)
    q = torch.randn(shape, generator=gen, device="cuda").to(dtype).requires_grad_()
    k = torch.randn(shape, generator=gen, device="cuda").to(dtype).requires_grad_()
    labels = torch.randint(0, 4, (BATCH, tokens - PREFIX), generator=gen, device="cuda")
    labels[torch.rand(labels.shape, generator=gen, device="cuda") < 0.2] = 255
    return q, k, labels


def _step(impl: str, q, k, labels):
    from aream_fast.kernels.aream_loss import aream_loss_triton
    from aream_fast.official.loss import aream_loss_reference

    scale = HEAD_DIM ** -0.5
    if impl == "reference":
        logits = [(q[i] @ k[i].transpose(-2, -1)) * scale for i in range(LAYERS)]
        loss = aream_loss_reference(logits, labels, num_prefix_tokens=PREFIX)
    else:
        loss = aream_loss_triton(q, k, labels, scale=scale, num_prefix_tokens=PREFIX)
    loss.backward()
    q.grad = None
    k.grad = None
    return loss


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [197, 785])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bench_tloss_fwd_bwd(benchmark, impl, tokens, dtype):
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs CUDA (and TRITON_INTERPRET unset or 0)")
    q, k, labels = _inputs(tokens, dtype)
    _step(impl, q, k, labels)  # warm-up: autotune / cuBLAS heuristics outside the timed rounds
    torch.cuda.synchronize()

    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(impl, q, k, labels)
    torch.cuda.synchronize()
    grad_bytes = 2 * q.numel() * q.element_size()
    working = torch.cuda.max_memory_allocated() - base - grad_bytes

    def run():
        _step(impl, q, k, labels)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    benchmark.extra_info.update({
        "impl": impl, "tokens": tokens, "dtype": str(dtype), "batch": BATCH, "heads": HEADS,
        "head_dim": HEAD_DIM, "layers": LAYERS, "working_memory_mib": working / 2 ** 20,
        "device": torch.cuda.get_device_name(),
    })
