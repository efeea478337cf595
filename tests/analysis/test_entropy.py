"""Entropy layer weights (docs/semantics.md, "Entropy layer weights") against an eager re-implementation of the
official ent_voc_mctformer.py loop."""
import math

import numpy as np
import pytest
import torch

from aream_fast.analysis.entropy import (EntropyAccumulator, entropy_to_layer_weights, layer_entropies, load_entropy,
                                normalise_entropy, save_entropy, spatial_entropy)


def official_entropy_eager(qs, ks, cam, labels, num_prefix_tokens, scale):
    """The official per-image loop, on materialised attention (Jessie459/AReAM ent_voc_mctformer.py):
    att = stack(Z).softmax(-1).mean(heads); pat_att = att[l][:, C:, C:];
    new_cam = einsum("bmn,bcn->bcm", pat_att, cam_v); prob = new_cam[0].sum(0).softmax(0); -sum(prob log2 prob)."""
    z = torch.stack([torch.matmul(q, k.transpose(-2, -1)) * scale for q, k in zip(qs, ks)])  # L,B,H,N,N
    att = z.softmax(dim=-1).mean(2)
    valid = torch.nonzero(labels[0])[:, 0]
    cam_v = cam[:, valid]
    b, c, h, w = cam_v.shape
    out = []
    for index in range(len(qs)):
        pat_att = att[index][:, num_prefix_tokens:, num_prefix_tokens:]
        new_cam = torch.einsum("bmn,bcn->bcm", pat_att, cam_v.reshape(b, c, -1))
        prob = new_cam[0].sum(0).softmax(0)
        out.append(-torch.sum(prob * torch.log2(prob)))
    return torch.stack(out)


@pytest.mark.parametrize("num_prefix_tokens,grid,num_classes", [(5, (3, 4), 5), (1, (4, 4), 3)])
def test_layer_entropies_match_official_loop_random_qk(num_prefix_tokens, grid, num_classes):
    h_heads, d, n_layers = 3, 8, 4
    p = grid[0] * grid[1]
    n = num_prefix_tokens + p
    qs = [torch.randn(1, h_heads, n, d) for _ in range(n_layers)]
    ks = [torch.randn(1, h_heads, n, d) for _ in range(n_layers)]
    cam = torch.rand(1, num_classes, *grid) * 3
    labels = torch.zeros(1, num_classes)
    labels[0, 0] = 1
    labels[0, num_classes - 1] = 1
    scale = d ** -0.5
    got = layer_entropies(qs, ks, cam, labels, num_prefix_tokens=num_prefix_tokens, scale=scale)
    ref = official_entropy_eager(qs, ks, cam, labels, num_prefix_tokens, scale)
    assert got.shape == (n_layers,)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(got <= math.log2(p) + 1e-5)


def test_layer_entropies_match_official_loop_on_tiny_model():
    from aream_fast.models import build_model
    from aream_fast.models.records import AttentionRequest

    k_cls = 4
    model = build_model("mct_deit_small", num_classes=k_cls, img_size=32, drop_path=0.0,
                        embed_dim=24, depth=3, num_heads=2).eval()
    images = torch.randn(1, 3, 32, 48)
    labels = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    with torch.no_grad():
        out = model(images, AttentionRequest(refine_layers=tuple(range(3))))
    rec = out.records
    qs = [rec.qs[i] for i in range(3)]
    ks = [rec.ks[i] for i in range(3)]
    cam = out.cam * 50.0  # random-init CAMs are tiny; scale them so the refinement matters
    got = layer_entropies(qs, ks, cam, labels, num_prefix_tokens=rec.num_prefix_tokens, scale=rec.scale)
    ref = official_entropy_eager(qs, ks, cam, labels, rec.num_prefix_tokens, rec.scale)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_spatial_entropy_nan_policy_and_eps():
    f = torch.zeros(1, 1, 4)
    f[0, 0, 0] = 1e4  # softmax underflows to exactly 0 elsewhere
    e = spatial_entropy(f)
    assert torch.isnan(e).all()  # official formula: 0 * log2(0)
    e_eps = spatial_entropy(f, eps=1e-6)
    assert torch.isfinite(e_eps).all() and abs(float(e_eps)) < 1e-4
    uniform = spatial_entropy(torch.zeros(2, 0, 8))  # no present class: sum over an empty axis -> uniform
    torch.testing.assert_close(uniform, torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="refined_cam"):
        spatial_entropy(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="eps"):
        spatial_entropy(f, eps=0.0)


def test_accumulator_skips_and_counts_nan():
    acc = EntropyAccumulator(3)
    assert acc.update(torch.tensor([1.0, 2.0, 3.0]), "a")
    with pytest.warns(RuntimeWarning, match="'b'"):
        assert not acc.update(torch.tensor([1.0, float("nan"), 3.0]), "b")
    assert acc.update(np.array([3.0, 4.0, 5.0]), "c")
    np.testing.assert_allclose(acc.mean(), [2.0, 3.0, 4.0])
    np.testing.assert_allclose(acc.mean_including_skipped(), [4 / 3, 2.0, 8 / 3])
    assert acc.n_used == 2 and acc.n_skipped == 1 and acc.skipped_names == ["b"]
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.zeros(2))


def test_entropy_to_layer_weights_official_rule():
    ent = np.array([5.0, 3.0, 4.0, 7.0, 6.0, 3.5])
    e = (ent - 3.0) / 4.0
    loss_w, refine_w = entropy_to_layer_weights(ent, 4)
    np.testing.assert_allclose(loss_w, e[4:])
    np.testing.assert_allclose(refine_w, 1.0 - e[:4])
    np.testing.assert_allclose(normalise_entropy(torch.tensor(ent)), e)
    with pytest.raises(ValueError, match="layer_index"):
        entropy_to_layer_weights(ent, 6)
    with pytest.raises(ValueError, match="equal values"):
        entropy_to_layer_weights(np.ones(4), 2)
    with pytest.raises(ValueError, match="finite"):
        entropy_to_layer_weights(np.array([1.0, np.nan, 2.0]), 1)


def test_save_and_load_entropy(tmp_path):
    ent = np.array([1.0, 2.0, 4.0])
    npy, js = save_entropy(str(tmp_path), ent, {"n_images": 3})
    np.testing.assert_array_equal(load_entropy(npy), ent)
    np.testing.assert_array_equal(load_entropy(js), ent)
    import json
    with open(js) as f:
        data = json.load(f)
    assert data["n_images"] == 3 and data["normalised"] == [0.0, 1 / 3, 1.0]
    np.save(tmp_path / "bad.npy", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="1-D"):
        load_entropy(str(tmp_path / "bad.npy"))
