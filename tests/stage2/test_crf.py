"""Dense CRF (aream_fast/stage2/crf.py, permutohedral.py) against from-scratch references and pydensecrf2.

* exact back end == a naive dense implementation written here (double loops for the kernel, per-pixel softmax);
* fast back end == a naive per-point permutohedral lattice written here from Adams et al. 2010 / pydensecrf's
  ``permutohedral.cpp`` description (dict hash table, loops), to float tolerance;
* fast vs exact: the lattice only approximates the Gaussian, so they agree loosely (tolerance below);
* fast vs pydensecrf2 (optional oracle, ``pip install -e '.[crf-oracle]'``) on real photographs and synthetic images;
* batched == per image; bad inputs raise ValueError.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aream_fast.stage2 import CRF_PRESETS, CRFParams, dense_crf
from aream_fast.stage2.crf import EXACT_MAX_PIXELS, crf_features
from aream_fast.stage2.permutohedral import build_lattice
from tests.stage2._crf_inputs import photo_probs, pydensecrf_inference, synthetic_image

# ------------------------------------------------------------------------------------------ naive references


def naive_features(img: np.ndarray, p: CRFParams):
    h, w = img.shape[:2]
    gauss, bil = [], []
    for y in range(h):
        for x in range(w):
            gauss.append([x / p.gaussian_sxy, y / p.gaussian_sxy])
            bil.append([x / p.bilateral_sxy, y / p.bilateral_sxy] + [c / p.bilateral_srgb for c in img[y, x]])
    return np.array(gauss), np.array(bil)


def naive_gaussian_operator(f: np.ndarray) -> np.ndarray:
    """D^-1/2 K D^-1/2 with K[i, j] = exp(-|f_i - f_j|^2 / 2) (self term kept), D = K 1, by explicit loops."""
    n = len(f)
    k = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            k[i, j] = math.exp(-0.5 * sum((a - b) ** 2 for a, b in zip(f[i], f[j])))
    norm = 1 / np.sqrt(k.sum(1) + 1e-20)
    return norm[:, None] * k * norm[None, :]


def naive_mean_field(probs: np.ndarray, operators, compats, iterations: int) -> np.ndarray:
    """Q <- softmax(-U + sum_k w_k op_k Q) per pixel, U = -log clip(p, 1e-5); operators act on (N,) vectors."""
    k, h, w = probs.shape
    unary = -np.log(np.clip(probs.reshape(k, -1).T.astype(np.float64), 1e-5, 1))

    def softmax(x):
        out = np.empty_like(x)
        for i, row in enumerate(x):
            e = np.exp(row - row.max())
            out[i] = e / e.sum()
        return out

    q = softmax(-unary)
    for _ in range(iterations):
        msg = -unary.copy()
        for op, wk in zip(operators, compats):
            msg += wk * np.stack([op(q[:, label]) for label in range(k)], axis=1)
        q = softmax(msg)
    return q.T.reshape(k, h, w)


def naive_lattice_filter(feat: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Permutohedral-lattice filter, one point at a time (Adams, Baek, Davis 2010; Krähenbühl's variant: blur
    [1/2, 1, 1/2] per lattice direction j = 0..d, slice scaled by 1 / (1 + 2^-d)). float32 where the C++ is."""
    f32 = np.float32
    n, d = feat.shape
    inv_std = f32(math.sqrt(2 / 3) * (d + 1))
    scale = [f32(1 / math.sqrt((i + 2) * (i + 1)) * float(inv_std)) for i in range(d)]
    down = f32(1 / (d + 1))
    table, corners = {}, []
    for p in range(n):
        el = [f32(0)] * (d + 1)
        sm = f32(0)
        for j in range(d, 0, -1):
            cf = f32(f32(feat[p, j - 1]) * scale[j - 1])
            el[j] = f32(sm - f32(j) * cf)
            sm = f32(sm + cf)
        el[0] = sm
        rounded = [round(float(f32(down * e))) for e in el]  # Python round: half to even, like SSE
        rem0 = [r * (d + 1) for r in rounded]
        total = sum(rounded)
        diff = [f32(el[i] - f32(rem0[i])) for i in range(d + 1)]
        rank = [0] * (d + 1)
        for i in range(d + 1):
            for j in range(i + 1, d + 1):
                if diff[i] < diff[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            rank[i] += total
            if rank[i] < 0:
                rank[i] += d + 1
                rem0[i] += d + 1
            elif rank[i] > d:
                rank[i] -= d + 1
                rem0[i] -= d + 1
        bary = [0.0] * (d + 2)
        for i in range(d + 1):
            v = float(f32(f32(el[i] - f32(rem0[i])) * down))
            bary[d - rank[i]] += v
            bary[d - rank[i] + 1] -= v
        bary[0] += 1 + bary[d + 1]
        for r in range(d + 1):
            key = tuple(rem0[i] + (r if rank[i] <= d - r else r - (d + 1)) for i in range(d))
            corners.append((p, table.setdefault(key, len(table)), bary[r]))
    vals = np.zeros((len(table), values.shape[1]))
    for p, vertex, wgt in corners:
        vals[vertex] += wgt * values[p]
    for j in range(d + 1):
        new = vals.copy()
        for key, vertex in table.items():
            n1 = [c - 1 for c in key]
            n2 = [c + 1 for c in key]
            if j < d:
                n1[j], n2[j] = key[j] + d, key[j] - d
            for nb in (tuple(n1), tuple(n2)):
                if nb in table:
                    new[vertex] += 0.5 * vals[table[nb]]
        vals = new
    out = np.zeros((n, values.shape[1]))
    for p, vertex, wgt in corners:
        out[p] += wgt * vals[vertex] / (1 + 2.0 ** -d)
    return out


def naive_lattice_operator(f: np.ndarray):
    norm = 1 / np.sqrt(naive_lattice_filter(f, np.ones((len(f), 1)))[:, 0] + 1e-20)
    return lambda v: norm * naive_lattice_filter(f, (norm * v)[:, None])[:, 0]


# ------------------------------------------------------------------------------------------ references


@pytest.mark.parametrize("preset", ["cam", "toco"])
@pytest.mark.parametrize("shape", [(5, 7, 3), (6, 3, 2)])
def test_exact_matches_naive_dense(preset, shape):
    img, probs = synthetic_image(*shape, seed=sum(shape))
    p = CRF_PRESETS[preset]
    fg, fb = naive_features(img, p)
    ops = [naive_gaussian_operator(fg), naive_gaussian_operator(fb)]
    want = naive_mean_field(probs, [lambda v, m=m: m @ v for m in ops], [p.gaussian_compat, p.bilateral_compat], 5)
    got = dense_crf(img, probs, preset=preset, iterations=5, backend="exact")
    assert got.dtype == np.float32 and got.shape == probs.shape
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("dim_case", ["gaussian", "bilateral"])
def test_lattice_filter_matches_naive_lattice(dim_case):
    img, _ = synthetic_image(9, 11, 3, seed=1)
    fg, fb = crf_features(torch.from_numpy(img), CRF_PRESETS["official-test"])
    feats = fg if dim_case == "gaussian" else fb
    values = np.random.default_rng(0).random((feats.shape[0], 4)).astype(np.float32)
    want = naive_lattice_filter(feats.numpy(), values.astype(np.float64))
    got = build_lattice(feats).filter(torch.from_numpy(values)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim_case", ["gaussian", "bilateral"])
def test_neighbour_table_matches_binary_search(dim_case, monkeypatch):
    """The dense code -> vertex table and the binary search find the same blur neighbours (both exist and
    missing ones), and the filter through either matches the naive lattice."""
    from aream_fast.stage2 import permutohedral

    img, _ = synthetic_image(13, 17, 3, seed=4)
    fg, fb = crf_features(torch.from_numpy(img), CRF_PRESETS["cam"])
    feats = fg if dim_case == "gaussian" else fb
    found = []
    for limit in (0, 10 ** 9):  # 0: binary search only; 10^9: always the table
        monkeypatch.setattr(permutohedral, "_TABLE_MAX_RANGE_PER_VERTEX", limit)
        found.append(build_lattice(feats))
    searched, tabled = (lat.neighbours for lat in found)
    m = found[0].num_vertices
    assert searched.dtype == torch.int32 and torch.equal(searched, tabled)
    assert bool((searched < m).any()) and bool((searched == m).any())
    values = np.random.default_rng(1).random((feats.shape[0], 2)).astype(np.float32)
    want = naive_lattice_filter(feats.numpy(), values.astype(np.float64))
    for lat in found:
        np.testing.assert_allclose(lat.filter(torch.from_numpy(values)).numpy(), want, rtol=1e-5, atol=1e-5)


def test_filter_ones_is_the_filter_of_ones():
    """The kernel's row sums D (scatter splat, shared blur, slice product) equal the full filter of a column of
    ones, with or without the caller's blur and slice matrices."""
    img, _ = synthetic_image(9, 11, 3, seed=6)
    for feats in crf_features(torch.from_numpy(img), CRF_PRESETS["cam"]):
        lattice = build_lattice(feats)
        want = lattice.filter(torch.ones(feats.shape[0], 1))[:, 0]
        torch.testing.assert_close(lattice.filter_ones(), want)
        torch.testing.assert_close(lattice.filter_ones(lattice.blur_matrices(), lattice.slice_matrix()), want)


def test_blur_ignores_buffer_contents():
    """``blur`` writes each sparse product with ``addmm_(..., beta=0)`` into uninitialised buffers: torch must
    ignore their old contents, NaN included (torch.addmm documents it; this guards an upgrade)."""
    from aream_fast.stage2.permutohedral import blur

    img, _ = synthetic_image(9, 11, 3, seed=5)
    lattice = build_lattice(crf_features(torch.from_numpy(img), CRF_PRESETS["cam"])[1])
    step = lattice.blur_matrices()[0]
    x = torch.rand(step.shape[1], 3)
    out = torch.full((step.shape[0], 3), float("nan"))
    out.addmm_(step, x, beta=0)
    torch.testing.assert_close(out, (step.to_dense() @ x))
    values = torch.rand(lattice.num_vertices, 3)
    want = values.double()
    for dense_step in lattice.blur_matrices():  # (M, M+1): column M is the zero row of missing neighbours
        want = dense_step.to_dense().double() @ torch.cat([want, want.new_zeros(1, 3)])
    torch.testing.assert_close(blur(values, lattice.blur_matrices()), want.float())


@pytest.mark.parametrize("spread", [3.0, 3000.0])
def test_lattice_filter_wide_features(spread):
    """Scattered 5-D features: the packed vertex codes fit in 32 bits for a small spread and need the 64-bit
    sort for a wide one (code range >= 2^31); both give the naive lattice's filter."""
    from aream_fast.stage2 import permutohedral

    rng = np.random.default_rng(3)
    feats = (rng.random((40, 5)) * spread).astype(np.float32)
    values = rng.random((40, 3)).astype(np.float32)
    seen = []
    real_hash = permutohedral._hash
    permutohedral._hash = lambda codes: seen.append(codes.dtype) or real_hash(codes)
    try:
        got = build_lattice(torch.from_numpy(feats)).filter(torch.from_numpy(values)).numpy()
    finally:
        permutohedral._hash = real_hash
    assert seen == [torch.int32 if spread < 10 else torch.int64]
    np.testing.assert_allclose(got, naive_lattice_filter(feats, values.astype(np.float64)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["cam", "official-test", "toco"])
def test_fast_matches_naive_lattice_crf(preset):
    img, probs = synthetic_image(7, 9, 3, seed=2)
    p = CRF_PRESETS[preset]
    fg, fb = crf_features(torch.from_numpy(img), p)
    ops = [naive_lattice_operator(fg.numpy()), naive_lattice_operator(fb.numpy())]
    want = naive_mean_field(probs, ops, [p.gaussian_compat, p.bilateral_compat], 10)
    got = dense_crf(img, probs, preset=preset, backend="fast")
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("preset", ["cam", "official-test", "toco", "deeplab"])
def test_lattice_operator_vs_exact_gaussian(preset):
    """The normalised lattice operator approximates the exact D^-1/2 K D^-1/2 (Adams et al. 2010): relative
    Frobenius error <= 0.1 on random positive vectors (measured: <= 0.019 Gaussian, <= 0.078 bilateral)."""
    from aream_fast.stage2.crf import _ExactTerm, _LatticeTerm

    img, _ = synthetic_image(24, 31, 3, seed=1)
    for feats in crf_features(torch.from_numpy(img), CRF_PRESETS[preset]):
        v = torch.rand(feats.shape[0], 4, generator=torch.Generator().manual_seed(0))
        exact = _ExactTerm(feats).apply(v)
        fast = _LatticeTerm(build_lattice(feats)).apply(v)
        assert ((fast - exact).norm() / exact.norm()).item() <= 0.1


@pytest.mark.parametrize("preset", ["cam", "official-test", "toco", "deeplab"])
@pytest.mark.parametrize("k", [3, 21])
def test_fast_vs_exact(preset, k):
    """Whole CRF, lattice vs exact Gaussian. The few-% kernel difference above is amplified by mean field where
    it is bistable (tiny images with sxy larger than the image: a whole region can flip), so the tolerance is on
    the bulk: mean |dQ| <= 0.12 and argmax agreement >= 80 % (measured worst: 0.091 and 86.7 %, "cam", K=3;
    typically <= 0.025 and >= 95 %)."""
    img, probs = synthetic_image(24, 31, k, seed=k)
    fast = dense_crf(img, probs, preset=preset, backend="fast")
    exact = dense_crf(img, probs, preset=preset, backend="exact")
    assert np.abs(fast - exact).mean() <= 0.12
    assert (fast.argmax(0) == exact.argmax(0)).mean() >= 0.80
    assert (exact.argmax(0) != probs.argmax(0)).mean() >= 0.02  # the CRF changed labels, so the check has teeth


# ------------------------------------------------------------------------------------------ pydensecrf2 oracle

def _photos():
    data = pytest.importorskip("skimage.data", reason="scikit-image (the crf-oracle extra) has the sample photos")
    return {"chelsea": data.chelsea(), "coffee": data.coffee()}


@pytest.mark.oracle
@pytest.mark.parametrize("preset", ["cam", "official-test", "toco"])
@pytest.mark.parametrize("k", [3, 21])
def test_fast_matches_pydensecrf2(preset, k):
    """Same Q as pydensecrf2 up to float32 summation order: max |dQ| <= 1e-4 (measured <= 3.5e-6 at full size on
    three photos), argmax agreement >= 99.9 % (measured 100 %; a pixel at an exact tie may flip)."""
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 oracle not installed (pip install -e "
                                                      "'.[crf-oracle]'; CI does not build it)")
    cases = {name: (img[::2, ::2].copy(), None) for name, img in _photos().items()}
    cases = {name: (img, photo_probs(img, k, seed=k)) for name, (img, _) in cases.items()}
    cases["synthetic"] = synthetic_image(75, 100, k, seed=k)
    p = CRF_PRESETS[preset]
    for name, (img, probs) in cases.items():
        want = pydensecrf_inference(img, probs, p)
        got = dense_crf(img, probs, preset=preset)
        agree = (got.argmax(0) == want.argmax(0)).mean()
        assert np.abs(got - want).max() <= 1e-4, name
        assert agree >= 0.999, name


# ------------------------------------------------------------------------------------------ batching, devices


def test_batched_equals_per_image():
    cases = [synthetic_image(12, 17, 3, seed=0), synthetic_image(9, 20, 2, seed=1), synthetic_image(15, 8, 5, seed=2)]
    images, probs = [c[0] for c in cases], [c[1] for c in cases]
    batched = dense_crf(images, probs, preset="toco")
    assert isinstance(batched, list) and len(batched) == 3
    for img, p, q in zip(images, probs, batched):
        np.testing.assert_array_equal(q, dense_crf(img, p, preset="toco"))
        assert q.shape == p.shape
    # a (B, H, W, 3) stack gives a (B, K, H, W) stack; tensors in -> tensor out
    img, p = synthetic_image(10, 13, 4, seed=3)
    stack = dense_crf(torch.from_numpy(np.stack([img, img[::-1].copy()])),
                      torch.from_numpy(np.stack([p, p[:, ::-1].copy()])))
    assert isinstance(stack, torch.Tensor) and stack.shape == (2, 4, 10, 13) and stack.dtype == torch.float32
    np.testing.assert_array_equal(stack[1].numpy(), dense_crf(img[::-1].copy(), p[:, ::-1].copy()))


def test_zero_iterations_and_overrides():
    img, probs = synthetic_image(6, 7, 3, seed=4)
    q0 = dense_crf(img, probs, iterations=0)
    np.testing.assert_allclose(q0, probs / probs.sum(0), atol=1e-6)
    # an override equal to the preset value changes nothing; another value changes Q
    same = dense_crf(img, probs, preset="cam", bilateral_compat=10)
    np.testing.assert_array_equal(same, dense_crf(img, probs, preset="cam"))
    other = dense_crf(img, probs, preset="cam", bilateral_compat=50, bilateral_srgb=30)
    assert np.abs(other - same).max() > 1e-3


def test_unnormalised_scores():
    """The official CAM CRF passes [bg; cams] scores in [0, 1] that do not sum to 1."""
    img, probs = synthetic_image(8, 9, 3, seed=5)
    scores = probs * 0.5
    with pytest.raises(ValueError, match="sum to 1"):
        dense_crf(img, scores)
    q = dense_crf(img, scores, normalized=False)
    np.testing.assert_allclose(q.sum(0), 1, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    img, probs = synthetic_image(40, 53, 4, seed=6)
    cpu = dense_crf(img, probs, preset="official-test")
    gpu = dense_crf(torch.from_numpy(img).cuda(), torch.from_numpy(probs).cuda(), preset="official-test")
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu, atol=1e-4)


# ------------------------------------------------------------------------------------------ bad input

_IMG, _PROBS = synthetic_image(6, 8, 3, seed=7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image=_IMG.astype(np.float32)), "image must be uint8"),
    (dict(image=_IMG[..., :2]), r"image must have shape \(H, W, 3\)"),
    (dict(probs=_PROBS[:, :5]), "spatial size"),
    (dict(probs=_PROBS[0]), r"probs must have shape \(K, H, W\)"),
    (dict(probs=(_PROBS * 255).astype(np.uint8)), "floating-point"),
    (dict(probs=np.where(np.arange(8) == 3, np.nan, _PROBS).astype(np.float32)), "NaN"),
    (dict(probs=_PROBS * 2), r"\[0, 1\]"),
    (dict(preset="nope"), "unknown CRF preset"),
    (dict(bilateral_sigma=3), "unknown CRF parameter"),
    (dict(bilateral_srgb=0), "bilateral_srgb must be"),
    (dict(backend="gpu"), "unknown CRF backend"),
    (dict(iterations=-1), "iterations"),
    (dict(image=[_IMG], probs=_PROBS), "both be lists"),
    (dict(image=[_IMG, _IMG], probs=[_PROBS]), "same length"),
])
def test_bad_input(kwargs, match):
    args = dict(image=_IMG, probs=_PROBS)
    args.update(kwargs)
    image, probs = args.pop("image"), args.pop("probs")
    with pytest.raises(ValueError, match=match):
        dense_crf(image, probs, **args)


