"""Fully connected (dense) CRF with pydensecrf's semantics, in PyTorch: CPU and CUDA, float32, no compiled code.

The model is Krähenbühl and Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials"
(NeurIPS 2011), as shipped in the public repo lucasb-eyer/pydensecrf (``densecrf/src/densecrf.cpp``,
``pairwise.cpp``, ``labelcompatibility.cpp``) and used by PSA, MCTformer, AReAM, ToCo and others:

* unary ``U = -log(clip(p, 1e-5, 1))`` (pydensecrf ``utils.unary_from_softmax``); ``p`` need not be normalised
  (the official CAM CRF passes background-stacked CAM scores, docs/semantics.md, Stage two);
* two kernels with Potts compatibility: an appearance-free Gaussian on ``(x, y) / sxy`` and a bilateral one on
  ``(x / sxy, y / sxy, r / srgb, g / srgb, b / srgb)`` (x = column, y = row, colours 0..255);
* each kernel normalised symmetrically, ``K~ = D^-1/2 K D^-1/2`` with ``D = K 1`` and the self term kept
  (pydensecrf's NORMALIZE_SYMMETRIC, DIAG_KERNEL defaults);
* mean field: ``Q0 = softmax(-U)``, then ``iterations`` times ``Q <- softmax(-U + sum_k w_k K~_k Q)``, every kernel
  applied to the same Q (Potts ``apply`` is ``-w Q`` and is subtracted from ``-U``).

Back ends (``backend=``):

* ``"fast"`` (and ``"auto"``): K is the permutohedral-lattice filter of ``permutohedral.py``, the same
  approximation pydensecrf computes, so masks match pydensecrf; the bilateral lattice is built once per image,
  the appearance-free Gaussian one once per image size (``POSITION_CACHE_SIZE`` sizes are kept).
* ``"exact"``: K is the true Gaussian ``exp(-|f_i - f_j|^2 / 2)`` materialised as an N x N matrix (float64),
  the mathematical model the lattice approximates. For tests and tiny images only (N <= ``EXACT_MAX_PIXELS``).

Parameter presets (``CRF_PRESETS``) are the ones peers use (docs/semantics.md, Stage two).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Sequence, Union

import numpy as np
import torch

from .permutohedral import Lattice, blur, build_lattice

EXACT_MAX_PIXELS = 4096
_BACKENDS = ("auto", "fast", "exact")


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF parameters: Gaussian kernel (``gaussian_sxy`` px, weight ``gaussian_compat``), bilateral kernel
    (``bilateral_sxy`` px, ``bilateral_srgb`` colour levels, weight ``bilateral_compat``), the unary clip and where
    the numbers come from."""

    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    unary_clip: float = 1e-5
    source: str = ""

    def __post_init__(self):
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ValueError(f"CRFParams.{name} must be a finite number > 0, got {value!r}")
        for name in ("gaussian_compat", "bilateral_compat"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"CRFParams.{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.unary_clip, (int, float)) and 0 < self.unary_clip < 1):
            raise ValueError(f"CRFParams.unary_clip must be in (0, 1), got {self.unary_clip!r}")


CRF_PRESETS: Dict[str, CRFParams] = {
    "cam": CRFParams(3, 3, 80, 13, 10, source="official CAM CRF: PSA/MCTformer/AReAM tools/dcrf.crf_inference, "
                                              "ToCo/AFA utils/dcrf.py"),
    "label": CRFParams(3, 3, 50, 5, 10, source="label-unary CRF: IRN/AReAM/ToCo crf_inference_label (pass "
                                               "probs 0.7 for the label, 0.3/(K-1) elsewhere)"),
    "toco-cam-label": CRFParams(3, 3, 36, 3, 4, source="ToCo tools/infer_cam_crf_label.py"),
    "official-test": CRFParams(4, 3, 83, 5, 3, source="AReAM/MCTformer seg test CRF "
                                                      "seg/tool/imutils.crf_inference_inf"),
    "toco": CRFParams(1, 1, 121, 5, 4, source="seg test CRF of ToCo/DuPL/SeCo tools/infer_seg_voc.py"),
    "afa": CRFParams(3, 3, 64, 5, 4, source="AFA scripts/test_msc_flip.py"),
    "deeplab": CRFParams(1, 3, 67, 3, 4, source="deeplab-pytorch configs/voc12.yaml, MoRe infer_seg_voc.py"),
}

ImageLike = Union[np.ndarray, torch.Tensor]


def resolve_params(preset: str = "cam", **overrides) -> CRFParams:
    """The preset's CRFParams with ``overrides`` (CRFParams field names) applied; ValueError on unknown names."""
    if preset not in CRF_PRESETS:
        raise ValueError(f"unknown CRF preset {preset!r}; known: {sorted(CRF_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(CRFParams)} - {"source"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown CRF parameter(s) {unknown}; known: {sorted(fields)}")
    params = CRF_PRESETS[preset]
    if overrides:
        params = dataclasses.replace(params, source=f"{preset} preset with {overrides}", **overrides)
    return params


# --------------------------------------------------------------------------------------------------- inputs


def _as_image(image: ImageLike, name: str, device) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8 (H, W, 3), got dtype {image.dtype}")
        image = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8 (H, W, 3), got dtype {image.dtype}")
    else:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} must have shape (H, W, 3), got {tuple(image.shape)}")
    return image.to(device)


