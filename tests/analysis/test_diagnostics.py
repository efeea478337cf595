"""Over-smoothing diagnostics (row-chunked, from q, k) against eager computations on materialised attention."""
import math

import numpy as np
import pytest
import torch

from aream_fast.analysis.diagnostics import DiagnosticsAccumulator, effective_rank, layer_affinity_diagnostics


def eager_diagnostics(qs, ks, c, scale, labels, topk):
    """Materialise Ā_l = mean_h softmax(scale q k^T) (N x N) and compute every metric directly."""
    rts = []
    res = {k: [] for k in ("row_entropy", "topk_mass", "effective_rank", "row_similarity", "patch_mass",
                           "fg_to_bg")}
    for q, k in zip(qs, ks):
        a = (q[0].double() @ k[0].double().transpose(-2, -1) * scale).softmax(-1).mean(0)  # N x N
        r = a[c:, c:]
        rt = r / r.sum(-1, keepdim=True)
        rts.append(rt)
        p = rt.shape[0]
        res["patch_mass"].append(r.sum(-1).mean())
        res["row_entropy"].append((-(rt * torch.log2(rt)).sum(-1)).mean())
        res["topk_mass"].append(torch.sort(rt, -1, descending=True).values[:, :topk].sum(-1).mean())
        s = torch.linalg.svd(rt).S
        ps = s / s.sum()
        res["effective_rank"].append(torch.exp(-(ps * torch.log(ps)).sum()))
        un = rt / rt.norm(dim=-1, keepdim=True)
        cos = un @ un.T
        res["row_similarity"].append((cos.sum() - cos.diagonal().sum()) / (p * (p - 1)))
        if labels is not None:
            lab = labels[0]
            fg = (lab > 0) & (lab != 255)
            shares = [rt[m, lab == 0].sum() / rt[m, lab != 255].sum() for m in range(p) if fg[m]]
            res["fg_to_bg"].append(torch.stack(shares).mean())
    out = {k: torch.stack(v) for k, v in res.items() if v}
    out["successive_similarity"] = torch.stack([
        (a * b).sum() / (a.norm() * b.norm()) for a, b in zip(rts[:-1], rts[1:])])
    if labels is not None:
        fg = (labels[0] > 0) & (labels[0] != 255)
        out["fg_attention"] = torch.stack([rt[fg].mean(0) for rt in rts])
    return out


@pytest.mark.parametrize("c,chunk_rows", [(3, 5), (1, None), (0, 7)])
def test_diagnostics_match_eager(c, chunk_rows):
    h, d, n_layers, p = 2, 8, 3, 20
    n = c + p
    qs = [torch.randn(1, h, n, d) * 2 for _ in range(n_layers)]
    ks = [torch.randn(1, h, n, d) * 2 for _ in range(n_layers)]
    labels = torch.randint(0, 3, (1, p))
    labels[0, :3] = torch.tensor([1, 0, 255])
    scale = d ** -0.5
    got = layer_affinity_diagnostics(qs, ks, num_prefix_tokens=c, scale=scale, patch_labels=labels,
                                     topk_fraction=0.1, chunk_rows=chunk_rows, return_fg_attention=True)
    ref = eager_diagnostics(qs, ks, c, scale, labels, topk=2)
    for name, value in ref.items():
        assert got[name].shape[0] == 1
        torch.testing.assert_close(got[name][0], value, atol=1e-5, rtol=1e-5, msg=name)


def test_diagnostics_batched_unlabelled_and_rank_skip():
    h, d, c, p = 2, 4, 2, 9
    qs = [torch.randn(2, h, c + p, d) for _ in range(2)]
    ks = [torch.randn(2, h, c + p, d) for _ in range(2)]
    got = layer_affinity_diagnostics(qs, ks, num_prefix_tokens=c, scale=0.5, rank_max_tokens=8)
    assert got["row_entropy"].shape == (2, 2) and got["successive_similarity"].shape == (2, 1)
    assert torch.isnan(got["effective_rank"]).all()  # P = 9 > rank_max_tokens
    assert torch.isnan(got["fg_to_bg"]).all()  # no labels
    for i in range(2):
        one = layer_affinity_diagnostics([q[i:i + 1] for q in qs], [k[i:i + 1] for k in ks],
                                         num_prefix_tokens=c, scale=0.5)
        torch.testing.assert_close(got["row_entropy"][i], one["row_entropy"][0])
        assert torch.all(one["effective_rank"] >= 1.0 - 1e-9) and torch.all(one["effective_rank"] <= p + 1e-9)


