"""Test-time inference: MS + flip against a plain per-scale loop, tiled against untiled, the CRF hook, and
scripts/infer_seg.py end to end (its mIoU recomputed independently from the PNGs it wrote)."""
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aream_fast.stage2 as stage2
from aream_fast.data import read_mask
from aream_fast.stage2 import build_seg_model
from aream_fast.stage2.inference import (_windows, crf_refine, multiscale_flip_probs, predict_logits,
                                         sliding_window_logits)
from aream_fast.stage2.seg_models import save_seg_checkpoint

TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, head_channels=16)
REPO = Path(__file__).resolve().parents[2]


def _reference(model, x, scales, flip, combine):
    """The rule of the inference module docstring, written as a plain loop."""
    h, w = x.shape[-2:]
    per_scale = []
    for s in scales:
        xs = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
        logits = model(xs)
        if flip:
            logits = (logits + model(xs.flip(-1)).flip(-1)) / 2
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        per_scale.append(logits.softmax(1))
    stack = torch.stack(per_scale)
    if combine == "max":
        p = stack.max(0).values
        return p / p.sum(1, keepdim=True)
    return stack.mean(0)


@pytest.mark.parametrize("combine, flip", [("max", True), ("mean", False)])
def test_multiscale_flip_equals_per_scale_loop(combine, flip):
    model = build_seg_model("vit_small_largefov", 4, **TINY_VIT).eval()
    x = torch.randn(2, 3, 29, 35)
    scales = (0.5, 0.75, 1.0, 1.25, 1.5)
    with torch.no_grad():
        ref = _reference(model, x, scales, flip, combine)
    out = multiscale_flip_probs(model, x, scales, flip=flip, combine=combine)
    assert out.shape == (2, 4, 29, 35)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 29, 35))


def test_single_scale_no_flip_is_softmax():
    model = build_seg_model("vit_small_aspp", 3, **TINY_VIT).eval()
    x = torch.randn(1, 3, 20, 44)
    with torch.no_grad():
        ref = model(x).softmax(1)
    torch.testing.assert_close(multiscale_flip_probs(model, x, (1.0,), flip=False), ref)


