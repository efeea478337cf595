"""CAM generation for pseudo labels (docs/semantics.md, "CAM refinement" ``gen_msf_cam``), side by side:

* ``official-eager`` -- the official formulation (``aream_fast.official.pseudo_labels.gen_msf_cam``):
  every block returns its (B, H, N, N) logits, ``torch.stack`` of all 12, softmax, head mean, dense class->patch
  map and dense R;
* ``ours``           -- ``aream_fast.pseudo_labels.cam.pseudo_label_cams``: fused attention, class rows C x N, refinement as
  attention-apply (SDPA with V = [0; cam]).

Case: mct_deit_small (VOC, K = 20 class tokens), batch 1, scale 1 + flip (2 images per forward), refinement and
class attention over all 12 layers, train mode with drop_path 0 (deterministic). Sizes 448 and 672 px
(AREAM_BENCH_CAM_SIZES), AREAM_BENCH_CAM_ROUNDS timed rounds after one warm-up. Peak memory: fresh spawned
process per case, peak RSS above the post-build RSS (``memory.peak_memory_spawn``), in extra_info, with the
ratios to the official case (mem_vs_official, time_vs_official). Targets at 672 px: memory <= 1/5, time <= 0.6x.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_cam.py --benchmark-only -s``
"""
import os

import pytest
import torch

from benchmarks import memory

_CUDA = torch.cuda.is_available()
SIZES = tuple(int(s) for s in os.environ.get("AREAM_BENCH_CAM_SIZES", "448,672").split(","))
ROUNDS = int(os.environ.get("AREAM_BENCH_CAM_ROUNDS", 10 if _CUDA else 2))
MODEL = "mct_deit_small"
NUM_CLASSES = 20
LAYERS = tuple(range(12))
PROVIDERS = ("official-eager", "ours")

_peaks = {}
_times = {}


def build_cam_case(provider: str, size: int, device: str):
    """Build model + one image for ``provider``; returns a callable generating the pseudo-label CAMs once."""
    from aream_fast.pseudo_labels.cam import pseudo_label_cams
    from aream_fast.models import build_model
    from aream_fast.official.pseudo_labels import gen_msf_cam

    torch.manual_seed(0)
    model = build_model(MODEL, num_classes=NUM_CLASSES, img_size=224, drop_path=0.0).to(device).train()
    images = torch.randn(1, 3, size, size, device=device)
    labels = torch.zeros(1, NUM_CLASSES, device=device)
    labels[0, [3, 14]] = 1.0
    fn = gen_msf_cam if provider == "official-eager" else pseudo_label_cams

    def run():
        fn(model, images, labels, refine_layers=LAYERS, class_attention_layers=LAYERS, scales=(1.0,), flip=True)
        if _CUDA:
            torch.cuda.synchronize()
    return run


def _peak(provider: str, size: int, device: str):
    return memory.cached_peak(_peaks, (provider, size), build_cam_case,
                              dict(provider=provider, size=size, device=device))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_cam(benchmark, device, provider, size):
    benchmark.group = f"pseudo-label CAM {MODEL} B=1 scale 1 + flip, 12 layers, {size}px"
    info = benchmark.extra_info
    info.update(memory.machine_info())
    info.update(provider=provider, size=size, batch=1, model=MODEL, layers=len(LAYERS))
    mem = _peak(provider, size, device)
    if mem["status"] != "ok":
        pytest.fail(f"{provider} {size}px: {mem['status']} ({mem.get('note')})")
    info["peak_mem_mib"] = mem["peak_mem_mib"]
    base = _peak("official-eager", size, device)
    if base.get("peak_mem_mib"):
        info["mem_vs_official"] = round(mem["peak_mem_mib"] / base["peak_mem_mib"], 3)
    run = build_cam_case(provider, size, device)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _times[(provider, size)] = stats.stats.median
        if _times.get(("official-eager", size)):
            info["time_vs_official"] = round(_times[(provider, size)] / _times[("official-eager", size)], 3)
    print(f"\n[cam bench] {provider:15s} {size}px  peak {info['peak_mem_mib']:9.1f} MiB  "
          f"mem_vs_official {info.get('mem_vs_official', 1.0)}  median "
          f"{_times.get((provider, size), float('nan')):.3f} s  time_vs_official {info.get('time_vs_official', 1.0)}")