def _as_probs(probs: ImageLike, name: str, hw, normalized: bool, device) -> torch.Tensor:
    if isinstance(probs, np.ndarray):
        if not np.issubdtype(probs.dtype, np.floating):
            raise ValueError(f"{name} must be a floating-point (K, H, W) array, got dtype {probs.dtype}")
        probs = torch.from_numpy(np.ascontiguousarray(probs))
    elif isinstance(probs, torch.Tensor):
        if not probs.is_floating_point():
            raise ValueError(f"{name} must be a floating-point (K, H, W) tensor, got dtype {probs.dtype}")
    else:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(probs).__name__}")
    if probs.dim() != 3 or probs.shape[0] < 1:
        raise ValueError(f"{name} must have shape (K, H, W) with K >= 1, got {tuple(probs.shape)}")
    if tuple(probs.shape[1:]) != tuple(hw):
        raise ValueError(f"{name} has spatial size {tuple(probs.shape[1:])} but the image is {tuple(hw)}")
    probs = probs.to(device=device, dtype=torch.float32)
    low, high = (float(v) for v in torch.aminmax(probs))  # one pass; NaN propagates into both
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if low < -1e-6 or high > 1 + 1e-5:
        raise ValueError(f"{name} must lie in [0, 1] (min {low:.4g}, max {high:.4g})")
    if normalized:
        err = (probs.sum(dim=0) - 1).abs().max().item()
        if err > 1e-3:
            raise ValueError(f"{name} must sum to 1 over its K labels at every pixel (max |sum - 1| = {err:.3g}); "
                             "pass normalized=False for un-normalised scores such as the official CAM CRF's")
    return probs


# --------------------------------------------------------------------------------------------------- kernels


def crf_features(image: torch.Tensor, params: CRFParams):
    """(H, W, 3) uint8 -> Gaussian features (N, 2) and bilateral features (N, 5), float32, pixel n = y * W + x,
    computed as pydensecrf's DenseCRF2D does (``x / sxy``, ``y / sxy``, ``colour / srgb`` in float32)."""
    h, w = image.shape[:2]
    gaussian = _position_features(h, w, params.gaussian_sxy, image.device)
    return gaussian, _bilateral_features(image, params.bilateral_sxy, params.bilateral_srgb)


def _position_features(h: int, w: int, sxy: float, device) -> torch.Tensor:
    """(H W, 2) float32 ``(x / sxy, y / sxy)``."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    s = torch.tensor(sxy, dtype=torch.float32, device=device)
    return torch.stack([xs.reshape(-1) / s, ys.reshape(-1) / s], dim=1)


def _bilateral_features(image: torch.Tensor, sxy: float, srgb: float) -> torch.Tensor:
    """(H, W, 3) uint8 -> (H W, 5) float32 ``(x / sxy, y / sxy, r / srgb, g / srgb, b / srgb)``."""
    h, w = image.shape[:2]
    rgb = image.reshape(-1, 3).to(torch.float32) / torch.tensor(srgb, dtype=torch.float32, device=image.device)
    return torch.cat([_position_features(h, w, sxy, image.device), rgb], dim=1)


class _LatticeTerm:
    """K~ = D^-1/2 K D^-1/2 of one lattice, D = K 1 + 1e-20 (pydensecrf ``DenseKernel::initLattice``), as a splat
    (M, N) and a slice (N, M) CSR matrix with D^-1/2 folded into their values."""

    def __init__(self, lattice: Lattice):
        self.num_vertices = lattice.num_vertices  # the lattice's own arrays are not kept (cached terms stay small)
        self.blurs = lattice.blur_matrices()
        self.slice = lattice.slice_matrix()  # alpha * weights; D is its product with the blurred splat of ones
        norm = 1.0 / torch.sqrt(lattice.filter_ones(self.blurs, slice_matrix=self.slice) + 1e-20)
        self.slice.values().view(-1, lattice.dim + 1).mul_(norm[:, None])  # rows are points: D^-1/2 on the left
        self.splat = lattice.splat_matrix(norm)

    def nbytes(self) -> int:
        """Bytes held by the term's sparse matrices."""
        mats = [self.splat, self.slice, *self.blurs]
        return sum(t.numel() * t.element_size() for m in mats
                   for t in (m.crow_indices(), m.col_indices(), m.values()))

    def add_to(self, message: torch.Tensor, q: torch.Tensor, compat: float, beta: float = 1.0) -> torch.Tensor:
        """``message = beta * message + compat * K~ q`` in place (beta = 0 ignores its old contents); message and
        q (N, C) float32, contiguous. Returns ``message``."""
        return message.addmm_(self.slice, blur(q, self.blurs, splat=self.splat), beta=beta, alpha=compat)

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """(N, C) -> K~ q (N, C)."""
        return self.add_to(torch.empty_like(q), q.contiguous(), 1.0, beta=0.0)


