"""Per-layer spatial entropy of attention-refined CAMs and the entropy layer weights ('E' mode) of AReAM.

Official source: Jessie459/AReAM ``ent_voc_mctformer.py`` (docs/semantics.md, "Entropy layer weights") and the 'E'
weighting in
``main_voc_mctformer.py`` / ``tools/camutils.py`` (docs/semantics.md, "Affinity loss", "CAM refinement"). Per image and
layer l:

1. Ā_l = mean over heads of softmax(Z_l), Z_l = scale · q_l k_lᵀ (pre-softmax logits), over all N = C + P tokens;
2. R_l = Ā_l[C:, C:] (patch block; rows do not sum to 1 because the class columns are dropped);
3. F_l = R_l · CAM_v with CAM_v = the model's cam restricted to the image's present classes, i.e.
   F_l[k, m] = Σ_n R_l[m, n] · CAM_v[k, n] (official ``einsum("bmn,bcn->bcm")``), shape (K_present, P);
4. s = Σ_k F_l[k, :] ∈ R^P, p = softmax over the P positions of s (raw values, temperature 1),
   E_l(img) = −Σ_m p_m log₂ p_m (no epsilon in the MCTformer script);
E_l = mean over images.

Here F_l is computed by ``aream_fast.pseudo_labels.refine.attention_apply`` from the layer's q, k (SDPA with
V = [0; CAM_v]): no N x N matrix is formed (docs/semantics.md, "Fast path", item 5).

Where p underflows to exactly 0, the official ``p · log₂ p`` is 0 · (−inf) = NaN and poisons the mean. We keep the
official formula by default (``eps=None``) and let :class:`EntropyAccumulator` skip and count NaN images, with a
warning. ``eps > 0`` uses ``log₂(p + eps)`` instead (the Conformer script uses eps = 1e-6).

Weights (docs/semantics.md, "Entropy layer weights", "Affinity loss"): e = (E − min E) / (max E − min E) over all
layers; the loss on layer
l ≥ layer_index is weighted by e_l, the refinement with layer l < layer_index by 1 − e_l (not renormalised).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from aream_fast.pseudo_labels.refine import attention_apply

ENTROPY_NPY = "entropy.npy"
ENTROPY_JSON = "entropy.json"


def spatial_entropy(refined_cam: Tensor, *, eps: Optional[float] = None) -> Tensor:
    """Official spatial entropy of a refined CAM (docs/semantics.md, "Entropy layer weights").

    refined_cam: (B, K, P) F_l of each image (K classes summed; K may be 0, which gives s = 0, uniform p and
        E = log₂ P, as the official ``sum(0)`` over an empty class axis would).
    eps: None (official MCTformer formula, log₂ p, NaN where p underflows to 0) or a float > 0 (log₂(p + eps)).
    Returns (B,) float32 (float64 if ``refined_cam`` is float64): E = −Σ_m p_m log₂ p_m, p = softmax_m(Σ_k F[k, m]).
    """
    if not isinstance(refined_cam, Tensor) or refined_cam.dim() != 3:
        raise ValueError(f"refined_cam must be a (B, K, P) tensor, got "
                         f"{tuple(refined_cam.shape) if isinstance(refined_cam, Tensor) else type(refined_cam)}")
    if not refined_cam.is_floating_point():
        raise ValueError(f"refined_cam must be floating point, got dtype {refined_cam.dtype}")
    if eps is not None and not (eps > 0.0):
        raise ValueError(f"eps must be None (official formula) or > 0, got {eps}")
    work = refined_cam if refined_cam.dtype == torch.float64 else refined_cam.float()
    s = work.sum(dim=1)  # (B, P)
    p = s.softmax(dim=-1)
    logp = torch.log2(p) if eps is None else torch.log2(p + eps)
    return -(p * logp).sum(dim=-1)


def _check_qk(qs: Sequence[Tensor], ks: Sequence[Tensor]) -> None:
    if len(qs) != len(ks) or len(qs) == 0:
        raise ValueError(f"qs and ks must be non-empty sequences of equal length, got {len(qs)} and {len(ks)}")
    for i, (q, k) in enumerate(zip(qs, ks)):
        if q.dim() != 4 or q.shape != k.shape:
            raise ValueError(f"qs[{i}] and ks[{i}] must both be (B, H, N, d) with equal shapes, got "
                             f"{tuple(q.shape)} and {tuple(k.shape)}")


def present_class_cam(cam: Tensor, labels: Tensor) -> Tensor:
    """CAM_v of docs/semantics.md, "Entropy layer weights": the cam of the present classes of ONE image.

    cam: (1, K, h, w) or (1, K, P); labels: (1, K) or (K,) multi-hot. Returns (1, K_present, P) with the present
    classes in increasing class order (official ``cam[:, nonzero(labels)]``).
    """
    if cam.dim() not in (3, 4) or cam.shape[0] != 1:
        raise ValueError(f"cam must be (1, K, h, w) or (1, K, P) (one image), got {tuple(cam.shape)}")
    lab = labels.reshape(-1)
    if lab.numel() != cam.shape[1]:
        raise ValueError(f"labels must have K={cam.shape[1]} entries, got shape {tuple(labels.shape)}")
    idx = torch.nonzero(lab.to(cam.device) > 0, as_tuple=False)[:, 0]
    return cam.reshape(1, cam.shape[1], -1)[:, idx]


def refined_cams(qs: Sequence[Tensor], ks: Sequence[Tensor], cam_v: Tensor, *, num_prefix_tokens: int,
                 scale: float) -> Tensor:
    """F_l = R_l · CAM_v for each layer separately (docs/semantics.md, "Entropy layer weights"), by attention-apply (no
    N x N).

    qs, ks: sequence over L layers of (B, H, N, d). cam_v: (B, K, P). Returns (L, B, K, P) float32.
    """
    qs, ks = list(qs), list(ks)
    _check_qk(qs, ks)
    b, _, n, _ = qs[0].shape
    p = n - int(num_prefix_tokens)
    if cam_v.dim() != 3 or cam_v.shape[0] != b or cam_v.shape[2] != p:
        raise ValueError(f"cam_v must be (B, K, P) = ({b}, K, {p}), got {tuple(cam_v.shape)}")
    if cam_v.shape[1] == 0:
        return cam_v.new_zeros(len(qs), b, 0, p, dtype=torch.float32)
    return torch.stack([attention_apply([q], [k], cam_v, num_prefix_tokens=num_prefix_tokens, scale=scale)
                        for q, k in zip(qs, ks)])


def layer_entropies(qs: Sequence[Tensor], ks: Sequence[Tensor], cam: Tensor, labels: Tensor, *,
                    num_prefix_tokens: int, scale: float, eps: Optional[float] = None) -> Tensor:
    """Official per-layer entropy E_l(img) of ONE image (docs/semantics.md, "Entropy layer weights"), from its
    per-layer q, k.

    qs, ks: sequence over L layers of (1, H, N, d) (``AttentionRecords.qs[l]`` for every layer, eval mode).
    cam: (1, K, h, w) the model's cam (``ViTOutput.cam``; MCTformer: ReLU'd conv map without the
        class-attention product). labels: (1, K) or (K,) multi-hot image labels.
    Returns (L,) float32: E_l(img) for each given layer, NaN where the official formula gives NaN (eps=None).
    """
    cam_v = present_class_cam(cam, labels)
    f = refined_cams(qs, ks, cam_v, num_prefix_tokens=num_prefix_tokens, scale=scale)  # (L, 1, Kv, P)
    return spatial_entropy(f[:, 0], eps=eps)


class EntropyAccumulator:
    """Mean over images of per-layer entropies, skipping (and counting) images with a non-finite value.

    ``update(E_img)`` takes (L,) values of one image. An image with any NaN/inf layer is skipped as a whole and
    counted in ``n_skipped`` (a ``RuntimeWarning`` names it); the official MCTformer script would instead return
    NaN for the whole vector, and the Conformer script skips such images but still divides by the dataset size
    (``mean_including_skipped`` reproduces that).
    """

    def __init__(self, num_layers: int) -> None:
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        self.num_layers = int(num_layers)
        self._sum = np.zeros(self.num_layers, dtype=np.float64)
        self.n_used = 0
        self.n_skipped = 0
        self.skipped_names: list = []

    def update(self, values: Union[Tensor, np.ndarray], name: str = "") -> bool:
        """Add one image's (L,) entropies. Returns False (and warns) if the image was skipped."""
        v = values.detach().double().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values, np.float64)
        if v.shape != (self.num_layers,):
            raise ValueError(f"values must have shape ({self.num_layers},), got {v.shape}")
        if not np.all(np.isfinite(v)):
            self.n_skipped += 1
            self.skipped_names.append(name)
            bad = [i for i in range(self.num_layers) if not np.isfinite(v[i])]
            warnings.warn(f"entropy of image {name!r} is not finite at layers {bad} (softmax underflow in the "
                          f"official log2(p) without eps); the image is skipped. Pass eps > 0 to avoid this.",
                          RuntimeWarning, stacklevel=2)
            return False
        self._sum += v
        self.n_used += 1
        return True

    def mean(self) -> np.ndarray:
        """(L,) mean over the images used (skipped images excluded from the denominator)."""
        if self.n_used == 0:
            raise ValueError("no image with a finite entropy was accumulated")
        return self._sum / self.n_used

    def mean_including_skipped(self) -> np.ndarray:
        """(L,) sum over used images divided by all images seen (the Conformer script's convention)."""
        total = self.n_used + self.n_skipped
        if total == 0:
            raise ValueError("no image was accumulated")
        return self._sum / total


