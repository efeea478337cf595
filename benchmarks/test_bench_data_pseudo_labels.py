"""Pseudo labels from CAMs (docs/semantics.md, "Pseudo labels", "PAR", "Patch labels": bg scores 0.35 / 0.55, PAR,
fusion, per-patch labels), side by side:

* ``official-loop`` -- the official formulation: ``cam_to_seg`` called once per bg score, a Python loop over
  images selecting each image's channels, and the official-style PAR (per-dilation replicate pad + one-hot
  dilated conv, all 48 neighbours stacked into (B, C, 48, H, W) for both the affinity and every propagation
  round), full-resolution upsample + argmax, then the nearest per-patch rule;
* ``ours`` -- ``aream_fast.pseudo_labels.labels.cams_to_patch_labels(sample_only=True)``: both scores and all images
  in one PAR pass over a packed channel list, shifted slices of one padded tensor, P sample points only.

Case: K = 20 (VOC), 2 present classes per image, 224 px (AREAM_BENCH_PL_SIZE), batch AREAM_BENCH_PL_BATCH
(default 64 on CUDA, 4 on CPU). Both give identical patch labels (checked before timing).

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_data_pseudo_labels.py --benchmark-only``
"""
import os

import pytest
import torch
import torch.nn.functional as F

from aream_fast.data.transforms import denormalize
from aream_fast.pseudo_labels.par import PAR
from aream_fast.pseudo_labels.labels import cams_to_patch_labels

_CUDA = torch.cuda.is_available()
SIZE = int(os.environ.get("AREAM_BENCH_PL_SIZE", 224))
BATCH = int(os.environ.get("AREAM_BENCH_PL_BATCH", 64 if _CUDA else 4))
K = 20


class OfficialStylePAR(torch.nn.Module):
    """PAR (docs/semantics.md, "PAR") written the way the official module computes it (stacked 48-neighbour tensors)."""

    def __init__(self, dilations=(1, 2, 4, 8, 12, 24), num_iters=10, w1=0.3, w2=0.01):
        super().__init__()
        self.dilations, self.num_iters, self.w1, self.w2 = dilations, num_iters, w1, w2
        kernel = torch.zeros(8, 1, 3, 3)
        for i, (y, x) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
            kernel[i, 0, y, x] = 1.0
        self.register_buffer("kernel", kernel)
        diag = torch.tensor([2 ** 0.5, 1, 2 ** 0.5, 1, 1, 2 ** 0.5, 1, 2 ** 0.5])
        self.register_buffer("pos", torch.cat([diag * d for d in dilations]).view(1, 1, -1, 1, 1))

    def neighbours(self, x):
        b, c, h, w = x.shape
        out = []
        for d in self.dilations:
            p = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
            out.append(F.conv2d(p, self.kernel, dilation=d).view(b, c, 8, h, w))
        return torch.cat(out, dim=2)

    def forward(self, imgs, masks):
        b, c, h, w = imgs.shape
        n = self.neighbours(imgs)
        aff = -((torch.abs(n - imgs.unsqueeze(2)) / (n.std(dim=2, keepdim=True) + 1e-8) / self.w1) ** 2)
        aff = aff.mean(dim=1, keepdim=True)
        pos = self.pos.expand(b, 1, -1, h, w)
        pos_aff = -((pos / (pos.std(dim=2, keepdim=True) + 1e-8) / self.w1) ** 2)
        aff = F.softmax(aff, dim=2) + self.w2 * F.softmax(pos_aff, dim=2)
        for _ in range(self.num_iters):
            masks = (self.neighbours(masks) * aff).sum(2)
        return masks


def official_patch_labels(images, cams, labels, par):
    imgs_d = denormalize(images)
    B, _, H, W = images.shape
    segs = []
    for score in (0.35, 0.55):
        keys = torch.cat([torch.ones(B, 1, device=labels.device), labels], dim=1)
        c = torch.cat([torch.full((B, 1, H, W), score, device=cams.device), cams], dim=1)
        imgs = F.interpolate(imgs_d, size=(H // 2, W // 2), mode="bilinear", align_corners=False)
        c = F.interpolate(c, size=(H // 2, W // 2), mode="bilinear", align_corners=False)
        seg = torch.full((B, H, W), 255, dtype=torch.int64, device=cams.device)
        for b in range(B):
            key = torch.nonzero(keys[b])[:, 0]
            ref = par(imgs[b:b + 1], c[b:b + 1, key].softmax(1))
            ref = F.interpolate(ref, size=(H, W), mode="bilinear", align_corners=False)
            seg[b] = key[ref.argmax(1)][0]
        segs.append(seg)
    seg_l, seg_h = segs
    seg = seg_h.clone()
    seg[seg_h == 0] = 255
    seg[(seg_h == 0) & (seg_l == 0)] = 0
    return seg[:, ::16, ::16].reshape(B, -1)


def _case(device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    cams = F.interpolate(torch.rand(BATCH, K, SIZE // 16, SIZE // 16, generator=g), size=(SIZE, SIZE),
                         mode="bilinear", align_corners=False)
    labels = torch.zeros(BATCH, K)
    for b in range(BATCH):
        labels[b, torch.randperm(K, generator=g)[:2]] = 1.0
    return images.to(device), (cams * labels[:, :, None, None]).to(device), labels.to(device)


@pytest.mark.parametrize("provider", ["official-loop", "ours"])
def test_bench_pseudo_labels(benchmark, provider, device):
    images, cams, labels = _case(device)
    official_par, par = OfficialStylePAR().to(device), PAR().to(device)

    def run():
        with torch.no_grad():
            if provider == "official-loop":
                out = official_patch_labels(images, cams, labels, official_par)
            else:
                out = cams_to_patch_labels(images, cams, labels, par=par, sample_only=True)[1]
        if _CUDA:
            torch.cuda.synchronize()
        return out

    out = run()
    with torch.no_grad():
        ref = cams_to_patch_labels(images, cams, labels, par=par)[1]
    assert (out != ref).float().mean() < 1e-3  # float-rounding near-ties only
    benchmark.extra_info.update(batch=BATCH, size=SIZE, num_classes=K, device=device)
    benchmark.pedantic(run, rounds=3 if _CUDA else 1, iterations=1, warmup_rounds=1 if _CUDA else 0)