def test_diagnostics_extremes():
    # identical keys -> uniform attention: every row the same (over-smoothed), max entropy, rank 1
    p, d = 6, 4
    k = torch.ones(1, 1, p, d)
    q = torch.randn(1, 1, p, d)
    got = layer_affinity_diagnostics([q, q], [k, k], num_prefix_tokens=0, scale=1.0)
    torch.testing.assert_close(got["row_entropy"][0], torch.full((2,), math.log2(p), dtype=torch.float64))
    torch.testing.assert_close(got["row_similarity"][0], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(got["effective_rank"][0], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(got["successive_similarity"][0], torch.ones(1, dtype=torch.float64))
    # no background column -> fg_to_bg undefined (NaN), not 0
    lab = torch.ones(1, p, dtype=torch.int64)
    got = layer_affinity_diagnostics([q], [k], num_prefix_tokens=0, scale=1.0, patch_labels=lab)
    assert torch.isnan(got["fg_to_bg"]).all()
    assert effective_rank(torch.eye(5)).item() == pytest.approx(5.0)


def test_diagnostics_bad_input():
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="qs\\[1\\]"):
        layer_affinity_diagnostics([q, q[:, :, :9]], [q, q], num_prefix_tokens=1, scale=1.0)
    with pytest.raises(ValueError, match="patch_labels"):
        layer_affinity_diagnostics([q], [q], num_prefix_tokens=1, scale=1.0,
                                   patch_labels=torch.zeros(1, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        layer_affinity_diagnostics([q], [q], num_prefix_tokens=10, scale=1.0)
    with pytest.raises(ValueError, match="topk_fraction"):
        layer_affinity_diagnostics([q], [q], num_prefix_tokens=1, scale=1.0, topk_fraction=0.0)


def test_accumulator_nan_aware():
    acc = DiagnosticsAccumulator()
    acc.update({"a": torch.tensor([[1.0, float("nan")]]), "s": torch.tensor([0.5]),
                "fg_attention": torch.zeros(1, 2, 3)})
    acc.update({"a": torch.tensor([[3.0, 2.0]]), "s": torch.tensor([1.5])})
    s = acc.summary()
    np.testing.assert_allclose(s["a"]["mean"], [2.0, 2.0])
    np.testing.assert_allclose(s["a"]["std"], [1.0, 0.0])
    assert s["a"]["count"] == [2, 1] and "fg_attention" not in s
    assert acc.n_images == 2


def test_diagnostics_match_eager_on_tiny_model_image():
    from aream_fast.models import build_model
    from aream_fast.pseudo_labels.patch_labels import seg_to_patch_labels
    from aream_fast.models.records import AttentionRequest

    model = build_model("mct_deit_small", num_classes=3, img_size=48, drop_path=0.0, embed_dim=24, depth=3,
                        num_heads=2).eval()
    with torch.no_grad():
        for blk in model.blocks:  # sharpen the random-init attention so the metrics are not all trivial
            blk.attn.qkv.weight.mul_(15.0)
    image = torch.randn(1, 3, 48, 48)
    seg = torch.zeros(1, 48, 48, dtype=torch.int64)
    seg[:, 16:40, 8:32] = 2
    seg[:, :8, 40:] = 255
    labels = seg_to_patch_labels(seg, 16)
    with torch.no_grad():
        rec = model(image, AttentionRequest(refine_layers=(0, 1, 2))).records
    qs = [rec.qs[i] for i in range(3)]
    ks = [rec.ks[i] for i in range(3)]
    got = layer_affinity_diagnostics(qs, ks, num_prefix_tokens=rec.num_prefix_tokens, scale=rec.scale,
                                     patch_labels=labels, topk_fraction=0.2, return_fg_attention=True)
    ref = eager_diagnostics(qs, ks, rec.num_prefix_tokens, rec.scale, labels, topk=2)
    for name, value in ref.items():
        torch.testing.assert_close(got[name][0], value, atol=1e-5, rtol=1e-5, msg=name)