class _ExactTerm:
    """K~ with the true Gaussian kernel materialised (float64)."""

    def __init__(self, features: torch.Tensor):
        f = features.to(torch.float64)
        k = torch.exp(-0.5 * torch.cdist(f, f).square())
        norm = 1.0 / torch.sqrt(k.sum(dim=1) + 1e-20)
        self.matrix = norm[:, None] * k * norm[None, :]

    def add_to(self, message: torch.Tensor, q: torch.Tensor, compat: float, beta: float = 1.0) -> torch.Tensor:
        update = (compat * (self.matrix @ q.to(torch.float64))).to(torch.float32)
        return message.copy_(update) if beta == 0 else message.mul_(beta).add_(update)

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        return (self.matrix @ q.to(torch.float64)).to(torch.float32)


# The appearance-free Gaussian kernel depends on the image size and sxy only (not on the pixels), so its lattice
# is built once per (H, W, sxy, device) and kept for the next images of that size (VOC: most are 500 x 375).
# Each kept size holds its sparse matrices (500 x 375: 11 MiB at sxy = 3, 28 MiB at sxy = 1); set
# POSITION_CACHE_SIZE = 0 to keep none.
POSITION_CACHE_SIZE = 8
_position_terms: "OrderedDict[tuple, _LatticeTerm]" = OrderedDict()


def _position_term(h: int, w: int, sxy: float, device: torch.device) -> _LatticeTerm:
    size = POSITION_CACHE_SIZE
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"aream_fast.stage2.crf.POSITION_CACHE_SIZE must be an int >= 0, got {size!r}")
    key = (h, w, float(sxy), str(device))
    term = _position_terms.pop(key, None)
    if term is None:
        term = _LatticeTerm(build_lattice(_position_features(h, w, sxy, device)))
    _position_terms[key] = term  # most recently used last
    while len(_position_terms) > size:
        _position_terms.popitem(last=False)
    return term


# below this many labels a hand-written row softmax beats torch.softmax on a CPU (measured on this repo's
# 2-core machine, N = 187 500: K = 3: 2.5 vs 12 ms, K = 12: 6.1 vs 37 ms, K = 21: 9.0 vs 6.3 ms)
_TORCH_SOFTMAX_MIN_LABELS = 16


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Row softmax of (N, K), max-subtracted as pydensecrf's ``expAndNormalize``; may consume ``logits``."""
    if logits.device.type != "cpu" or logits.shape[1] >= _TORCH_SOFTMAX_MIN_LABELS:
        return torch.softmax(logits, dim=1)
    logits -= logits.amax(dim=1, keepdim=True)
    logits.exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


def _mean_field(neg_unary: torch.Tensor, terms, iterations: int) -> torch.Tensor:
    """(N, K) ``-U`` -> (N, K) Q after ``iterations`` mean-field updates ``Q <- softmax(-U + sum_k w_k K~_k Q)``
    (summed in pydensecrf's order: -U, then each kernel's message); ``terms`` is a list of (kernel term, w_k)."""
    q = _softmax_rows(neg_unary.clone())
    for _ in range(iterations):
        message = neg_unary.clone()
        for term, compat in terms:
            term.add_to(message, q, compat)
        q = _softmax_rows(message)
    return q


# --------------------------------------------------------------------------------------------------- public


