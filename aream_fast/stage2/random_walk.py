"""Random walk (PSA-style) of CAM seeds on the trained ViT's own patch affinity: no AffinityNet needed.

PSA (Ahn & Kwak, CVPR 2018; jiwoon-ahn/psa ``infer_aff.py``) propagates the CAM scores, with a background
plane, by t steps of a random walk whose transition is the affinity raised to the power β and normalised:

    T = D^-1 A^β  (D = row sums of A^β),    scores <- T^t scores  (per channel, on the feature grid).

PSA writes ``cam @ (A^β / colsum)`` with a symmetric A; that is the same as ``T scores`` with the row-normalised T
above. Here A is the head-mean softmax attention of the ViT's deep layers (the AReAM-supervised layers by
default), patch rows and patch columns ``softmax(scale q k^T)[C:, C:]`` averaged over layers and heads,
symmetrised ``(A + A^T) / 2``. A is built per image from the q, k that the model's forward exports
(``aream_fast.AttentionRequest``), one image at a time: what is alive is that image's affinity A and its T
(both P x P; ``write_pseudo_masks`` drops A before the next image's is built), plus one more P x P
power while squaring. No batch of P x P matrices is ever made.

How T^t is applied (``method``): "matvec" = t products ``T @ x`` with x (P, C) (cost t P^2 C), "square" =
binary powering by repeated squaring of T (cost about log2(t) P^3 + popcount(t) P^2 C, and a second P x P
buffer while squaring), "auto" = the cheaper of the two by that count. With C = (present classes + 1), t = 64 and
P >= 200 patches, repeated products are cheaper (ViT-S at 448 px: P = 784, 64 * 3 = 192 < 6 * 784), so "auto"
almost always picks "matvec", which also never needs a second P x P buffer.

Shapes: k present classes, (H, W) image size, (h, w) = (ceil(H / s), ceil(W / s)) affinity grid for the patch size
s, P = h * w (row-major, as the ViT's patch tokens).
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ROW_CHUNK = 1024  # rows of the P x P matrix processed at a time in the power / mask / normalise step
RW_METHODS = ("auto", "matvec", "square")


class RWParams(NamedTuple):
    """Random-walk parameters. Background plane: ``bg_threshold`` (a constant) or ``bg_power`` a
    (``(1 - max_k cam_k) ** a``); exactly one is set. ``radius``: affinity only between grid cells with
    dy^2 + dx^2 < radius^2 (PSA's search radius), None = all pairs. ``source``: where the numbers come from."""

    beta: float
    t: int
    bg_threshold: Optional[float]
    bg_power: Optional[float]
    radius: Optional[float]
    source: str


RW_PRESETS: Mapping[str, RWParams] = {
    # jiwoon-ahn/psa infer_aff.py defaults: --beta 8, --logt 8 (T squared 8 times: t = 256), --alpha 16;
    # radius 5 ("gamma = 5" in the PSA README) on the affinity grid.
    "psa": RWParams(beta=8.0, t=256, bg_threshold=None, bg_power=16.0, radius=5.0,
                    source="jiwoon-ahn/psa infer_aff.py defaults: beta 8, logt 8 (t 256), bg (1-max)^16, radius 5"),
    # Jessie459/AReAM main_psa.sh = xulianuwa/MCTformer psa/infer_aff.py: --beta 8, --logt 6 (t = 64),
    # constant background 0.39 ("the optimal one for seeds"), radius 5.
    "aream": RWParams(beta=8.0, t=64, bg_threshold=0.39, bg_power=None, radius=5.0,
                      source="Jessie459/AReAM main_psa.sh / MCTformer psa/infer_aff.py: beta 8, logt 6 (t 64), "
                             "bg 0.39, radius 5"),
}
RW_PRESETS["mctformer"] = RW_PRESETS["aream"]


def rw_params(preset: str = "aream", **overrides) -> RWParams:
    """The preset's parameters with ``overrides`` (beta, t, bg_threshold, bg_power, radius) applied; None values
    are ignored, radius 0 means all pairs (None). Giving ``bg_threshold`` clears the preset's ``bg_power`` and
    vice versa."""
    if preset not in RW_PRESETS:
        raise ValueError(f"random-walk preset must be one of {sorted(RW_PRESETS)}, got {preset!r}")
    bad = sorted(set(overrides) - {"beta", "t", "bg_threshold", "bg_power", "radius"})
    if bad:
        raise ValueError(f"unknown random-walk parameters {bad}; allowed: beta, t, bg_threshold, bg_power, radius")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "bg_threshold" in given and "bg_power" in given:
        raise ValueError("give either bg_threshold (constant background) or bg_power ((1 - max)^a), not both")
    p = RW_PRESETS[preset]._asdict()
    if "bg_threshold" in given:
        p["bg_power"] = None
    if "bg_power" in given:
        p["bg_threshold"] = None
    p.update(given)
    if p["radius"] == 0:
        p["radius"] = None
    out = RWParams(**p)
    if not (math.isfinite(out.beta) and out.beta > 0):
        raise ValueError(f"beta must be a positive number, got {out.beta}")
    if int(out.t) != out.t or out.t < 0:
        raise ValueError(f"t must be a non-negative integer number of steps, got {out.t}")
    if out.radius is not None and not out.radius > 0:
        raise ValueError(f"radius must be positive or None, got {out.radius}")
    return out._replace(t=int(out.t))


# ---------------------------------------------------------------------------------------------------------------
# affinity from the ViT's attention
def attention_affinity(qs: Sequence[Tensor], ks: Sequence[Tensor], *, num_prefix_tokens: int, scale: float,
                       symmetric: bool = True) -> Tensor:
    """A = mean over layers and heads of softmax(scale q k^T)[C:, C:] (patch rows, patch columns) of ONE image.

    qs, ks: one (H, N, d) or (1, H, N, d) tensor per layer, N = C + P. Returns (P, P) float32, symmetrised
    (A + A^T) / 2 when ``symmetric``. One head's (N, N) logits at a time are materialised besides the (P, P)
    accumulator (and one transposed copy while symmetrising).
    """
    if len(qs) == 0 or len(qs) != len(ks):
        raise ValueError(f"qs and ks must hold the same number (>= 1) of layers, got {len(qs)} and {len(ks)}")
    c = int(num_prefix_tokens)
    acc = None
    count = 0
    for q, k in zip(qs, ks):
        if q.dim() == 4:
            if q.shape[0] != 1 or k.shape[0] != 1:
                raise ValueError(f"attention_affinity takes one image: q/k batch must be 1, got {q.shape[0]}")
            q, k = q[0], k[0]
        if q.dim() != 3 or q.shape != k.shape:
            raise ValueError(f"q and k must both be (H, N, d), got {tuple(q.shape)} and {tuple(k.shape)}")
        n = q.shape[1]
        if not 0 <= c < n:
            raise ValueError(f"num_prefix_tokens {c} must be in [0, N = {n})")
        if acc is None:
            acc = torch.zeros(n - c, n - c, dtype=torch.float32, device=q.device)
        elif acc.shape[0] != n - c:
            raise ValueError(f"every layer must have the same token count, got N = {n} after {acc.shape[0] + c}")
        for head in range(q.shape[0]):
            logits = (q[head, c:].float() @ k[head].float().T).mul_(scale)  # (P, N): patch rows only
            acc += torch.softmax(logits, dim=-1)[:, c:]
            count += 1
    acc /= count
    if symmetric:
        acc = acc.add_(acc.T.clone()).mul_(0.5)
    return acc


def _grid_of(size: Tuple[int, int], patch_size: int) -> Tuple[int, int]:
    return -(-int(size[0]) // patch_size), -(-int(size[1]) // patch_size)


@torch.no_grad()
def vit_affinity(model: nn.Module, image: Tensor, *, layers: Sequence[int], symmetric: bool = True) -> Tensor:
    """The trained ViT's own patch affinity for one image (eval mode, restored afterwards).

    image (3, H, W) normalised, any size: zero-padded right / bottom to a multiple of the patch size (as
    ``aream_fast.inference_cam``), one forward exporting the q, k of ``layers``. Returns (P, P) float32,
    P = ceil(H / s) * ceil(W / s) (``attention_affinity``).
    """
    from aream_fast import AttentionRequest

    if not isinstance(image, Tensor) or image.dim() != 3:
        raise ValueError(f"image must be a (3, H, W) tensor, got {getattr(image, 'shape', type(image))}")
    layers = tuple(int(layer) for layer in layers)
    if not layers or any(not 0 <= layer < model.depth for layer in layers):
        raise ValueError(f"layers must name layers in [0, {model.depth}), got {layers!r}")
    ps = model.patch_size
    hh, ww = image.shape[-2:]
    h, w = _grid_of((hh, ww), ps)
    x = F.pad(image[None], (0, w * ps - ww, 0, h * ps - hh))
    was_training = model.training
    model.eval()
    try:
        rec = model(x, AttentionRequest(refine_layers=layers)).records
    finally:
        model.train(was_training)
    return attention_affinity([rec.qs[layer] for layer in layers], [rec.ks[layer] for layer in layers],
                              num_prefix_tokens=rec.num_prefix_tokens, scale=rec.scale, symmetric=symmetric)


# ---------------------------------------------------------------------------------------------------------------
# transition and propagation
def transition_matrix(affinity: Tensor, grid: Tuple[int, int], *, beta: float,
                      radius: Optional[float] = None) -> Tensor:
    """T = D^-1 A^β with pairs at grid distance >= ``radius`` removed (A = 0 there): (P, P) float32.

    Computed in place on a float32 copy of ``affinity`` (P, P), non-negative, as row-wise softmax(β log A)
    (the same numbers as A^β / rowsum, without underflow of A^β for attention values ~1 / P). A row without
    any positive entry in reach raises ValueError.
    """
    h, w = int(grid[0]), int(grid[1])
    p = h * w
    if not isinstance(affinity, Tensor) or affinity.shape != (p, p):
        raise ValueError(f"affinity must be a (P, P) = ({p}, {p}) tensor for the {h}x{w} grid, got "
                         f"{getattr(affinity, 'shape', type(affinity))}")
    if not torch.isfinite(affinity).all() or (affinity < 0).any():
        raise ValueError("affinity must be finite and non-negative")
    trans = affinity.to(torch.float32, copy=True)
    ys = torch.arange(h, device=trans.device).repeat_interleave(w).to(torch.float32)
    xs = torch.arange(w, device=trans.device).repeat(h).to(torch.float32)
    for r0 in range(0, p, _ROW_CHUNK):
        block = trans[r0:r0 + _ROW_CHUNK]
        block.log_().mul_(beta)  # log 0 = -inf: no transition
        if radius is not None:
            d2 = (ys[r0:r0 + _ROW_CHUNK, None] - ys[None]) ** 2 + (xs[r0:r0 + _ROW_CHUNK, None] - xs[None]) ** 2
            block.masked_fill_(d2 >= float(radius) ** 2, float("-inf"))
        top = block.amax(dim=1, keepdim=True)
        if not torch.isfinite(top).all():
            raise ValueError("affinity has a row with no positive entry within the radius: no transition")
        block.sub_(top).exp_()
        block.div_(block.sum(dim=1, keepdim=True))
    return trans


def choose_method(t: int, channels: int, p: int) -> str:
    """"matvec" when t * channels <= floor(log2 t) * P (t products T @ x cost t P^2 C; squaring costs about
    log2(t) P^3), else "square"."""
    if t <= 1:
        return "matvec"
    return "matvec" if t * channels <= int(math.log2(t)) * p else "square"


def apply_transition(trans: Tensor, x: Tensor, t: int, *, method: str = "auto") -> Tensor:
    """T^t x for T (P, P) and x (P, C) float32; ``method`` as in the module docstring. Returns (P, C)."""
    if method not in RW_METHODS:
        raise ValueError(f"method must be one of {RW_METHODS}, got {method!r}")
    if method == "auto":
        method = choose_method(t, x.shape[1], x.shape[0])
    if method == "matvec":
        # as rows: x^T <- x^T T^T, (C, P) @ (P, P)^T; measured several times faster on CPU than T @ x with a
        # skinny (P, C) right-hand side (benchmarks/RESULTS.md, "Random walk")
        xt = x.T.contiguous()
        trans_t = trans.T
        for _ in range(t):
            xt = xt @ trans_t
        return xt.T
    power = trans
    while t:
        if t & 1:
            x = power @ x
        t >>= 1
        if t:
            power = power @ power
    return x


def background_plane(cams: Tensor, *, threshold: Optional[float] = None, power: Optional[float] = None) -> Tensor:
    """(H, W) background scores for cams (k, H, W): the constant ``threshold`` or (1 - max_k cam_k) ** ``power``
    (1 where k = 0). Exactly one of the two must be given."""
    if (threshold is None) == (power is None):
        raise ValueError("give exactly one of threshold (constant background) and power ((1 - max)^a)")
    if threshold is not None:
        return cams.new_full(cams.shape[1:], float(threshold))
    top = cams.amax(0) if cams.shape[0] else cams.new_zeros(cams.shape[1:])
    return (1.0 - top).clamp_(min=0.0).pow_(float(power))


def propagate(scores: Tensor, trans: Tensor, t: int, *, patch_size: int, method: str = "auto") -> Tensor:
    """PSA's propagation of score planes on the affinity grid.

    scores (C, H, W) float: zero-padded right / bottom to the grid, s x s average-pooled (s = patch_size) to
    (C, h, w), multiplied by T^t (``apply_transition``), bilinearly upsampled (align_corners False) to the padded
    size, cropped to (H, W). trans (P, P), P = h * w. Returns (C, H, W) float32.
    """
    c, hh, ww = scores.shape
    h, w = _grid_of((hh, ww), patch_size)
    if trans.shape != (h * w, h * w):
        raise ValueError(f"transition must be (P, P) = ({h * w}, {h * w}) for {hh}x{ww} scores and patch size "
                         f"{patch_size}, got {tuple(trans.shape)}")
    x = F.pad(scores.to(torch.float32)[None], (0, w * patch_size - ww, 0, h * patch_size - hh))
    x = F.avg_pool2d(x, patch_size)[0].reshape(c, h * w)
    x = apply_transition(trans, x.T.contiguous().to(trans.device), t, method=method).T.reshape(1, c, h, w)
    x = F.interpolate(x, size=(h * patch_size, w * patch_size), mode="bilinear", align_corners=False)
    return x[0, :, :hh, :ww].to(scores.device)


def _as_cams(cams: Union[Tensor, np.ndarray]) -> Tensor:
    cams = torch.as_tensor(np.asarray(cams) if isinstance(cams, np.ndarray) else cams)
    if cams.dim() != 3 or not cams.is_floating_point():
        raise ValueError(f"cams must be a (k, H, W) float array, got shape {tuple(cams.shape)} dtype {cams.dtype}")
    if not torch.isfinite(cams).all():
        raise ValueError("cams hold NaN or infinite values")
    return cams.to(torch.float32)


def random_walk(cams: Union[Tensor, np.ndarray], affinity, *, patch_size: int, preset: str = "aream",
                beta: Optional[float] = None, t: Optional[int] = None, bg_threshold: Optional[float] = None,
                bg_power: Optional[float] = None, radius: Optional[float] = None, method: str = "auto",
                layers: Optional[Sequence[int]] = None) -> Tensor:
    """Random walk of one image's CAMs with a background plane on its patch affinity (PSA ``infer_aff.py``).

    cams: (k, H, W) float in [0, 1] (present classes, as in the ``.npy`` seeds). affinity: (P, P) non-negative
    tensor on the (ceil(H / s), ceil(W / s)) grid of ``patch_size`` s, or the ``AttentionRecords`` of a forward of
    that (padded) image (its q, k of ``layers``, default all recorded layers, give ``attention_affinity``).
    preset: a name of ``RW_PRESETS``; beta, t, bg_threshold / bg_power, radius override it. method: how T^t is
    applied (module docstring). Returns (k + 1, H, W) float32 propagated scores: plane 0 background, plane i
    the class of CAM row i - 1; the pseudo label is their argmax.
    """
    params = rw_params(preset, beta=beta, t=t, bg_threshold=bg_threshold, bg_power=bg_power, radius=radius)
    cams = _as_cams(cams)
    if int(patch_size) != patch_size or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
    grid = _grid_of(cams.shape[1:], int(patch_size))
    if not isinstance(affinity, Tensor):  # AttentionRecords of the padded image
        rec = affinity
        use = tuple(sorted(rec.qs)) if layers is None else tuple(layers)
        missing = [layer for layer in use if layer not in rec.qs]
        if missing or not use:
            raise ValueError(f"the records lack q/k of affinity layers {missing or use}")
        if tuple(rec.grid) != grid:
            raise ValueError(f"records are for a {rec.grid} patch grid, the cams need {grid}")
        affinity = attention_affinity([rec.qs[layer] for layer in use], [rec.ks[layer] for layer in use],
                                      num_prefix_tokens=rec.num_prefix_tokens, scale=rec.scale)
    trans = transition_matrix(affinity, grid, beta=params.beta, radius=params.radius)
    bg = background_plane(cams, threshold=params.bg_threshold, power=params.bg_power)
    scores = torch.cat([bg[None], cams], dim=0)
    return propagate(scores, trans, params.t, patch_size=int(patch_size), method=method)
