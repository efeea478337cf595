"""Built-in procedural WSSS dataset, written once to a cache folder in the VOC layout.

Scenes: a textured, shaded, noisy background with unlabelled distractors (elongated blobs and bars in the
objects' colours), and 1-4 objects of 6 shape classes (circle, square, triangle, star, ring, cross), each with a
colour drawn around a class hue (neighbouring palettes overlap), a texture (stripes, checker, dots, radial
shading; the class's preferred one half of the time), random size and rotation. Later objects occlude earlier
ones, objects may be cut by the image border, and classes co-occur in pairs (circle+ring, square+cross,
triangle+star) so that an image-level classifier can lean on context. Masks: 0 background, k+1 class k, and 255
on a thin band along every label boundary (like VOC's outline band). Image-level labels are the classes visible
in the mask.

Layout written (read by the same loader as VOC)::

    root/JPEGImages/<name>.jpg
    root/SegmentationClassAug/<name>.png         (palette PNG of ids)
    root/ImageSets/Segmentation/{train,val}.txt
    root/cls_labels.npy                          (pickled dict name -> float32[6])
    root/synthetic_meta.json                     (parameters; written last: marks a complete cache)

Every image is a function of (seed, split, index) only, so it does not depend on the split sizes.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

from .classes import SYNTHETIC_CLASSES
from .image_io import write_mask
from .layout import SYNTHETIC_META

GENERATOR_VERSION = 1
K = len(SYNTHETIC_CLASSES)
# class hue centres (HSV hue in [0, 1)); jitter of 0.07 makes neighbouring palettes overlap
_CLASS_HUES = np.array([0.0, 0.17, 0.33, 0.5, 0.67, 0.83], dtype=np.float32)
_PARTNER = {0: 4, 4: 0, 1: 5, 5: 1, 2: 3, 3: 2}
_PREFERRED_TEXTURE = {0: 1, 1: 2, 2: 0, 3: 3, 4: 4, 5: 1}
_SPLIT_CODE = {"train": 0, "val": 1}


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    h = (h % 1.0) * 6.0
    i = int(h) % 6
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


class _Grid:
    """Pixel-centre coordinates and the bilinear up-sampling matrix of one image size (cached)."""

    _cache: Dict[int, "_Grid"] = {}

    def __init__(self, size: int):
        c = (np.arange(size, dtype=np.float32) + 0.5)
        self.y, self.x = np.meshgrid(c, c, indexing="ij")
        # (size, 6) linear interpolation matrix from a 6-point grid (smooth background noise)
        src = np.linspace(0, 5, size, dtype=np.float32)
        lo = np.floor(src).astype(int).clip(0, 4)
        w = src - lo
        up = np.zeros((size, 6), dtype=np.float32)
        up[np.arange(size), lo] = 1 - w
        up[np.arange(size), lo + 1] += w
        self.up = up

    @classmethod
    def get(cls, size: int) -> "_Grid":
        if size not in cls._cache:
            cls._cache[size] = _Grid(size)
        return cls._cache[size]


def _local(g: _Grid, cx: float, cy: float, r: float, theta: float) -> Tuple[np.ndarray, np.ndarray]:
    dx, dy = g.x - cx, g.y - cy
    c, s = np.cos(theta), np.sin(theta)
    return (dx * c + dy * s) / r, (-dx * s + dy * c) / r


def _shape(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean (S, S) inside-test of shape class ``cls`` in local coordinates (unit radius)."""
    if cls == 0:  # circle
        return u * u + v * v <= 1.0
    if cls == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if cls == 2:  # triangle (equilateral, circumradius 1)
        return (v >= -0.5) & (v <= 1.0 - 1.7320508 * np.abs(u))
    if cls == 3:  # five-pointed star
        rho = np.sqrt(u * u + v * v)
        ang = np.arctan2(v, u)
        return rho <= 0.4 + 0.6 * np.abs(np.cos(2.5 * ang)) ** 3
    if cls == 4:  # ring
        rr = u * u + v * v
        return (rr <= 1.0) & (rr >= 0.3)
    if cls == 5:  # cross
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    raise ValueError(f"unknown synthetic class {cls}")


