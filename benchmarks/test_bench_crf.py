"""Dense CRF: ours (aream_fast.stage2.dense_crf, permutohedral lattice in PyTorch) vs pydensecrf2, side by side.

500 x 375 image (H 375, W 500), 10 mean-field iterations, 21 and 3 labels, presets "cam" (3/3 + 80/13/10) and
"toco" (1/1 + 121/5/4); ours with 1 and 2 torch threads (pydensecrf is single-threaded), with the
appearance-free Gaussian lattice from its per-size cache (every image after the first of its size) and "cold"
(rebuilt every round); a batch of 16 images of different sizes with 2-4 labels each (the CAM-CRF case).
``extra_info`` holds the argmax agreement and max |dQ| with pydensecrf2 and the peak memory (RSS above the
post-import RSS of a fresh process).

    .venv/bin/python -m pytest benchmarks/test_bench_crf.py --benchmark-only --benchmark-columns=min,median,rounds
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from aream_fast.stage2 import CRF_PRESETS, dense_crf
from aream_fast.stage2.crf import _position_terms

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
from tests.stage2._crf_inputs import blocky_probs, pydensecrf_inference, synthetic_image  # noqa: E402

H, W = 375, 500
dcrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (the crf-oracle extra) is the baseline")

_PEAK = r"""
import json, sys, numpy as np, torch
sys.path.insert(0, {repo!r})
from tests.stage2._crf_inputs import synthetic_image, pydensecrf_inference
from aream_fast.stage2 import CRF_PRESETS, dense_crf


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


torch.set_num_threads({threads})
img, probs = synthetic_image({h}, {w}, {k}, seed=0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
base = status("VmRSS:")
if {impl!r} == "ours":
    dense_crf(img, probs, preset={preset!r})
else:
    pydensecrf_inference(img, probs, CRF_PRESETS[{preset!r}])
print(json.dumps((status("VmHWM:") - base) / 1024))
"""


def peak_mib(impl: str, preset: str, k: int, threads: int = 1) -> float:
    """Peak RSS (MiB) of one CRF above the RSS after imports and input creation, in a fresh process (Linux:
    the peak is reset through /proc/self/clear_refs)."""
    code = _PEAK.format(repo=_REPO, threads=threads, h=H, w=W, k=k, impl=impl, preset=preset)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("preset", ["cam", "toco"])
@pytest.mark.parametrize("k", [21, 3])
@pytest.mark.parametrize("impl", ["pydensecrf2", "ours-1thread", "ours-2threads", "ours-2threads-cold"])
def test_bench_crf_single(benchmark, impl, k, preset):
    img, probs = synthetic_image(H, W, k, seed=0)
    params = CRF_PRESETS[preset]
    benchmark.group = f"crf {W}x{H} K={k} {preset}"
    if impl == "pydensecrf2":
        q = benchmark.pedantic(pydensecrf_inference, args=(img, probs, params), rounds=3, iterations=1)
        benchmark.extra_info["peak_mem_mib"] = peak_mib("pydensecrf2", preset, k)
        return
    threads = 1 if impl == "ours-1thread" else 2
    torch.set_num_threads(threads)
    # "cold": the appearance-free Gaussian lattice is rebuilt every round (the first image of a size); otherwise
    # it comes from the per-size cache as for every later image of that size
    setup = _position_terms.clear if impl.endswith("cold") else None
    if setup is None:
        dense_crf(img, probs, preset=preset, iterations=0)  # fill the cache before the timed rounds
    q = benchmark.pedantic(dense_crf, args=(img, probs), kwargs=dict(preset=preset), setup=setup, rounds=3,
                           iterations=1)
    ref = pydensecrf_inference(img, probs, params)
    benchmark.extra_info["argmax_agreement"] = float((q.argmax(0) == ref.argmax(0)).mean())
    benchmark.extra_info["max_abs_dq"] = float(np.abs(q - ref).max())
    benchmark.extra_info["peak_mem_mib"] = peak_mib("ours", preset, k, threads)


def _batch(n: int = 16):
    """16 images around 500 x 375 (different sizes), each with 2-4 labels (present classes + background)."""
    rng = np.random.default_rng(1)
    images, probs = [], []
    for i in range(n):
        h, w = int(rng.integers(330, 376)), int(rng.integers(440, 501))
        img, _ = synthetic_image(h, w, 3, seed=i)
        images.append(img)
        probs.append(blocky_probs(h, w, int(rng.integers(2, 5)), rng))
    return images, probs


@pytest.mark.parametrize("impl", ["pydensecrf2", "ours-1thread", "ours-2threads"])
def test_bench_crf_batch16(benchmark, impl):
    images, probs = _batch()
    params = CRF_PRESETS["cam"]
    benchmark.group = "crf batch of 16 (~500x375, 2-4 labels) cam"
    if impl == "pydensecrf2":
        benchmark.pedantic(lambda: [pydensecrf_inference(i, p, params) for i, p in zip(images, probs)],
                           rounds=1, iterations=1)
    else:
        torch.set_num_threads(1 if impl == "ours-1thread" else 2)
        qs = benchmark.pedantic(dense_crf, args=(images, probs), kwargs=dict(preset="cam"), rounds=1, iterations=1)
        agree = [float((q.argmax(0) == pydensecrf_inference(i, p, params).argmax(0)).mean())
                 for q, i, p in zip(qs, images, probs)]
        benchmark.extra_info["min_argmax_agreement"] = min(agree)
    benchmark.extra_info["images_per_s"] = len(images) / benchmark.stats.stats.min
