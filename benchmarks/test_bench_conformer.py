"""Conformer-S AReAM training step at 384 px (docs/semantics.md, "Conformer", "Affinity loss", "CAM refinement",
"Memory" Conformer paragraph), side by side:

* ``official`` -- ``aream_fast.official.conformer``: every block returns its (B, H, N, N) logits, the forward
  stacks all 12 with grad; pseudo labels from a separate no-grad forward of [x_s; flip(x_s)] at scales
  0.5 / 1 / 1.5 that stacks, softmaxes and head-averages (L, 2B, H, N, N) and builds dense (2B, P, P) R;
  the per-image PAR loop; dense (B, P, P) affinity and loss;
* ``ours``     -- ``Conformer`` with fused attention: pseudo labels by ``conformer_patch_labels`` (attention-apply
  refinement, one batched PAR, crop box), ``aream_loss`` on the q, k of layers 9..11;
* ``cls-only`` -- the same model and step with the classification losses only (no AReAM): the floor.

Every mode: forward, L = MLSM(cnn) + MLSM(att) [+ 0.1 L_aff], backward, AdamW step (official param groups),
train mode, drop_path 0.1, same weights (seed 0), K = 20, one crop box with 64 px of padding on the right.

Time: pytest-benchmark (``benchmark.pedantic``, AREAM_BENCH_CONFORMER_ROUNDS rounds after one warm-up).
Peak memory: fresh spawned process per mode (``memory.peak_memory_spawn``: peak RSS above the post-build RSS
on CPU, max_memory_allocated on CUDA), over one warm-up and one measured step. Ratios against ``official``
and ``cls-only`` of the same session are in ``benchmark.extra_info`` and printed.

Sizes: AREAM_BENCH_CONFORMER_SIZE (384), AREAM_BENCH_CONFORMER_BATCH (CPU 1, CUDA 8 = the official batch).
Run: ``.venv/bin/python -m pytest benchmarks/test_bench_conformer.py --benchmark-only -s``
"""
import os

import pytest
import torch

from benchmarks import memory

_CUDA = torch.cuda.is_available()
SIZE = int(os.environ.get("AREAM_BENCH_CONFORMER_SIZE", 384))
BATCH = int(os.environ.get("AREAM_BENCH_CONFORMER_BATCH", 8 if _CUDA else 1))
ROUNDS = int(os.environ.get("AREAM_BENCH_CONFORMER_ROUNDS", 10 if _CUDA else 2))
NUM_CLASSES = 20
MODES = ("official", "cls-only", "ours")  # the references first: the ratios refer to them

_peaks = {}
_times = {}


def build_conformer_case(mode: str, size: int, batch: int, device: str):
    """Model, optimiser and one batch for ``mode``; returns a callable running one training step."""
    import torch.nn.functional as F

    from aream_fast import PAR, AttentionRequest, aream_loss, build_model
    from aream_fast.official.pseudo_labels import OfficialPAR
    from aream_fast.pseudo_labels.conformer import conformer_layers, conformer_param_groups, conformer_patch_labels
    from aream_fast.official.conformer import OfficialConformer, official_conformer_training_step

    torch.manual_seed(0)
    model = build_model("conformer_small", NUM_CLASSES, img_size=size, drop_path=0.1).to(device).train()
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.zeros(batch, NUM_CLASSES, device=device)
    labels[:, 3] = 1.0
    labels[0, 14] = 1.0
    img_box = torch.tensor([[0, size, 0, size - 64]] * batch)
    supervised, _ = conformer_layers(model.depth, 9)
    if mode == "official":
        model = OfficialConformer.from_model(model)
        par = OfficialPAR().to(device)
    else:
        par = PAR().to(device)
    optimizer = torch.optim.AdamW(conformer_param_groups(model, weight_decay=0.01, lr_scale=10.0), lr=5e-5)
    request = AttentionRequest(supervised_layers=supervised)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if mode == "official":
            terms = official_conformer_training_step(model, images, labels, par=par, img_box=img_box, layer_index=9)
        else:
            patch_labels = conformer_patch_labels(model, images, labels, par=par, img_box=img_box) \
                if mode == "ours" else None
            out = model(images, request if mode == "ours" else None)
            loss = F.multilabel_soft_margin_loss(out.class_logits, labels) + \
                F.multilabel_soft_margin_loss(out.patch_logits, labels)
            if mode == "ours":
                rec = out.records
                loss = loss + 0.1 * aream_loss([rec.qs[l] for l in supervised], [rec.ks[l] for l in supervised],
                                               patch_labels, scale=rec.scale, num_prefix_tokens=1)
            loss.backward()
            terms = {"loss": loss.detach()}
        optimizer.step()
        if _CUDA:
            torch.cuda.synchronize()
        return terms

    return step


def _peak(mode: str, device: str):
    return memory.cached_peak(_peaks, mode, build_conformer_case,
                              dict(mode=mode, size=SIZE, batch=BATCH, device=device), repeats=2)


@pytest.mark.parametrize("mode", MODES)
def test_bench_conformer_step(benchmark, device, mode):
    group = f"conformer_small train step B={BATCH} {SIZE}px (pseudo labels 0.5/1/1.5 + flip)"
    info = memory.start_benchmark(benchmark, group,
                                  mode=mode, size=SIZE, batch=BATCH, model="conformer_small", num_classes=NUM_CLASSES)
    mem = _peak(mode, device)
    if mem["status"] != "ok":
        pytest.fail(f"{mode} at {SIZE}px, batch {BATCH}: {mem['status']} ({mem.get('note')}); lower "
                    f"AREAM_BENCH_CONFORMER_SIZE / AREAM_BENCH_CONFORMER_BATCH")
    info["peak_mem_mib"] = mem["peak_mem_mib"]
    step = build_conformer_case(mode, SIZE, BATCH, device)
    terms = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert torch.isfinite(terms["loss"])
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _times[mode] = stats.stats.median
    for ref in ("official", "cls-only"):
        if _peaks.get(ref, {}).get("peak_mem_mib"):
            info[f"mem_vs_{ref}"] = round(mem["peak_mem_mib"] / _peaks[ref]["peak_mem_mib"], 3)
        if _times.get(ref) and mode in _times:
            info[f"time_vs_{ref}"] = round(_times[mode] / _times[ref], 3)
    print(f"\n[conformer bench] {mode:9s} {SIZE}px B={BATCH}  peak {mem['peak_mem_mib']:8.1f} MiB  "
          f"median {_times.get(mode, float('nan')):.3f} s  mem_vs_official {info.get('mem_vs_official')}  "
          f"time_vs_official {info.get('time_vs_official')}  mem_vs_cls {info.get('mem_vs_cls-only')}  "
          f"time_vs_cls {info.get('time_vs_cls-only')}")
