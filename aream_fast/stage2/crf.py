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
  approximation pydensecrf computes, so masks match pydensecrf; the lattice is built once per image and kernel.
* ``"exact"``: K is the true Gaussian ``exp(-|f_i - f_j|^2 / 2)`` materialised as an N x N matrix (float64),
  the mathematical model the lattice approximates. For tests and tiny images only (N <= ``EXACT_MAX_PIXELS``).

Parameter presets (``CRF_PRESETS``) are the ones peers use (docs/semantics.md, Stage two).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Sequence, Union

import numpy as np
import torch

from .permutohedral import Lattice, build_lattice, csr, csr_rows

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
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if bool((probs < -1e-6).any()) or bool((probs > 1 + 1e-5).any()):
        raise ValueError(f"{name} must lie in [0, 1] (min {probs.min().item():.4g}, max {probs.max().item():.4g})")
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
    dev = image.device
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=dev),
                            torch.arange(w, dtype=torch.float32, device=dev), indexing="ij")
    xs, ys = xs.reshape(-1), ys.reshape(-1)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32, device=dev)  # noqa: E731
    gaussian = torch.stack([xs / f32(params.gaussian_sxy), ys / f32(params.gaussian_sxy)], dim=1)
    rgb = image.reshape(-1, 3).to(torch.float32) / f32(params.bilateral_srgb)
    bilateral = torch.cat([xs[:, None] / f32(params.bilateral_sxy), ys[:, None] / f32(params.bilateral_sxy), rgb],
                          dim=1)
    return gaussian, bilateral


class _LatticeKernels:
    """sum_k w_k K~_k Q over several lattices at once: one stacked splat, each lattice's blur, one stacked slice.

    K~_k = D_k^-1/2 K_k D_k^-1/2 with D_k = K_k 1 + 1e-20 (pydensecrf ``DenseKernel::initLattice``); the
    normalisation and the weight w_k are folded into the splat (n) and slice (w n) matrices.
    """

    def __init__(self, lattices: Sequence[Lattice], compats: Sequence[float]):
        self.lattices = list(lattices)
        n = self.lattices[0].num_points
        crows, cols, vals, slice_cols, slice_vals, self.bounds = [], [], [], [], [], [0]
        for lattice, compat in zip(self.lattices, compats):
            norm = 1.0 / torch.sqrt(lattice.filter_ones() + 1e-20)
            crow, col, val = lattice.splat_parts(norm)
            crows.append(crow)
            cols.append(col)
            vals.append(val)
            sc, sv = lattice.slice_parts(norm * compat)
            slice_cols.append(sc + self.bounds[-1])
            slice_vals.append(sv)
            self.bounds.append(self.bounds[-1] + lattice.num_vertices)
        nnz = [0]
        for crow in crows[:-1]:
            nnz.append(nnz[-1] + int(crow[-1]))
        crow = torch.cat([c[:-1] + off for c, off in zip(crows, nnz)] + [crows[-1][-1:] + nnz[-1]])
        self.splat = csr(crow, torch.cat(cols), torch.cat(vals), (self.bounds[-1], n))
        self.slice = csr_rows(torch.cat(slice_cols, dim=1), torch.cat(slice_vals, dim=1), self.bounds[-1])

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        lattice_values = torch.sparse.mm(self.splat, q)
        blurred = [lattice.blur(lattice_values[lo:hi])
                   for lattice, lo, hi in zip(self.lattices, self.bounds[:-1], self.bounds[1:])]
        return torch.sparse.mm(self.slice, torch.cat(blurred))


class _ExactKernel:
    """w K~ Q with the true Gaussian kernel materialised (float64)."""

    def __init__(self, features: torch.Tensor, compat: float):
        f = features.to(torch.float64)
        k = torch.exp(-0.5 * torch.cdist(f, f).square())
        norm = 1.0 / torch.sqrt(k.sum(dim=1) + 1e-20)
        self.matrix = (compat * norm[:, None] * k * norm[None, :])

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return (self.matrix @ q.to(torch.float64)).to(torch.float32)


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Row softmax of (N, K), max-subtracted as pydensecrf's ``expAndNormalize`` (faster than torch.softmax on
    a CPU for small K); consumes ``logits``."""
    logits -= logits.amax(dim=1, keepdim=True)
    logits.exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


def _mean_field(unary: torch.Tensor, kernels, iterations: int) -> torch.Tensor:
    """(N, K) unary -> (N, K) Q after ``iterations`` mean-field updates ``Q <- softmax(-U + sum_k w_k K~_k Q)``."""
    q = _softmax_rows(-unary)
    for _ in range(iterations):
        message = -unary
        for kernel in kernels:
            message += kernel(q)
        q = _softmax_rows(message)
    return q


# --------------------------------------------------------------------------------------------------- public


def dense_crf(image, probs, *, preset: str = "cam", iterations: int = 10, backend: str = "auto",
              normalized: bool = True, device=None, **overrides):
    """Mean-field dense CRF (pydensecrf semantics, see the module docstring) for one image or a batch.

    Args:
        image: (H, W, 3) uint8 numpy array or tensor (RGB as pydensecrf's ``rgbim``), or a list of them, or a
            (B, H, W, 3) batch.
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
    for b, (img, p) in enumerate(zip(images, probs_list)):
        suffix = f"[{b}]" if batched else ""
        img_t = _as_image(img, f"image{suffix}", device)
        p_t = _as_probs(p, f"probs{suffix}", img_t.shape[:2], normalized, device)
        q = _crf_one(img_t, p_t, params, iterations, backend)
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


def _crf_one(image: torch.Tensor, probs: torch.Tensor, params: CRFParams, iterations: int,
             backend: str) -> torch.Tensor:
    """(H, W, 3) uint8 + (K, H, W) float32 -> (K, H, W) float32 Q on one image."""
    k, h, w = probs.shape
    n = h * w
    if backend == "exact" and n > EXACT_MAX_PIXELS:
        raise ValueError(f"backend='exact' materialises an N x N kernel and accepts at most {EXACT_MAX_PIXELS} "
                         f"pixels, got {h}x{w} = {n}; use backend='fast'")
    gaussian, bilateral = crf_features(image, params)
    if backend == "exact":
        kernels = [_ExactKernel(gaussian, params.gaussian_compat), _ExactKernel(bilateral, params.bilateral_compat)]
    else:
        kernels = [_LatticeKernels([build_lattice(gaussian), build_lattice(bilateral)],
                                   [params.gaussian_compat, params.bilateral_compat])]
    unary = -torch.log(probs.clamp(params.unary_clip, 1.0)).reshape(k, n).t()
    q = _mean_field(unary, kernels, iterations)
    return q.t().reshape(k, h, w).contiguous()
