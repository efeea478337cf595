"""PAR (docs/semantics.md, "PAR") against a straightforward per-pixel loop with clamped coordinates."""
import math

import numpy as np
import pytest
import torch

from aream_fast.pseudo_labels.par import PAR, par_offsets, position_weights

DIRS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def par_loop(img, masks, dilations, num_iters, w1=0.3, w2=0.01):
    """Reference written from docs/semantics.md, "PAR": float64 numpy, one pixel and one neighbour at a time."""
    img = np.asarray(img, np.float64)
    m = np.asarray(masks, np.float64).copy()
    C, H, W = img.shape
    offs = [(d * dy, d * dx) for d in dilations for dy, dx in DIRS]
    dist = np.array([d * (math.sqrt(2) if dy and dx else 1.0) for d in dilations for dy, dx in DIRS])
    p = -((dist / (dist.std(ddof=1) + 1e-8) / w1) ** 2)
    beta = np.exp(p - p.max()) / np.exp(p - p.max()).sum()
    Wt = np.zeros((H, W, len(offs)))
    for i in range(H):
        for j in range(W):
            nb = [(min(max(i + dy, 0), H - 1), min(max(j + dx, 0), W - 1)) for dy, dx in offs]
            a = np.zeros(len(offs))
            for c in range(C):
                vals = np.array([img[c, y, x] for y, x in nb])
                sd = vals.std(ddof=1)
                a += -((np.abs(vals - img[c, i, j]) / (sd + 1e-8) / w1) ** 2)
            a /= C
            alpha = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
            Wt[i, j] = alpha + w2 * beta
    for _ in range(num_iters):
        new = np.zeros_like(m)
        for i in range(H):
            for j in range(W):
                for k, (dy, dx) in enumerate(offs):
                    y, x = min(max(i + dy, 0), H - 1), min(max(j + dx, 0), W - 1)
                    new[:, i, j] += Wt[i, j, k] * m[:, y, x]
        m = new
    return m


def test_position_kernel_numbers():
    beta = position_weights((1, 2, 4, 8, 12, 24)).numpy()
    dist = np.array([d * (math.sqrt(2) if dy and dx else 1.0) for d in (1, 2, 4, 8, 12, 24) for dy, dx in DIRS])
    assert dist.std(ddof=1) == pytest.approx(9.9003, abs=1e-4)
    b = beta.reshape(6, 8)  # per dilation: diag, axis, diag, axis, axis, diag, axis, diag
    diag, axis = [0, 2, 5, 7], [1, 3, 4, 6]
    for d, (bd, ba) in enumerate([(0.0683, 0.0765), (0.0346, 0.0544), (0.0023, 0.0140)]):
        np.testing.assert_allclose(b[d, diag], bd, atol=1e-4)
        np.testing.assert_allclose(b[d, axis], ba, atol=1e-4)
    assert b[3].max() < 6.1e-5 and b[4:].max() < 1e-8  # position weights: ≤6e-5 at d=8, ≈0 at d=12, 24
    assert beta.sum() == pytest.approx(1.0, abs=1e-6)
    assert par_offsets((1,))[:3] == [(-1, -1), (-1, 0), (-1, 1)]


def test_weights_sum_to_one_plus_w2():
    par = PAR()
    w = par.affinity(torch.rand(2, 3, 7, 9))
    assert w.shape == (2, 48, 7, 9)
    torch.testing.assert_close(w.sum(1), torch.full((2, 7, 9), 1.01), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dilations,iters", [((1, 2, 4, 8, 12, 24), 3), ((1, 3), 2)])
def test_par_matches_loop(dilations, iters):
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(2, 3, 9, 11, generator=g)
    imgs[1, :, :4] = 0.2  # flat region: std 0 in parts of the neighbourhood
    masks = torch.rand(2, 4, 9, 11, generator=g)
    out = PAR(dilations, iters)(imgs, masks)
    for b in range(2):
        ref = par_loop(imgs[b].numpy(), masks[b].numpy(), dilations, iters)
        np.testing.assert_allclose(out[b].numpy(), ref, rtol=2e-5, atol=1e-6)


def test_par_batched_equals_per_image_and_per_channel():
    par = PAR()
    imgs, masks = torch.rand(3, 3, 12, 10), torch.rand(3, 5, 12, 10)
    out = par(imgs, masks)
    for b in range(3):
        for c in (0, 4):
            torch.testing.assert_close(out[b:b + 1, c:c + 1], par(imgs[b:b + 1], masks[b:b + 1, c:c + 1]))


@pytest.mark.parametrize("chunk_bytes", [1, 48 * 12 * 10 * 4 * 2])  # one image, then two images per chunk
def test_par_chunked_batch_equals_whole_batch(chunk_bytes):
    g = torch.Generator().manual_seed(2)
    imgs, masks = torch.rand(5, 3, 12, 10, generator=g), torch.rand(5, 4, 12, 10, generator=g)
    whole = PAR(num_iters=3, chunk_bytes=1 << 30)(imgs, masks)
    chunked = PAR(num_iters=3, chunk_bytes=chunk_bytes)(imgs, masks)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    for b in range(5):  # and against the per-image loop reference
        ref = par_loop(imgs[b].numpy(), masks[b].numpy(), (1, 2, 4, 8, 12, 24), 3)
        np.testing.assert_allclose(chunked[b].numpy(), ref, rtol=2e-5, atol=1e-6)


def test_par_does_not_modify_its_inputs():
    imgs, masks = torch.rand(2, 3, 9, 9), torch.rand(2, 3, 9, 9)
    imgs0, masks0 = imgs.clone(), masks.clone()
    PAR(num_iters=4)(imgs, masks)  # ping-pong buffers must never reuse the caller's mask tensor
    assert torch.equal(imgs, imgs0) and torch.equal(masks, masks0)


def test_par_bad_input():
    par = PAR()
    with pytest.raises(ValueError, match="share batch"):
        par(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        par(torch.rand(3, 8, 8), torch.rand(1, 2, 8, 8))
