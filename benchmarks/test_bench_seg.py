"""Stage two segmentation networks, side by side: one training step and multi-scale + flip inference.

Models (``aream_fast.stage2.build_seg_model``, random init, 21 VOC classes): ``vit_small_largefov`` and
``vit_small_aspp`` (ViT-S/16 + head on the stride-16 grid) against the CNN comparators ``deeplabv2_resnet101``
and ``deeplabv3_resnet101`` (dilated ResNet-101, output stride 8; AREAM_BENCH_SEG_MODELS, comma-separated,
picks a subset, the baseline first); ratios are against ``deeplabv3_resnet101``
(the baseline) measured in the same run.

* train step: forward + cross-entropy (ignore 255) + backward + SGD step, batch AREAM_BENCH_SEG_BATCH (2) at
  crop AREAM_BENCH_SEG_SIZE (448), train mode (batch >= 2: DeepLabV3's image-pooling BatchNorm cannot train on
  one image);
* MS + flip inference: ``multiscale_flip_probs`` of one AREAM_BENCH_SEG_SIZE image, scales
  AREAM_BENCH_SEG_SCALES (0.5,0.75,1.0,1.25,1.5) + flip, eval mode, no grad.

Time: AREAM_BENCH_SEG_ROUNDS timed rounds (CPU 1, CUDA 5) after AREAM_BENCH_SEG_WARMUP warm-up rounds (CPU 0,
CUDA 2). Peak memory: a fresh spawned process per case, peak RSS (CUDA: max allocated) above the memory in use
after the build (``benchmarks.memory.peak_memory_spawn``), so parameters are excluded and optimizer state is included.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_seg.py --benchmark-only -s``
"""
import os

import pytest
import torch

from benchmarks import memory as _memory

_CUDA = torch.cuda.is_available()
SIZE = int(os.environ.get("AREAM_BENCH_SEG_SIZE", 448))
BATCH = int(os.environ.get("AREAM_BENCH_SEG_BATCH", 2))
ROUNDS = int(os.environ.get("AREAM_BENCH_SEG_ROUNDS", 5 if _CUDA else 1))
WARMUP = int(os.environ.get("AREAM_BENCH_SEG_WARMUP", 2 if _CUDA else 0))
SCALES = tuple(float(s) for s in os.environ.get("AREAM_BENCH_SEG_SCALES", "0.5,0.75,1.0,1.25,1.5").split(","))
MODELS = tuple(os.environ.get("AREAM_BENCH_SEG_MODELS", "deeplabv3_resnet101,deeplabv2_resnet101,vit_small_largefov,"
                                                       "vit_small_aspp").split(","))
BASELINE = "deeplabv3_resnet101"
NUM_CLASSES = 21

_peaks = {}
_times = {}


def build_seg_case(mode: str, model_name: str, device: str):
    """Build ``model_name`` and inputs for ``mode`` ("train" or "msflip"); returns a callable running it once."""
    import torch.nn.functional as F

    from aream_fast.stage2.inference import multiscale_flip_probs
    from aream_fast.stage2.seg_models import build_seg_model

    torch.manual_seed(0)
    model = build_seg_model(model_name, NUM_CLASSES).to(device)
    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        images = torch.randn(BATCH, 3, SIZE, SIZE, device=device)
        masks = torch.randint(0, NUM_CLASSES, (BATCH, SIZE, SIZE), device=device)
        masks[:, :8] = 255

        def run():
            loss = F.cross_entropy(model(images), masks, ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if _CUDA:
                torch.cuda.synchronize()
    else:
        model.eval()
        image = torch.randn(1, 3, SIZE, SIZE, device=device)

        def run():
            multiscale_flip_probs(model, image, SCALES, flip=True)
            if _CUDA:
                torch.cuda.synchronize()
    return run


def _peak(mode: str, model_name: str, device: str):
    return _memory.cached_peak(_peaks, (mode, model_name), build_seg_case,
                               dict(mode=mode, model_name=model_name, device=device), timeout=1800)


@pytest.mark.parametrize("mode", ("train", "msflip"))
@pytest.mark.parametrize("model_name", MODELS)
def test_bench_seg(benchmark, device, mode, model_name):
    what = f"train step B={BATCH}" if mode == "train" else f"MS+flip {len(SCALES)} scales B=1"
    benchmark.group = f"segmentation {what}, {SIZE}px"
    info = benchmark.extra_info
    info.update(_memory.machine_info())
    info.update(mode=mode, model=model_name, size=SIZE, batch=BATCH if mode == "train" else 1, scales=SCALES)
    mem = _peak(mode, model_name, device)
    if mem["status"] != "ok":
        pytest.fail(f"{model_name} {mode}: {mem['status']} ({mem.get('note')})")
    info["peak_mem_mib"] = mem["peak_mem_mib"]
    base = _peaks.get((mode, BASELINE))
    run = build_seg_case(mode, model_name, device)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _times[(mode, model_name)] = stats.stats.median
    if base is None:
        base = _peak(mode, BASELINE, device)
    if base.get("peak_mem_mib"):
        info["mem_vs_baseline"] = round(mem["peak_mem_mib"] / base["peak_mem_mib"], 3)
    if (mode, BASELINE) in _times and (mode, model_name) in _times:
        info["time_vs_baseline"] = round(_times[(mode, model_name)] / _times[(mode, BASELINE)], 3)
    print(f"\n{model_name} {mode}: median {_times.get((mode, model_name))} s, peak {mem['peak_mem_mib']} MiB, "
          f"vs {BASELINE}: mem {info.get('mem_vs_baseline')}, time {info.get('time_vs_baseline')}")
