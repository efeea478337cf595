"""cams_to_patch_labels (docs/semantics.md, "Pseudo labels", "Patch labels") against a per-image loop written like the
official cam_to_seg."""
import pytest
import torch
import torch.nn.functional as F

from aream_fast.data.transforms import denormalize
from aream_fast.pseudo_labels.par import PAR
from aream_fast.pseudo_labels.labels import cams_to_patch_labels, fuse_segs


def cam_to_seg_loop(par, imgs_d, labels, cams, score):
    """Official-style: bg channel = score, half-res, per-image channel selection + softmax, PAR, upsample,
    argmax, map through the key list."""
    B, _, H, W = imgs_d.shape
    keys = torch.cat([torch.ones(B, 1), labels], dim=1)
    cams = torch.cat([torch.full((B, 1, H, W), score), cams], dim=1)
    size = [int(H / 2), int(W / 2)]
    imgs = F.interpolate(imgs_d, size=size, mode="bilinear", align_corners=False)
    cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
    segs = torch.full((B, H, W), 255, dtype=torch.int64)
    for b in range(B):
        key = torch.nonzero(keys[b])[:, 0]
        cam = cams[b:b + 1, key].softmax(1)
        ref = F.interpolate(par(imgs[b:b + 1], cam), size=[H, W], mode="bilinear", align_corners=False)
        segs[b] = key[ref.argmax(1)][0]
    return segs


def reference(images, cams, labels, par, patch_size=16):
    imgs_d = denormalize(images)
    seg_l = cam_to_seg_loop(par, imgs_d, labels, cams, 0.35)
    seg_h = cam_to_seg_loop(par, imgs_d, labels, cams, 0.55)
    seg = seg_h.clone()
    seg[seg_h == 0] = 255
    seg[(seg_h + seg_l) == 0] = 0
    # official seg_to_aff nearest rule: pixel (16i, 16j), inlined so this test does not depend on LOSS code
    patch = seg[:, ::patch_size, ::patch_size].reshape(seg.shape[0], -1)
    return seg, patch