class _LocalNet(nn.Module):
    """Two 3x3 convolutions (receptive-field radius 2), stride 1: tiled inference is exact for it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 5, 3, padding=1)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("hw, tile, overlap", [((37, 53), 16, 4), ((40, 40), 16, 6), ((16, 70), 16, 8),
                                               ((9, 11), 16, 4)])
def test_tiled_equals_untiled(hw, tile, overlap):
    net = _LocalNet()
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    net = net.double()
    with torch.no_grad():
        ref = net(x)
        net.sizes.clear()
        out = sliding_window_logits(net, x, tile=tile, overlap=overlap)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert all(h <= tile and w <= tile for h, w in net.sizes)  # memory bound: never more than a tile
    if hw[0] * hw[1] > tile * tile:
        assert len(net.sizes) > 1


def test_tiles_too_small_an_overlap_differ():
    """The exactness above is not vacuous: with overlap 0 the window edges change the logits."""
    net = _LocalNet().double()
    x = torch.randn(1, 3, 37, 53, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(sliding_window_logits(net, x, tile=16, overlap=0), net(x))


def test_windows_partition():
    for length in range(1, 90):
        for tile, overlap in ((16, 4), (16, 8), (20, 3)):
            wins = _windows(length, tile, overlap)
            keep = np.zeros(length, int)
            for s, e, ks, ke in wins:
                assert 0 <= s <= ks <= ke <= e <= length and e - s <= tile
                keep[ks:ke] += 1
                if s > 0:
                    assert ks - s >= overlap // 2
                if e < length:
                    assert e - ke >= overlap // 2
            assert (keep == 1).all()


def test_multiscale_tiles_above_pixel_budget():
    net = _LocalNet().double().eval()
    x = torch.randn(1, 3, 30, 30, dtype=torch.float64)
    untiled = multiscale_flip_probs(net, x, (1.0, 1.5), max_pixels=None)
    net.sizes.clear()
    tiled = multiscale_flip_probs(net, x, (1.0, 1.5), max_pixels=900, tile=16, overlap=4)
    areas = [h * w for h, w in net.sizes]
    assert max(areas) == 900 and min(areas) <= 16 * 16  # 30 x 30 ran whole, 45 x 45 (scale 1.5) as tiles
    torch.testing.assert_close(tiled.float(), untiled.float())
    assert predict_logits(net, x, max_pixels=899, tile=16, overlap=4).shape == (1, 5, 30, 30)


@pytest.mark.parametrize("kwargs, match", [(dict(scales=()), "scales"), (dict(scales=(1.0, 0)), "scales"),
                                           (dict(combine="sum"), "combine")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        multiscale_flip_probs(_LocalNet(), torch.randn(1, 3, 8, 8), **kwargs)
    with pytest.raises(ValueError, match="images"):
        multiscale_flip_probs(_LocalNet(), torch.randn(3, 8, 8))


def test_crf_hook_calls_dense_crf(monkeypatch):
    """crf_refine imports aream_fast.stage2.dense_crf lazily and passes image, probs, preset and overrides."""
    calls = []

    def fake_dense_crf(image, probs, *, preset="cam", iterations=10, **overrides):
        calls.append((image.shape, tuple(probs.shape), preset, iterations, overrides))
        return probs.flip(0)

    fake = types.ModuleType("aream_fast.stage2.crf")
    fake.dense_crf = fake_dense_crf
    monkeypatch.setitem(sys.modules, "aream_fast.stage2.crf", fake)
    monkeypatch.delattr(stage2, "dense_crf", raising=False)
    probs = torch.rand(3, 6, 7)
    image = np.zeros((6, 7, 3), np.uint8)
    out = crf_refine(image, probs, "seg_toco", iterations=4)
    assert torch.equal(out, probs.flip(0))
    assert calls == [((6, 7, 3), (3, 6, 7), "seg_toco", 4, {})]
    with pytest.raises(ValueError, match="uint8"):
        crf_refine(image.astype(np.float32), probs, "seg_toco")
    with pytest.raises(ValueError, match="probs"):
        crf_refine(image, probs[:, :5], "seg_toco")


@pytest.mark.skipif(importlib.util.find_spec("aream_fast.stage2.crf") is None,
                    reason="aream_fast/stage2/crf.py (dense_crf) is not on this branch yet")
def test_crf_refine_real():
    from aream_fast.stage2 import CRF_PRESETS

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    probs = torch.softmax(torch.randn(3, 12, 10), 0)
    out = crf_refine(image, probs, sorted(CRF_PRESETS)[0])
    assert out.shape == (3, 12, 10) and torch.isfinite(torch.as_tensor(out)).all()


def test_infer_seg_script(tiny_synthetic, tmp_path):
    """infer_seg.py writes one PNG per image and a report whose mIoU equals a recomputation from the PNGs."""
    spec = importlib.util.spec_from_file_location("infer_seg", REPO / "scripts" / "infer_seg.py")
    infer_seg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer_seg)
    model = build_seg_model("vit_small_largefov", 7, **TINY_VIT)
    ckpt = tmp_path / "seg.pth"
    save_seg_checkpoint(ckpt, model)
    out = tmp_path / "pred"
    results = infer_seg.main(["--checkpoint", str(ckpt), "--dataset", "synthetic", "--data-root",
                              str(tiny_synthetic), "--splits", "val", "train", "--out", str(out), "--scales", "0.75",
                              "1.0", "--no-progress", "--limit", "3"])
    assert [r["split"] for r in results] == ["val", "train"]
    for split in ("val", "train"):
        rep = json.loads((out / f"report_{split}.json").read_text())
        assert rep["scales"] == [0.75, 1.0] and rep["flip"] is True and rep["crf_preset"] is None
        assert rep["checkpoint"]["path"] == str(ckpt.resolve()) and len(rep["checkpoint"]["sha256"]) == 64
        names = (tiny_synthetic / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:3]
        inter = np.zeros(7)
        union = np.zeros(7)
        for n in names:  # independent IoU: per-class intersection / union over non-ignored pixels
            pred = read_mask(out / split / f"{n}.png").astype(int)
            gt = read_mask(tiny_synthetic / "SegmentationClassAug" / f"{n}.png").astype(int)
            valid = gt != 255
            for c in range(7):
                inter[c] += np.sum((pred == c) & (gt == c) & valid)
                union[c] += np.sum(((pred == c) | (gt == c)) & valid)
        iou = inter / (union + 1e-10)
        assert rep["num_images"] == 3
        np.testing.assert_allclose(list(rep["per_class_iou"].values()), iou, atol=1e-9)
        assert rep["miou"] == pytest.approx(iou.mean(), abs=1e-9)