def dense_crf(image, probs, *, preset: str = "cam", iterations: int = 10, backend: str = "auto",
              normalized: bool = True, device=None, **overrides):
    """Mean-field dense CRF (pydensecrf semantics, see the module docstring) for one image or a batch.

    Args:
        image: (H, W, 3) uint8 numpy array or tensor (RGB as pydensecrf's ``rgbim``), or a list of them, or a
            (B, H, W, 3) batch. A list that repeats the same image object in consecutive entries (several score
            maps of one image, as the la / ha rule) builds that image's bilateral lattice once.
        probs: (K, H, W) float probabilities (or scores in [0, 1]), or a list / (B, K, H, W) batch; each image
            has its own K (e.g. its present classes plus background).
        preset: a name in ``CRF_PRESETS``; ``overrides`` are CRFParams fields that replace the preset's values.
        iterations: mean-field iterations (10 everywhere in the peers' code).
        backend: "fast" / "auto" (permutohedral lattice, matches pydensecrf) or "exact" (true Gaussian,
            materialised; at most ``EXACT_MAX_PIXELS`` pixels).
        normalized: require ``probs`` to sum to 1 over K at every pixel (pass False for un-normalised scores).
        device: where to compute; default the device of ``probs`` if it is a tensor, else CPU.

    Returns:
        Q, (K, H, W) float32 (a tensor on ``device`` if ``probs`` was a tensor, else a numpy array), or a list of
        them for a list input, or (B, K, H, W) for a batch array / tensor.
    """
    params = resolve_params(preset, **overrides)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r}; use one of {_BACKENDS}")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    batched, images, probs_list = _split_batch(image, probs)
    if device is None:
        device = probs_list[0].device if isinstance(probs_list[0], torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    return_numpy = not isinstance(probs_list[0], torch.Tensor)
    outputs = []
    previous: Dict[int, "_LatticeTerm"] = {}  # the last image's bilateral term, reused when the object repeats
    for b, (img, p) in enumerate(zip(images, probs_list)):
        suffix = f"[{b}]" if batched else ""
        img_t = _as_image(img, f"image{suffix}", device)
        p_t = _as_probs(p, f"probs{suffix}", img_t.shape[:2], normalized, device)
        q = _crf_one(img_t, p_t, params, iterations, backend, previous, id(img))
        outputs.append(q.cpu().numpy() if return_numpy else q)
    if batched == "list":
        return outputs
    if batched == "stack":
        return np.stack(outputs) if return_numpy else torch.stack(outputs)
    return outputs[0]


def _split_batch(image, probs):
    """(kind, images, probs): kind None (one image), "list" or "stack" (a 4-D batch)."""
    if isinstance(image, (list, tuple)) or isinstance(probs, (list, tuple)):
        if not (isinstance(image, (list, tuple)) and isinstance(probs, (list, tuple))):
            raise ValueError("image and probs must both be lists (a batch) or both single arrays")
        if len(image) != len(probs) or len(image) == 0:
            raise ValueError(f"image and probs must be non-empty lists of the same length, got {len(image)} "
                             f"and {len(probs)}")
        return "list", list(image), list(probs)
    if getattr(image, "ndim", 0) == 4 or getattr(probs, "ndim", 0) == 4:
        if getattr(image, "ndim", 0) != 4 or getattr(probs, "ndim", 0) != 4 or len(image) != len(probs):
            raise ValueError(f"a batch needs image (B, H, W, 3) and probs (B, K, H, W) with the same B, got "
                             f"{tuple(getattr(image, 'shape', ()))} and {tuple(getattr(probs, 'shape', ()))}")
        return "stack", list(image), list(probs)
    return None, [image], [probs]


def _crf_one(image: torch.Tensor, probs: torch.Tensor, params: CRFParams, iterations: int, backend: str,
             previous: Dict[int, "_LatticeTerm"], image_key: int) -> torch.Tensor:
    """(H, W, 3) uint8 + (K, H, W) float32 -> (K, H, W) float32 Q on one image. ``previous`` maps the key of the
    last image (``id`` of the caller's object) to its bilateral term; it is reused for the same key."""
    k, h, w = probs.shape
    n = h * w
    if backend == "exact" and n > EXACT_MAX_PIXELS:
        raise ValueError(f"backend='exact' materialises an N x N kernel and accepts at most {EXACT_MAX_PIXELS} "
                         f"pixels, got {h}x{w} = {n}; use backend='fast'")
    if backend == "exact":
        gaussian, bilateral = crf_features(image, params)
        terms = [_ExactTerm(gaussian), _ExactTerm(bilateral)]
    else:
        bilateral = previous.get(image_key)
        if bilateral is None:  # keep only this image's term: a long list holds one lattice at a time
            features = _bilateral_features(image, params.bilateral_sxy, params.bilateral_srgb)
            previous.clear()
            bilateral = previous[image_key] = _LatticeTerm(build_lattice(features))
        terms = [_position_term(h, w, params.gaussian_sxy, image.device), bilateral]
    neg_unary = torch.log(probs.clamp(params.unary_clip, 1.0)).reshape(k, n).t().contiguous()  # -U, (N, K)
    q = _mean_field(neg_unary, list(zip(terms, [params.gaussian_compat, params.bilateral_compat])), iterations)
    return q.t().reshape(k, h, w).contiguous()
