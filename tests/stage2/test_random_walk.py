"""Random walk on the ViT's patch affinity against a dense float64 P x P reference (aream_fast.stage2.random_walk)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aream_fast import AttentionRequest, build_model
from aream_fast.stage2.random_walk import (RW_PRESETS, apply_transition, attention_affinity, choose_method,
                                           random_walk, rw_params, transition_matrix, vit_affinity)


def _reference(cams, affinity, patch_size, beta, t, bg_threshold=None, bg_power=None, radius=None):
    """Dense float64 PSA random walk written out step by step: pad, pool, T = A^β / rowsum, T^t x, upsample."""
    cams = cams.double()
    k, hh, ww = cams.shape
    h, w = -(-hh // patch_size), -(-ww // patch_size)
    top = cams.max(0).values if k else torch.zeros(hh, ww, dtype=torch.float64)
    bg = torch.full((hh, ww), bg_threshold, dtype=torch.float64) if bg_threshold is not None else (1 - top) ** bg_power
    scores = torch.cat([bg[None], cams])
    padded = torch.zeros(k + 1, h * patch_size, w * patch_size, dtype=torch.float64)
    padded[:, :hh, :ww] = scores
    pooled = padded.reshape(k + 1, h, patch_size, w, patch_size).mean((2, 4)).reshape(k + 1, h * w)
    a = affinity.double() ** beta
    if radius is not None:
        for i in range(h * w):
            for j in range(h * w):
                if (i // w - j // w) ** 2 + (i % w - j % w) ** 2 >= radius ** 2:
                    a[i, j] = 0
    trans = a / a.sum(1, keepdim=True)
    out = (torch.linalg.matrix_power(trans, t) @ pooled.T).T.reshape(1, k + 1, h, w)
    out = F.interpolate(out, size=(h * patch_size, w * patch_size), mode="bilinear", align_corners=False)
    return out[0, :, :hh, :ww]


def _case(seed=0, k=2, size=(11, 14), patch_size=4):
    g = torch.Generator().manual_seed(seed)
    cams = torch.rand(k, *size, generator=g)
    p = (-(-size[0] // patch_size)) * (-(-size[1] // patch_size))
    a = torch.rand(p, p, generator=g) + 0.05
    return cams, (a + a.T) / 2


@pytest.mark.parametrize("method", ["matvec", "square", "auto"])
@pytest.mark.parametrize("preset,t", [("aream", 64), ("psa", 256), ("aream", 5)])
def test_random_walk_matches_dense_reference(method, preset, t):
    cams, aff = _case()
    p = RW_PRESETS[preset]
    # a milder beta keeps the dense float64 power well conditioned on random affinities
    out = random_walk(cams, aff, patch_size=4, preset=preset, beta=2.0, t=t, method=method)
    ref = _reference(cams, aff, 4, 2.0, t, bg_threshold=p.bg_threshold, bg_power=p.bg_power, radius=p.radius)
    assert out.shape == (3, 11, 14) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_random_walk_radius_and_few_steps_change_the_result():
    """Odd sizes, small t, a radius that cuts pairs: reference agreement, and the radius is not a no-op."""
    cams, aff = _case(seed=1, k=3, size=(13, 9), patch_size=3)
    out = random_walk(cams, aff, patch_size=3, beta=8.0, t=3, radius=2.0, bg_threshold=0.3)
    ref = _reference(cams, aff, 3, 8.0, 3, bg_threshold=0.3, radius=2.0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    wide = random_walk(cams, aff, patch_size=3, beta=8.0, t=3, radius=0, bg_threshold=0.3)  # 0: all pairs
    assert (wide - out).abs().max() > 1e-3


def test_transition_does_not_underflow_on_attention_scale_affinities():
    """Attention values are ~1/P: A^8 is ~1e-30 in float32. T must still be the exact row-normalised power."""
    p = 64
    a = torch.softmax(torch.randn(p, p) * 3, dim=1)
    a = (a + a.T) / 2 * 1e-3
    trans = transition_matrix(a, (8, 8), beta=8.0)
    ref = a.double() ** 8
    ref = ref / ref.sum(1, keepdim=True)
    torch.testing.assert_close(trans.double(), ref, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(trans.sum(1), torch.ones(p))


def test_apply_transition_square_equals_matvec_and_auto_choice():
    g = torch.Generator().manual_seed(3)
    trans = torch.rand(30, 30, generator=g)
    trans /= trans.sum(1, keepdim=True)
    x = torch.rand(30, 4, generator=g)
    for t in (0, 1, 6, 64, 77):
        ref = torch.linalg.matrix_power(trans.double(), t) @ x.double()
        torch.testing.assert_close(apply_transition(trans, x, t, method="square").double(), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(apply_transition(trans, x, t, method="matvec").double(), ref, atol=1e-5, rtol=0)
    assert choose_method(64, 3, 784) == "matvec"  # ViT-S at 448 px, 2 present classes
    assert choose_method(256, 21, 100) == "square"


def test_attention_affinity_matches_full_softmax():
    g = torch.Generator().manual_seed(4)
    c, p, heads, d = 3, 10, 2, 5
    qs = [torch.randn(1, heads, c + p, d, generator=g) for _ in range(2)]
    ks = [torch.randn(1, heads, c + p, d, generator=g) for _ in range(2)]
    scale = d ** -0.5
    full = torch.stack([torch.softmax(scale * q[0] @ k[0].transpose(-1, -2), -1) for q, k in zip(qs, ks)])
    ref = full.mean((0, 1))[c:, c:]
    got = attention_affinity(qs, ks, num_prefix_tokens=c, scale=scale, symmetric=False)
    torch.testing.assert_close(got, ref)
    sym = attention_affinity(qs, ks, num_prefix_tokens=c, scale=scale)
    torch.testing.assert_close(sym, (ref + ref.T) / 2)


def test_vit_affinity_and_records_path():
    model = build_model("mct_deit_small", 3, img_size=32, depth=2, embed_dim=32, num_heads=2, drop_path=0.0)
    model.eval()
    image = torch.randn(3, 19, 26)  # padded to 32 x 32: a 2 x 2 grid
    aff = vit_affinity(model, image, layers=(1,))
    assert aff.shape == (4, 4)
    padded = F.pad(image[None], (0, 6, 0, 13))
    rec = model(padded, AttentionRequest(refine_layers=(1,))).records
    q, k = rec.qs[1][0], rec.ks[1][0]
    full = torch.softmax(rec.scale * q @ k.transpose(-1, -2), -1).mean(0)[3:, 3:]
    torch.testing.assert_close(aff, (full + full.T) / 2)
    cams = torch.rand(2, 19, 26)
    torch.testing.assert_close(random_walk(cams, rec, patch_size=16), random_walk(cams, aff, patch_size=16))


def test_numpy_cams_and_no_class():
    cams, aff = _case()
    out = random_walk(cams.numpy(), aff, patch_size=4)
    torch.testing.assert_close(out, random_walk(cams, aff, patch_size=4))
    empty = random_walk(np.zeros((0, 11, 14), np.float32), aff, patch_size=4, preset="psa")
    ref = _reference(torch.zeros(0, 11, 14), aff, 4, 8.0, 256, bg_power=16.0, radius=5.0)  # zero padding too
    assert empty.shape == (1, 11, 14)
    torch.testing.assert_close(empty.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(preset="nope"), "preset"),
    (dict(bg_threshold=0.3, bg_power=2.0), "not both"),
    (dict(beta=-1.0), "beta"),
    (dict(t=2.5), "t must"),
    (dict(method="cubic"), "method"),
    (dict(patch_size=5), "affinity must be"),
])
def test_bad_arguments(kwargs, match):
    cams, aff = _case()
    kwargs = {"patch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        random_walk(cams, aff, **kwargs)


def test_bad_inputs():
    cams, aff = _case()
    with pytest.raises(ValueError, match="NaN"):
        random_walk(torch.full_like(cams, float("nan")), aff, patch_size=4)
    with pytest.raises(ValueError, match="non-negative"):
        random_walk(cams, -aff, patch_size=4)
    with pytest.raises(ValueError, match=r"\(k, H, W\)"):
        random_walk(cams[0], aff, patch_size=4)
    with pytest.raises(ValueError, match="no positive entry"):
        transition_matrix(torch.eye(12) * 0, (3, 4), beta=8.0)
    with pytest.raises(ValueError, match="unknown random-walk"):
        rw_params("aream", gamma=1)