def _texture(kind: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(S, S) pattern in [-1, 1]: 0 plain, 1 stripes, 2 checker, 3 dots, 4 radial shading."""
    if kind == 0:
        return np.zeros_like(u)
    f = rng.uniform(2.0, 4.5)
    if kind == 1:
        a = rng.uniform(0, np.pi)
        return np.sin(2 * np.pi * f * (u * np.cos(a) + v * np.sin(a)) / 2)
    if kind == 2:
        return np.sign(np.sin(np.pi * f * u) * np.sin(np.pi * f * v))
    if kind == 3:
        return np.where(np.cos(np.pi * f * u) * np.cos(np.pi * f * v) > 0.4, 1.0, -0.3).astype(np.float32)
    return np.clip(np.sqrt(u * u + v * v), 0, 1.5) * 1.3 - 1.0


def render_scene(rng: np.random.Generator, size: int, band: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: image uint8 (size, size, 3) and id mask uint8 (size, size) (0 bg, k+1 class k, 255 band).
    Guarantees at least one visible class."""
    g = _Grid.get(size)
    S = float(size)
    # background: base colour, smooth colour noise, linear shading, optional global texture
    base = _hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.85))
    low = rng.normal(0.0, 0.12, size=(6, 6, 3)).astype(np.float32)
    smooth = np.tensordot(np.tensordot(g.up, low, axes=(1, 0)), g.up, axes=(1, 1))  # (S, 3, S)
    img = base + smooth.transpose(0, 2, 1)
    a, b = rng.uniform(-0.35, 0.35, size=2)
    img *= (1.0 + a * (g.x / S - 0.5) + b * (g.y / S - 0.5))[..., None]
    kind = int(rng.integers(0, 5))
    if kind:
        img *= (1.0 + rng.uniform(0.05, 0.15) * _texture(kind, g.x / (0.25 * S), g.y / (0.25 * S), rng))[..., None]
    # distractors: elongated ellipses / bars in class-like colours, labelled background
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = rng.uniform(0, S, size=2)
        r = rng.uniform(0.1, 0.3) * S
        u, v = _local(g, cx, cy, r, rng.uniform(0, np.pi))
        aspect = rng.uniform(3.0, 6.0)
        inside = (u * u + (v * aspect) ** 2 <= 1.0) if rng.random() < 0.5 else \
            ((np.abs(u) <= 1.0) & (np.abs(v) <= 1.0 / aspect))
        col = _hsv_to_rgb(_CLASS_HUES[rng.integers(0, K)] + rng.normal(0, 0.07), rng.uniform(0.4, 0.9),
                          rng.uniform(0.4, 0.95))
        tex = 1.0 + 0.25 * _texture(int(rng.integers(0, 5)), u, v, rng)
        img[inside] = (col[None, :] * tex[inside][:, None])
    # objects
    mask = np.zeros((size, size), dtype=np.uint8)
    n_obj = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.35, 0.2, 0.1]))
    first = int(rng.integers(0, K))
    c0 = (rng.uniform(0.15, 0.85) * S, rng.uniform(0.15, 0.85) * S)
    for j in range(n_obj):
        if j == 0:
            cls, (cx, cy) = first, c0
        elif rng.random() < 0.45:
            cls = _PARTNER[first]
            cx, cy = c0[0] + rng.normal(0, 0.22 * S), c0[1] + rng.normal(0, 0.22 * S)
        else:
            cls = int(rng.integers(0, K))
            cx, cy = rng.uniform(0.1, 0.9, size=2) * S
        r = rng.uniform(0.13, 0.28) * S
        u, v = _local(g, cx, cy, r, rng.uniform(0, 2 * np.pi))
        inside = _shape(cls, u, v)
        col = _hsv_to_rgb(_CLASS_HUES[cls] + rng.normal(0, 0.07), rng.uniform(0.35, 0.95), rng.uniform(0.35, 1.0))
        tkind = _PREFERRED_TEXTURE[cls] if rng.random() < 0.5 else int(rng.integers(0, 5))
        tex = 1.0 + rng.uniform(0.1, 0.35) * _texture(tkind, u, v, rng)
        img[inside] = col[None, :] * tex[inside][:, None]
        mask[inside] = cls + 1
    # sensor noise and a light [1, 2, 1] blur (soft edges)
    img += rng.normal(0.0, 0.035, size=img.shape).astype(np.float32)
    img = 0.25 * (np.roll(img, 1, 0) + np.roll(img, -1, 0)) + 0.5 * img
    img = 0.25 * (np.roll(img, 1, 1) + np.roll(img, -1, 1)) + 0.5 * img
    image = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    # ignore band: pixels whose (2*band+1)^2 neighbourhood holds another label
    if band > 0:
        p = np.pad(mask, band, mode="edge")
        edge = np.zeros(mask.shape, dtype=bool)
        for dy in range(-band, band + 1):
            for dx in range(-band, band + 1):
                if dy or dx:
                    edge |= p[band + dy:band + dy + size, band + dx:band + dx + size] != mask
        mask = np.where(edge, np.uint8(255), mask)
    return image, mask


def _labels(mask: np.ndarray) -> np.ndarray:
    ids = np.unique(mask)
    ids = ids[(ids > 0) & (ids < 255)].astype(np.int64)
    out = np.zeros(K, dtype=np.float32)
    out[ids - 1] = 1.0
    return out


