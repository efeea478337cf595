"""Inputs and the pydensecrf oracle for the dense-CRF tests and benchmark (tests/stage2/test_crf.py,
benchmarks/test_bench_crf.py)."""
from __future__ import annotations

import numpy as np


def synthetic_image(h: int, w: int, k: int, seed: int = 0):
    """A (H, W, 3) uint8 image of 6 flat noisy regions and (K, H, W) float32 probabilities: blocky random logits
    (8 px blocks, like an upsampled CAM) plus a +1 bonus for each region's label, softmax-normalised."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    region = ((xx // (w / 3)) + 3 * (yy // (h / 2))).astype(np.int64)
    img = np.stack([(region * 53 + c * 91) % 256 for c in range(3)], axis=-1).astype(np.float32)
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    return img, blocky_probs(h, w, k, rng, bonus=region % k)


def blocky_probs(h: int, w: int, k: int, rng, bonus=None) -> np.ndarray:
    """(K, H, W) float32 softmax of 8 px-block random logits (+1 for label ``bonus[y, x]`` where given)."""
    logits = rng.normal(0, 1.5, (k, h // 8 + 1, w // 8 + 1))
    logits = np.repeat(np.repeat(logits, 8, 1), 8, 2)[:, :h, :w]
    if bonus is not None:
        yy, xx = np.mgrid[0:h, 0:w]
        logits[bonus, yy, xx] += 1.0
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def photo_probs(img: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(K, H, W) probabilities for a real photograph: blocky random logits plus a colour cue (label = quantised
    brightness), so CRF boundaries have to follow the photo's edges."""
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    brightness = img.astype(np.float32).mean(axis=2)
    return blocky_probs(h, w, k, rng, bonus=np.minimum((brightness / 256 * k).astype(np.int64), k - 1))


def pydensecrf_inference(img: np.ndarray, probs: np.ndarray, params, iterations: int = 10) -> np.ndarray:
    """pydensecrf(2) run exactly as the official ``tools/dcrf.crf_inference``: unary_from_softmax, Gaussian then
    bilateral kernel, ``iterations`` mean-field steps -> (K, H, W) float32 Q."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=params.unary_clip)))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(img), compat=params.bilateral_compat)
    return np.array(crf.inference(iterations), dtype=np.float32).reshape(k, h, w)
