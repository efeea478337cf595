"""AReAM loss, forward + backward: official formulation (materialised logits) vs the tiled torch backend.

Run:  .venv/bin/python -m pytest benchmarks/test_bench_loss.py --benchmark-only

Setting: 5 supervised layers, ViT-B width (H = 12 heads, d = 64), batch 8, N = 197 and 785 tokens
(224 and 448 px, 1 class token), fp32, patch labels with 4 classes and ~20 % ignored patches.

* reference: ``Z_l = (q_l @ k_l^T) * scale`` materialised for each layer (as the official model returns it),
  then ``aream_loss_reference`` (the official loss code), ``backward()`` into q, k.
* torch: ``aream_loss(qs, ks, labels, backend="torch")``, ``backward()`` into q, k.

Time comes from pytest-benchmark in this process. Peak memory is measured in a fresh subprocess per case:
peak RSS (VmHWM, reset just before the step) during one forward + backward, minus the RSS once the inputs
exist, minus the size of the gradients of q and k (which both methods must produce): what remains is the
method's own working memory.
The child runs with ``MALLOC_MMAP_THRESHOLD_=1048576`` so that freed tensors leave the RSS (live memory, not
allocator caching), and warms up on a tiny problem first (lazy imports stay outside the measurement).
Both numbers and their ratios (torch / reference) are in ``benchmark.extra_info`` and in the summary table
printed at the end of the module.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BATCH, HEADS, HEAD_DIM, LAYERS, PREFIX = 8, 12, 64, 5, 1
TOKENS = (197, 785)
IMPLS = ("reference", "torch")
ROUNDS = {197: 5, 785: 3}
_RESULTS: dict = {}


def build_inputs(tokens: int, seed: int = 0):
    """Per layer (B, H, N, d) leaf q, k with requires_grad, and (B, P) labels."""
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, HEADS, tokens, HEAD_DIM)
    qs = [torch.randn(shape, generator=gen).requires_grad_() for _ in range(LAYERS)]
    ks = [torch.randn(shape, generator=gen).requires_grad_() for _ in range(LAYERS)]
    labels = torch.randint(0, 4, (BATCH, tokens - PREFIX), generator=gen)
    labels[torch.rand(BATCH, tokens - PREFIX, generator=gen) < 0.2] = 255
    return qs, ks, labels


def run_step(impl: str, qs, ks, labels) -> float:
    """One forward + backward of the loss into q, k; returns the loss value."""
    from aream_fast import aream_loss, aream_loss_reference

    scale = HEAD_DIM ** -0.5
    if impl == "reference":
        logits = [(q @ k.transpose(-2, -1)) * scale for q, k in zip(qs, ks)]
        loss = aream_loss_reference(logits, labels, num_prefix_tokens=PREFIX)
    else:
        loss = aream_loss(qs, ks, labels, scale=scale, num_prefix_tokens=PREFIX, backend=impl)
    loss.backward()
    return loss.item()


def _status_bytes(key: str) -> int:
    """VmRSS / VmHWM of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _measure_memory_here(impl: str, tokens: int) -> dict:
    """In a fresh process: peak RSS beyond the inputs and their gradients during one forward + backward.

    The peak is VmHWM, which belongs to this process's own address space (``ru_maxrss`` is not usable: a
    child starts with its parent's value). Writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS
    just before the measured step.
    """
    # Warm-up on a tiny problem: lazy imports and one-time initialisation stay outside the measured window.
    global BATCH
    full_batch, BATCH = BATCH, 1
    run_step(impl, *build_inputs(PREFIX + 4))
    BATCH = full_batch
    qs, ks, labels = build_inputs(tokens)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _status_bytes("VmRSS")
    peak_before = _status_bytes("VmHWM")
    run_step(impl, qs, ks, labels)
    peak = _status_bytes("VmHWM")
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in qs + ks)
    return {
        "baseline_rss_mib": baseline / 2**20,
        "peak_before_mib": peak_before / 2**20,
        "peak_rss_mib": peak / 2**20,
        "grads_mib": grad_bytes / 2**20,
        "extra_peak_mib": (peak - baseline - grad_bytes) / 2**20,
    }


def measure_memory(impl: str, tokens: int) -> dict:
    # Every allocation of 1 MiB or more gets its own mapping, returned to the OS when freed, so that peak
    # RSS follows the live tensors rather than glibc's heap caching (which varied by +-30 MiB between runs).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory", impl, str(tokens)],
        capture_output=True, text=True, check=True, cwd=str(Path(__file__).resolve().parents[1]), env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def summary(request):
    yield _RESULTS
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [
        "",
        f"AReAM loss fwd+bwd, L={LAYERS}, B={BATCH}, H={HEADS}, d={HEAD_DIM}, C={PREFIX}, "
        f"torch threads={torch.get_num_threads()}",
        f"{'N':>5} {'impl':>10} {'mean s':>9} {'min s':>9} {'extra peak MiB':>15} {'speedup':>8} {'mem ratio':>10}",
    ]
    for tokens in TOKENS:
        ref = _RESULTS.get(("reference", tokens))
        for impl in IMPLS:
            r = _RESULTS.get((impl, tokens))
            if r is None:
                continue
            speed = f"{ref['mean_s'] / r['mean_s']:.2f}x" if ref else "-"
            ratio = f"{r['extra_peak_mib'] / ref['extra_peak_mib']:.4f}" if ref else "-"
            lines.append(f"{tokens:>5} {impl:>10} {r['mean_s']:>9.3f} {r['min_s']:>9.3f} "
                         f"{r['extra_peak_mib']:>15.1f} {speed:>8} {ratio:>10}")
    text = "\n".join(lines)
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capman is not None:
        with capman.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line(text)
    else:
        print(text)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_aream_loss(benchmark, summary, impl, tokens):
    benchmark.group = f"aream_loss fwd+bwd N={tokens}"
    qs, ks, labels = build_inputs(tokens)

    def setup():
        for t in qs + ks:
            t.grad = None

    loss = benchmark.pedantic(run_step, args=(impl, qs, ks, labels), setup=setup, rounds=ROUNDS[tokens],
                              iterations=1, warmup_rounds=1)
    assert loss == loss  # not NaN
    mem = measure_memory(impl, tokens)
    stats = benchmark.stats.stats
    result = {"mean_s": stats.mean, "min_s": stats.min, **mem}
    _RESULTS[(impl, tokens)] = result
    benchmark.extra_info.update(mem)
    ref = _RESULTS.get(("reference", tokens))
    if ref is not None and impl != "reference":
        benchmark.extra_info["speedup_vs_reference_mean"] = ref["mean_s"] / stats.mean
        benchmark.extra_info["speedup_vs_reference_min"] = ref["min_s"] / stats.min
        benchmark.extra_info["extra_peak_ratio_vs_reference"] = mem["extra_peak_mib"] / ref["extra_peak_mib"]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--memory":
        print(json.dumps(_measure_memory_here(sys.argv[2], int(sys.argv[3]))))
    else:
        raise SystemExit("usage: test_bench_loss.py --memory {reference,torch} TOKENS")