def _meta(num_train: int, num_val: int, image_size: int, seed: int) -> Dict[str, object]:
    return {"generator_version": GENERATOR_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "image_size": int(image_size), "seed": int(seed), "classes": list(SYNTHETIC_CLASSES)}


def _write(out: Path, num_train: int, num_val: int, image_size: int, seed: int, progress: bool) -> None:
    from tqdm import tqdm

    (out / "JPEGImages").mkdir(parents=True)
    (out / "SegmentationClassAug").mkdir()
    (out / "ImageSets" / "Segmentation").mkdir(parents=True)
    band = max(1, int(round(image_size / 128)))
    labels: Dict[str, np.ndarray] = {}
    jobs = [("train", i) for i in range(num_train)] + [("val", i) for i in range(num_val)]
    lists: Dict[str, list] = {"train": [], "val": []}

    def save(name: str, image: np.ndarray, mask: np.ndarray) -> None:
        Image.fromarray(image).save(out / "JPEGImages" / f"{name}.jpg", quality=95, subsampling=0)
        write_mask(out / "SegmentationClassAug" / f"{name}.png", mask)

    # rendering is numpy in this thread; encoding + file writes (I/O bound) go to a small thread pool
    with ThreadPoolExecutor(max_workers=4) as pool:
        pending = []
        for split, i in tqdm(jobs, desc=f"writing synthetic dataset ({image_size}px)", disable=not progress):
            name = f"{split}_{i:06d}"
            rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
            for _ in range(100):
                image, mask = render_scene(rng, image_size, band)
                lab = _labels(mask)
                if lab.any():
                    break
            else:  # pragma: no cover - rendering always leaves the last object visible
                raise RuntimeError(f"synthetic scene {name} has no visible object after 100 draws")
            pending.append(pool.submit(save, name, image, mask))
            labels[name] = lab
            lists[split].append(name)
            if len(pending) > 64:
                pending.pop(0).result()
        for f in pending:
            f.result()  # re-raises any write error
    for split, names in lists.items():
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(n + "\n" for n in names))
    np.save(out / "cls_labels.npy", labels, allow_pickle=True)
    # written last: its presence marks a complete cache
    (out / SYNTHETIC_META).write_text(json.dumps(_meta(num_train, num_val, image_size, seed), indent=1))


def default_synthetic_root(num_train: int = 800, num_val: int = 200, image_size: int = 96,
                           seed: int = 0) -> Path:
    """A cache folder keyed by the generation parameters, under $AREAM_FAST_CACHE (default
    ~/.cache/aream_fast)."""
    base = Path(os.environ.get("AREAM_FAST_CACHE", Path.home() / ".cache" / "aream_fast")).expanduser()
    return base / f"synthetic-v{GENERATOR_VERSION}-n{num_train}-{num_val}-s{image_size}-seed{seed}"


def ensure_synthetic(root: Optional[str | os.PathLike] = None, *, num_train: int = 800, num_val: int = 200,
                     image_size: int = 96, seed: int = 0, progress: bool = True) -> Path:
    """Write the synthetic dataset to ``root`` once and return ``root`` (a VOC-layout folder).

    If ``root`` already holds a complete cache made with the same parameters it is reused; a cache made with
    other parameters raises ValueError (delete it or pick another folder). Writing goes to a temporary sibling
    folder that is renamed to ``root`` at the end, so a half-written cache is never used. ``root=None`` uses
    :func:`default_synthetic_root`. Splits: "train" (num_train images) and "val" (num_val images).
    """
    for nm, val, lo in (("num_train", num_train, 1), ("num_val", num_val, 0), ("image_size", image_size, 16)):
        if not isinstance(val, (int, np.integer)) or val < lo:
            raise ValueError(f"{nm} must be an int >= {lo}, got {val!r}")
    root = default_synthetic_root(num_train, num_val, image_size, seed) if root is None else Path(root)
    root = root.expanduser().absolute()
    want = _meta(num_train, num_val, image_size, seed)

    def existing() -> Optional[Dict[str, object]]:
        f = root / SYNTHETIC_META
        return json.loads(f.read_text()) if f.is_file() else None

    have = existing()
    if have is not None:
        if have != want:
            raise ValueError(f"synthetic cache at {root} was generated with {have}, but {want} was requested; "
                             f"delete the folder or choose another data root")
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{root} exists and is not a synthetic cache (no {SYNTHETIC_META}); "
                         f"choose an empty or new folder for the synthetic dataset")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, num_train, num_val, image_size, seed, progress)
        try:
            os.rename(tmp, root)  # atomic; replaces an empty folder
        except OSError:
            have = existing()  # another process finished first
            if have != want:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
