"""Full AReAM training step (forward, pseudo labels, loss, backward, AdamW step), side by side:

* ``official``   -- the official formulation (aream_fast.official), same weights as ours;
* ``ours``       -- default path (pseudo labels from a separate no-grad forward with flip);
* ``ours-reuse`` -- ``--pseudo-from-forward`` (pseudo labels from the training forward's records);
* ``cls-only``      -- the same step with no AReAM (fused attention, classification losses only).

Time: pytest-benchmark (``benchmark.pedantic``, CUDA synchronised inside the timed call). Peak memory: one
fresh subprocess per mode (``memory.step_peak_memory``): ``peak_mem_mib`` (CPU peak RSS above the post-build
RSS, AdamW state included; CUDA max_memory_allocated) and ``step_peak_mib`` (one steady-state step: CPU live
tensors from torch.profiler, CUDA max_memory_allocated above the step's start), stored in
``benchmark.extra_info`` with the ratios to the official and the cls-only step measured in the same session (time ratios against modes already run in this
session; the parametrisation runs the official step first and the cls-only step second).

Sizes (environment, defaults keep the whole benchmarks/ suite well under 15 min on a 2-core CPU):
AREAM_BENCH_STEP_SIZE (CPU 224, CUDA 448), AREAM_BENCH_STEP_BATCH (4), AREAM_BENCH_STEP_ROUNDS (CPU 2,
CUDA 10). Model: mct_deit_small (ViT-S MCTformer-V2, K = 20), supervised layers 7..11.
The large-size sweep (224..640 px) is benchmarks/profile_memory.py.
"""
import os

import pytest
import torch

from benchmarks import memory
from benchmarks.step_cases import DEFAULT_SUPERVISED_LAYERS, build_step_case

_CUDA = torch.cuda.is_available()
SIZE = int(os.environ.get("AREAM_BENCH_STEP_SIZE", 448 if _CUDA else 224))
BATCH = int(os.environ.get("AREAM_BENCH_STEP_BATCH", 4))
ROUNDS = int(os.environ.get("AREAM_BENCH_STEP_ROUNDS", 10 if _CUDA else 2))
MODEL = "mct_deit_small"
NUM_CLASSES = 20
# official and cls-only first: the other modes' time ratios refer to them
MODES = ("official", "cls-only", "ours", "ours-reuse")

_peaks = {}  # mode -> peak memory result (subprocess), shared by the parametrised cases
_times = {}  # mode -> median step time (s) measured in this session


def _peak(mode: str, device: str):
    if mode not in _peaks:
        _peaks[mode] = memory.step_peak_memory(mode, size=SIZE, batch=BATCH, model=MODEL, num_classes=NUM_CLASSES,
                                                supervised_layers=DEFAULT_SUPERVISED_LAYERS, steps=1, warmup=1,
                                                device=device)
    return _peaks[mode]


@pytest.mark.parametrize("mode", MODES)
def test_bench_train_step(benchmark, device, mode):
    info = memory.start_benchmark(benchmark, f"train_step {MODEL} B={BATCH} {SIZE}px", mode=mode, size=SIZE,
                                  batch=BATCH, model=MODEL, num_classes=NUM_CLASSES,
                                  supervised_layers=list(DEFAULT_SUPERVISED_LAYERS))
    mem = _peak(mode, device)
    info["memory_status"] = mem["status"]
    info["peak_mem_mib"] = mem.get("peak_mem_mib")  # CPU: peak RSS above post-build RSS (AdamW state included)
    info["step_peak_mib"] = mem.get("step_peak_mib")  # one steady-state step, live tensors above its start
    for ref in ("official", "cls-only"):
        ref_mem = _peak(ref, device)
        for key, name in (("peak_mem_mib", "mem"), ("step_peak_mib", "step_peak")):
            if mem.get(key) and ref_mem.get(key):
                info[f"{name}_vs_{ref.replace('-', '_')}"] = round(mem[key] / ref_mem[key], 3)
    if mem["status"] != "ok":
        pytest.fail(f"{mode} at {SIZE}px, batch {BATCH}: {mem['status']} ({mem['note']}); lower "
                    f"AREAM_BENCH_STEP_SIZE / AREAM_BENCH_STEP_BATCH")

    case = build_step_case(mode, model_name=MODEL, img_size=SIZE, batch=BATCH, num_classes=NUM_CLASSES,
                           device=device)

    def step():
        terms = case.step()
        if _CUDA:
            torch.cuda.synchronize()
        return terms

    terms = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert torch.isfinite(terms["loss"])
    if mode != "cls-only":
        assert "loss_aff" in terms and torch.isfinite(terms["loss_aff"])
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the step ran once, untimed
        return
    _times[mode] = stats.stats.median
    for ref in ("official", "cls-only"):
        if ref in _times and _times[ref] > 0:
            info[f"time_vs_{ref.replace('-', '_')}"] = round(_times[mode] / _times[ref], 3)