def normalise_entropy(entropy: Union[Tensor, np.ndarray, Sequence[float]]) -> np.ndarray:
    """Min-max normalisation e = (E − min E) / (max E − min E) over all layers
    (docs/semantics.md, "Entropy layer weights"). Returns (L,) float64."""
    e = np.asarray(entropy.detach().cpu().numpy() if isinstance(entropy, Tensor) else entropy, dtype=np.float64)
    if e.ndim != 1 or e.size < 2:
        raise ValueError(f"entropy must be a 1-D vector with at least 2 layers, got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise ValueError(f"entropy must be finite, got {e.tolist()}")
    lo, hi = float(e.min()), float(e.max())
    if hi - lo <= 0.0:
        raise ValueError(f"entropy has equal values at every layer ({lo}); min-max normalisation is undefined")
    return (e - lo) / (hi - lo)


def entropy_to_layer_weights(entropy: Union[Tensor, np.ndarray, Sequence[float]],
                             layer_index: int) -> Tuple[np.ndarray, np.ndarray]:
    """Official 'E' layer weights from a per-layer entropy vector (docs/semantics.md, "Entropy layer weights",
    "Affinity loss", "CAM refinement").

    entropy: (L,) raw E_l (as saved by ``scripts/analyze_layers.py``); it is min-max normalised here to e.
    layer_index: first supervised layer (MCTformer 7, Conformer 9), 0 < layer_index < L.
    Returns (loss_weights, refine_weights): loss_weights (L − layer_index,) = e_l for l ≥ layer_index, in layer
    order (for ``aream_loss(layer_weights=...)``); refine_weights (layer_index,) = 1 − e_l for l < layer_index
    (for ``attention_apply(layer_weights=...)`` / ``pseudo_label_cams(refine_weights=...)``). Not renormalised.
    """
    e = normalise_entropy(entropy)
    if not 0 < int(layer_index) < e.size:
        raise ValueError(f"layer_index must be in [1, {e.size - 1}] for {e.size} layers, got {layer_index}")
    li = int(layer_index)
    return e[li:].copy(), 1.0 - e[:li]


def save_entropy(out_dir: str, entropy: Union[Tensor, np.ndarray], meta: Optional[Mapping[str, Any]] = None
                 ) -> Tuple[str, str]:
    """Write ``entropy.npy`` ((L,) float64, raw E_l, as the official ``ent_voc_*.npy``) and ``entropy.json``
    (the same vector under "entropy", its min-max normalisation under "normalised", plus ``meta``).
    Returns the two paths."""
    e = np.asarray(entropy.detach().cpu().numpy() if isinstance(entropy, Tensor) else entropy, dtype=np.float64)
    if e.ndim != 1:
        raise ValueError(f"entropy must be 1-D (L,), got shape {e.shape}")
    os.makedirs(out_dir, exist_ok=True)
    npy = os.path.join(out_dir, ENTROPY_NPY)
    js = os.path.join(out_dir, ENTROPY_JSON)
    np.save(npy, e)
    try:
        normalised = normalise_entropy(e).tolist()
    except ValueError:
        normalised = None
    payload: Dict[str, Any] = {"entropy": e.tolist(), "normalised": normalised, "num_layers": int(e.size)}
    payload.update(dict(meta or {}))
    with open(js, "w") as f:
        json.dump(payload, f, indent=2)
    return npy, js


def load_entropy(path: str) -> np.ndarray:
    """Read a raw (L,) entropy vector (what ``train.py --layer-weights`` takes): ``.npy`` (``entropy.npy`` or
    the official ``ent_voc_*.npy``) or ``.json`` (a list, or a dict with an "entropy" / "entropies" /
    "layer_entropy" list). Returns float64 (L,); ``FileNotFoundError`` / ``ValueError`` naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--layer-weights file {path!r} does not exist")
    if path.endswith(".npy"):
        values = np.load(path, allow_pickle=False)
    elif path.endswith(".json"):
        with open(path) as fh:
            content = json.load(fh)
        if isinstance(content, dict):
            for key in ("entropy", "entropies", "layer_entropy"):
                if key in content:
                    content = content[key]
                    break
            else:
                raise ValueError(f"--layer-weights JSON {path!r} is a dict without an 'entropy' or 'entropies' "
                                 f"key (keys: {sorted(content)})")
        values = content
    else:
        raise ValueError(f"--layer-weights must be a .npy or .json file, got {path!r}")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"--layer-weights {path!r} must hold a 1-D vector of per-layer entropies, "
                         f"got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"--layer-weights {path!r} holds non-finite entropies: {values.tolist()}")
    return values


def max_entropy(num_patches: int) -> float:
    """log₂ P: the entropy of a uniform map over P patches (upper bound of E_l)."""
    return math.log2(int(num_patches))
