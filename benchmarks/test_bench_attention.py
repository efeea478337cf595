"""Attention export in the training forward + backward, side by side (the part of a training step that makes the
supervised layers' attention available to the loss):

* ``official-stack`` -- the official formulation: eager attention, every block returns its pre-softmax logits,
  ``torch.stack`` (L, B, H, N, N) with grad; the backward goes through the supervised layers' logits;
* ``ours-export``    -- our model with ``AttentionRequest(supervised_layers=7..11)``: fused attention, q, k of
  those layers exported (B, H, N, d), the backward goes through them;
* ``no-export``      -- our model without any request (the floor).

The "loss" is the classification logits plus a linear function of the exported tensors (the mean of the
supervised layers' logits, or of their q and k), so that the backward reaches them but nothing else differs
from a plain step. The AReAM loss itself is benchmarked in test_bench_loss.py (LOSS), CAM generation in
test_bench_cam.py (MODEL). Peak memory (fresh spawned process) goes into extra_info.

Sizes: AREAM_BENCH_ATTN_SIZE (CPU 320, CUDA 448), AREAM_BENCH_ATTN_BATCH (2 / 8), AREAM_BENCH_ATTN_ROUNDS
(3 / 20).
"""
import os

import pytest
import torch

from benchmarks import memory
from benchmarks.step_cases import DEFAULT_SUPERVISED_LAYERS, synthetic_batch

_CUDA = torch.cuda.is_available()
SIZE = int(os.environ.get("AREAM_BENCH_ATTN_SIZE", 448 if _CUDA else 320))
BATCH = int(os.environ.get("AREAM_BENCH_ATTN_BATCH", 8 if _CUDA else 2))
ROUNDS = int(os.environ.get("AREAM_BENCH_ATTN_ROUNDS", 20 if _CUDA else 3))
MODEL = "mct_deit_small"
NUM_CLASSES = 20
PROVIDERS = ("official-stack", "ours-export", "no-export")

_peaks = {}
_times = {}


def build_export_case(provider: str, size: int, batch: int, device: str):
    """Build model + batch for ``provider``; returns a callable running forward + backward once."""
    from aream_fast.official.model import OfficialMCTformerV2
    from aream_fast.models import build_model
    from aream_fast.models.records import AttentionRequest

    torch.manual_seed(0)
    model = build_model(MODEL, num_classes=NUM_CLASSES, img_size=size, drop_path=0.1).to(device).train()
    images, labels = synthetic_batch(batch, size, NUM_CLASSES)
    images = images.to(device)
    sup = DEFAULT_SUPERVISED_LAYERS
    if provider == "official-stack":
        twin = OfficialMCTformerV2.from_model(model).train()
        del model

        def run():
            twin.zero_grad(set_to_none=True)
            cls, patch, _cam, z = twin(images)  # z: (L, B, H, N, N)
            loss = cls.sum() + patch.sum() + z[list(sup)].mean()
            loss.backward()
            _sync()
        return run
    request = AttentionRequest(supervised_layers=sup) if provider == "ours-export" else None

    def run():
        model.zero_grad(set_to_none=True)
        out = model(images, request)
        loss = out.class_logits.sum() + out.patch_logits.sum()
        if request is not None:
            rec = out.records
            loss = loss + sum(rec.qs[l].mean() + rec.ks[l].mean() for l in sup)
        loss.backward()
        _sync()
    return run


def _sync():
    if _CUDA:
        torch.cuda.synchronize()


def _peak(provider: str, device: str):
    return memory.cached_peak(_peaks, provider, build_export_case,
                              dict(provider=provider, size=SIZE, batch=BATCH, device=device))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_attention_export(benchmark, device, provider):
    info = memory.start_benchmark(benchmark, f"attention export fwd+bwd {MODEL} B={BATCH} {SIZE}px",
                                  provider=provider, size=SIZE, batch=BATCH, model=MODEL,
                                  supervised_layers=list(DEFAULT_SUPERVISED_LAYERS))
    mem = _peak(provider, device)
    if mem["status"] != "ok":
        pytest.fail(f"{provider}: {mem['status']} ({mem.get('note')})")
    info["peak_mem_mib"] = mem["peak_mem_mib"]
    base = _peak("official-stack", device)
    if base.get("peak_mem_mib"):
        info["mem_vs_official"] = round(mem["peak_mem_mib"] / base["peak_mem_mib"], 3)
    run = build_export_case(provider, SIZE, BATCH, device)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _times[provider] = stats.stats.median
        if _times.get("official-stack"):
            info["time_vs_official"] = round(_times[provider] / _times["official-stack"], 3)