def smooth_cams(B, K, H, W, g):
    low = torch.rand(B, K, H // 16, W // 16, generator=g)
    return F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("shape", [(3, 4, 64, 48), (2, 20, 32, 32)])
def test_matches_official_loop(shape):
    B, K, H, W = shape
    g = torch.Generator().manual_seed(3)
    images = torch.randn(B, 3, H, W, generator=g)
    cams = smooth_cams(B, K, H, W, g)
    labels = (torch.rand(B, K, generator=g) < 0.4).float()
    labels[0] = 0
    labels[0, 1] = 1
    labels[-1] = 0  # an image with no foreground label: all background
    cams = cams * labels[:, :, None, None]
    par = PAR(num_iters=4)
    seg, patch = cams_to_patch_labels(images, cams, labels, par=par)
    seg_ref, patch_ref = reference(images, cams, labels, par)
    assert seg.dtype == torch.int64 and patch.dtype == torch.int64
    assert patch.shape == (B, (H // 16) * (W // 16))
    assert torch.equal(seg, seg_ref)
    assert torch.equal(patch, patch_ref)
    assert (seg[-1] == 0).all()
    assert set(seg.unique().tolist()) <= {0, 255} | {k + 1 for k in range(K)}
    none, patch_s = cams_to_patch_labels(images, cams, labels, par=par, sample_only=True)
    assert none is None and torch.equal(patch_s, patch_ref)


def test_absent_class_values_are_ignored():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    cams = smooth_cams(2, 3, 32, 32, g)
    par = PAR(num_iters=2)
    seg, patch = cams_to_patch_labels(images, cams * labels[:, :, None, None], labels, par=par)
    seg2, patch2 = cams_to_patch_labels(images, cams, labels, par=par)  # absent channels not zeroed
    assert torch.equal(seg, seg2) and torch.equal(patch, patch2)
    assert not (seg[0] == 2).any() and not ((seg[1] != 0) & (seg[1] != 2) & (seg[1] != 255)).any()


@pytest.mark.parametrize("sample_only", [False, True])
def test_batch_without_any_label_is_all_background(sample_only):
    seg, patch = cams_to_patch_labels(torch.randn(2, 3, 32, 32), torch.rand(2, 4, 32, 32), torch.zeros(2, 4),
                                      par=PAR(num_iters=1), sample_only=sample_only)
    assert (patch == 0).all() and patch.shape == (2, 4)
    assert sample_only or (seg == 0).all()


def test_fusion_rule():
    seg_h = torch.tensor([[[0, 0, 3, 2]]])
    seg_l = torch.tensor([[[0, 1, 3, 0]]])
    assert fuse_segs(seg_l, seg_h).tolist() == [[[0, 255, 3, 2]]]


@pytest.mark.parametrize("sample_only", [False, True])
def test_present_only_cams_give_the_same_labels(sample_only):
    from aream_fast.pseudo_labels.cam import PresentCAMs, present_classes

    B, K, H, W = 3, 6, 48, 32
    g = torch.Generator().manual_seed(8)
    images = torch.randn(B, 3, H, W, generator=g)
    cams = smooth_cams(B, K, H, W, g)
    labels = torch.zeros(B, K)
    labels[0, [1, 4]] = 1
    labels[1, 5] = 1  # image 2: no class at all
    classes, valid = present_classes(labels)
    assert classes.tolist() == [[1, 4], [5, 0], [0, 0]] and valid.tolist() == [[1, 1], [1, 0], [0, 0]]
    packed = cams.gather(1, classes[:, :, None, None].expand(-1, -1, H, W)) * valid[:, :, None, None]
    par = PAR(num_iters=3)
    seg, patch = cams_to_patch_labels(images, cams, labels, par=par, sample_only=sample_only)
    seg_p, patch_p = cams_to_patch_labels(images, PresentCAMs(packed, classes, valid), labels, par=par,
                                          sample_only=sample_only)
    assert torch.equal(patch_p, patch) and (seg is None) == (seg_p is None)
    if seg is not None:
        assert torch.equal(seg_p, seg)
    with pytest.raises(ValueError, match="classes and valid"):
        cams_to_patch_labels(images, PresentCAMs(packed, classes[:, :1], valid), labels, par=par)


def test_bad_shapes():
    par = PAR(num_iters=1)
    with pytest.raises(ValueError, match="labels must be"):
        cams_to_patch_labels(torch.zeros(1, 3, 32, 32), torch.zeros(1, 4, 32, 32), torch.zeros(1, 3), par=par)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        cams_to_patch_labels(torch.zeros(1, 3, 40, 32), torch.zeros(1, 4, 40, 32), torch.zeros(1, 4), par=par)
    with pytest.raises(ValueError, match="cams"):
        cams_to_patch_labels(torch.zeros(1, 3, 32, 32), torch.zeros(1, 4, 16, 32), torch.zeros(1, 4), par=par)
    with pytest.raises(ValueError, match="labels must be a torch.Tensor"):
        cams_to_patch_labels(torch.zeros(1, 3, 32, 32), torch.zeros(1, 4, 32, 32), [[1, 0, 0, 0]], par=par)
    with pytest.raises(ValueError, match="patch_size"):
        cams_to_patch_labels(torch.zeros(1, 3, 32, 32), torch.zeros(1, 4, 32, 32), torch.zeros(1, 4), par=par,
                             patch_size=0)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 64, 64, generator=g)
    cams = smooth_cams(2, 5, 64, 64, g)
    labels = (torch.rand(2, 5, generator=g) < 0.5).float()
    par = PAR(num_iters=3)
    seg, patch = cams_to_patch_labels(images, cams, labels, par=par)
    seg_c, patch_c = cams_to_patch_labels(images.cuda(), cams.cuda(), labels.cuda(), par=par.cuda())
    assert (seg_c.cpu() != seg).float().mean() < 1e-3 and (patch_c.cpu() != patch).float().mean() < 1e-2
    _, patch_s = cams_to_patch_labels(images.cuda(), cams.cuda(), labels.cuda(), par=par, sample_only=True)
    assert torch.equal(patch_s.cpu(), patch_c.cpu())