def test_exact_refuses_large_images():
    side = int(math.isqrt(EXACT_MAX_PIXELS)) + 1
    img, probs = synthetic_image(side, side, 2)
    with pytest.raises(ValueError, match="backend='fast'"):
        dense_crf(img, probs, backend="exact")


def test_presets_named_and_valid():
    for name in ("cam", "official-test", "toco", "label", "toco-cam-label", "afa", "deeplab"):
        assert name in CRF_PRESETS and CRF_PRESETS[name].source
    assert (CRF_PRESETS["cam"].gaussian_sxy, CRF_PRESETS["cam"].bilateral_sxy, CRF_PRESETS["cam"].bilateral_srgb,
            CRF_PRESETS["cam"].bilateral_compat) == (3, 80, 13, 10)
    assert (CRF_PRESETS["official-test"].gaussian_sxy, CRF_PRESETS["official-test"].bilateral_sxy) == (4, 83)
    assert (CRF_PRESETS["toco"].bilateral_sxy, CRF_PRESETS["toco"].bilateral_srgb) == (121, 5)


def test_position_lattice_cache(monkeypatch):
    """The appearance-free Gaussian lattice is cached per (H, W, sxy, device): a cached run gives the same Q as a
    cold one, and at most POSITION_CACHE_SIZE sizes are kept (least recently used dropped)."""
    from aream_fast.stage2 import crf

    img, probs = synthetic_image(11, 13, 3, seed=5)
    crf._position_terms.clear()
    cold = dense_crf(img, probs, preset="cam")
    assert list(crf._position_terms) == [(11, 13, 3.0, "cpu")]
    np.testing.assert_array_equal(dense_crf(img, probs, preset="cam"), cold)
    # another sxy is another entry, and its Q differs (the cache key includes sxy)
    assert np.abs(dense_crf(img, probs, preset="cam", gaussian_sxy=1) - cold).max() > 1e-4
    for size in range(crf.POSITION_CACHE_SIZE + 2):
        small, p = synthetic_image(4, 5 + size, 2, seed=size)
        dense_crf(small, p)
    assert len(crf._position_terms) == crf.POSITION_CACHE_SIZE
    assert (11, 13, 3.0, "cpu") not in crf._position_terms
    monkeypatch.setattr(crf, "POSITION_CACHE_SIZE", 0)  # keep none
    np.testing.assert_array_equal(dense_crf(img, probs, preset="cam"), cold)
    assert len(crf._position_terms) == 0
    monkeypatch.setattr(crf, "POSITION_CACHE_SIZE", -1)
    with pytest.raises(ValueError, match="POSITION_CACHE_SIZE must be an int >= 0, got -1"):
        dense_crf(img, probs, preset="cam")


def test_repeated_image_builds_one_bilateral_lattice(monkeypatch):
    """Two score maps of one image object in a list (the la / ha rule of the pseudo masks) share its bilateral
    lattice: one build, the same Q as two separate calls."""
    from aream_fast.stage2 import crf

    img, p1 = synthetic_image(9, 12, 3, seed=6)
    _, p2 = synthetic_image(9, 12, 3, seed=7)
    want = [dense_crf(img, p1, preset="toco"), dense_crf(img, p2, preset="toco")]
    crf._position_terms.clear()
    built = []
    real = crf.build_lattice
    monkeypatch.setattr(crf, "build_lattice", lambda f: built.append(f.shape[1]) or real(f))
    got = dense_crf([img, img], [p1, p2], preset="toco")
    assert built == [5, 2]  # the bilateral once, the Gaussian once (then cached)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    # a copy of the image is another object: its own lattice; only consecutive repeats share one
    dense_crf([img, img.copy()], [p1, p2], preset="toco")
    assert built == [5, 2, 5, 5]
    other, _ = synthetic_image(9, 12, 3, seed=8)
    dense_crf([img, other, img], [p1, p2, p1], preset="toco")
    assert built == [5, 2, 5, 5, 5, 5, 5]


def test_build_lattice_refuses_bad_features():
    with pytest.raises(ValueError, match="NaN or infinite"):
        build_lattice(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="float32"):
        build_lattice(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one point"):
        build_lattice(torch.zeros(0, 2))
