#!/usr/bin/env python
"""Per-layer entropy (AReAM 'E' layer weights) and over-smoothing diagnostics of a trained checkpoint.

Streams over a dataset split (batch 1, eval mode, every image resized to a square as the official entropy script
``ent_voc_mctformer.py`` does, docs/semantics.md, "Entropy layer weights") and computes per layer, from each layer's q,
k only (no N x N matrix kept
across images; ``aream_fast.analysis.entropy``, ``aream_fast.analysis.diagnostics``):

* the official spatial entropy E_l of the attention-refined CAM -> ``<out>/<label>/entropy.npy`` (+ JSON), the file
  ``scripts/train.py --layer-weights`` reads;
* over-smoothing diagnostics of the patch affinity: row entropy, top-k mass, effective rank, mean pairwise row
  similarity, patch mass, successive-layer similarity, and (with GT masks) the share of foreground tokens'
  attention that lands on background tokens.

Outputs in ``--out``: ``<label>/entropy.npy``, ``<label>/entropy.json``, ``<label>/diagnostics.json``,
``<label>/layers_examples.png`` per checkpoint; ``diagnostics.csv``, ``layers_curves.png`` (all checkpoints
overlaid) and ``summary.txt``.

Examples::

    python scripts/analyze_layers.py --checkpoint runs/synthetic-baseline/<stamp>/checkpoint.pth --max-images 64
    python scripts/analyze_layers.py --checkpoint base.pth --compare aream.pth --labels baseline AReAM --out out/
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aream_fast.analysis.diagnostics import (PER_LAYER_METRICS, DiagnosticsAccumulator,  # noqa: E402
                                    layer_affinity_diagnostics)
from aream_fast.analysis.entropy import (EntropyAccumulator, present_class_cam, refined_cams, save_entropy,  # noqa: E402
                                spatial_entropy)
from aream_fast.data.transforms import denormalize  # noqa: E402
from aream_fast.models.records import AttentionRequest  # noqa: E402

BOUNDED_01 = ("topk_mass", "row_similarity", "patch_mass", "fg_to_bg", "successive_similarity",
              "refined_cam_similarity")
DEFAULT_SPLITS = {"synthetic": "train", "voc": "train_aug", "coco": "train"}
METRIC_TITLES = {
    "entropy": "spatial entropy E_l of refined CAM (bits)",
    "row_entropy": "attention row entropy (bits)",
    "topk_mass": "attention mass in top-k patches",
    "effective_rank": "effective rank of patch affinity",
    "row_similarity": "mean pairwise row cosine (1 = over-smoothed)",
    "patch_mass": "attention mass on patch tokens",
    "fg_to_bg": "fg tokens' attention on background",
    "fg_to_bg_excess": "fg->bg share minus uniform-attention share",
    "successive_similarity": "cosine(affinity l, affinity l+1)",
    "refined_cam_similarity": "cosine(R_l·CAM, R_l+1·CAM)",
}


# ------------------------------------------------------------------------------------------------------------
# checkpoint -> model
def _infer_architecture(sd: Dict[str, torch.Tensor], config: Dict[str, Any], num_heads: Optional[int]
                        ) -> Tuple[str, int, int, Dict[str, int]]:
    """(model name, num_classes, img_size, overrides) from a state dict (+ a TrainConfig dict when present)."""
    for key in ("cls_token", "pos_embed", "head.weight", "patch_embed.proj.weight"):
        if key not in sd:
            raise ValueError(f"checkpoint state dict has no {key!r}; is it an aream-fast WSSSViT checkpoint?")
    num_classes = int(sd["head.weight"].shape[0])
    c = int(sd["cls_token"].shape[1])
    embed_dim = int(sd["cls_token"].shape[2])
    mct = c == num_classes and (c > 1 or "mct" in str(config.get("model", "")))
    depth = len({int(m.group(1)) for key in sd for m in [re.match(r"blocks\.(\d+)\.", key)] if m})
    patch_size = int(sd["patch_embed.proj.weight"].shape[-1])
    p0 = int(sd["pos_embed"].shape[1]) - c
    side = int(round(math.sqrt(p0)))
    if side * side != p0:
        raise ValueError(f"stored position embedding has {p0} patch slots, not a square grid")
    name = config.get("model") or ("mct_deit_small" if mct else "vit_small")
    heads = num_heads or config.get("num_heads") or max(1, embed_dim // 64)  # DeiT/ViT: head width 64
    mlp_hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0]) if "blocks.0.mlp.fc1.weight" in sd else 4 * embed_dim
    overrides = dict(embed_dim=embed_dim, depth=depth, num_heads=int(heads), patch_size=patch_size,
                     mlp_ratio=mlp_hidden / embed_dim)
    return name, num_classes, side * patch_size, overrides


def load_model(path: str, device: torch.device, num_heads: Optional[int] = None):
    """Build the model of a checkpoint and load its weights (eval mode). Returns (model, config dict).

    Accepted formats: the training engine's checkpoints (``{"format": 1, "model": ..., "config": ...,
    "num_classes": ...}``), loaded by ``aream_fast.engine.build.load_model_from_checkpoint``; and foreign files
    the engine does not read: ``{"model": state_dict[, "config": {...}]}`` or a plain state dict, whose
    architecture is read from the state dict (``--num-heads`` where the head count cannot be read).
    """
    from aream_fast.engine.build import load_model_from_checkpoint
    from aream_fast.models import build_model

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a text file or truncated checkpoint; re-raised naming the file
        raise ValueError(f"--checkpoint {path!r} is not a readable PyTorch checkpoint "
                         f"({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict) and "format" in obj and "num_classes" in obj and num_heads is None:
        model, cfg = load_model_from_checkpoint(path, device)
        return model, cfg.flat()
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        sd, config = obj["model"], dict(obj.get("config") or {})
        # sectioned configs ({"data": {...}, "model": {...}}) read flat, like the checkpoints before sections
        config = {**{k: v for k, v in config.items() if not isinstance(v, dict)},
                  **{k: v for sec in config.values() if isinstance(sec, dict) for k, v in sec.items()}}
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, config = obj, {}
    else:
        raise ValueError(f"{path!r}: expected a state dict or a dict with a 'model' state dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    sd = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in sd.items()}
    if "cnn_head.weight" in sd:  # Conformer-S: built from its train.py config, which the code below reads flat
        from aream_fast.engine.build import load_model_from_checkpoint

        if not config:
            raise ValueError(f"{path!r}: a Conformer state dict needs the train.py checkpoint (its 'config')")
        model, cfg = load_model_from_checkpoint(path, device)
        return model, cfg.flat()
    name, num_classes, img_size, overrides = _infer_architecture(sd, config, num_heads)
    model = build_model(name, num_classes=num_classes, img_size=img_size, drop_path=0.0, **overrides)
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval(), config


# ------------------------------------------------------------------------------------------------------------
# data
def build_split(dataset: str, root: Optional[str], split: str, config: Dict[str, Any]):
    """The split at native size (``square_item`` resizes), via ``aream_fast.engine.build.build_split``.

    Synthetic without ``root``: the training run's cache, found from the checkpoint's config exactly as
    ``scripts/train.py`` does (``aream_fast.engine.build.resolve_data_root``; written once if missing)."""
    from aream_fast.engine import build as engine_build
    from aream_fast.engine.config import TrainConfig

    owner = TrainConfig.field_owner()
    sections = TrainConfig.sections()
    known = {k: v for k, v in (config or {}).items() if k in owner or k in sections}  # flat or nested
    cfg = TrainConfig.from_dict(known, validate=False) if known else TrainConfig()
    cfg.data.dataset, cfg.data.data_root = dataset, root
    if dataset == "synthetic":
        if root is None or not os.path.isfile(os.path.join(root, "synthetic_meta.json")):
            root = engine_build.resolve_data_root(cfg.data, create=True)
    elif root is None:
        raise ValueError(f"--data-root is required for --dataset {dataset}")
    return engine_build.build_split(cfg.data, root, split, train=False, native_size=True)


def square_item(item: Dict[str, Any], size: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Resize a dataset item's normalised image (3, H, W) to (1, 3, size, size), bicubic
    (docs/semantics.md, "Entropy layer weights": square resize;
    the official script resizes the PIL image before normalising, which differs only by PIL's uint8 rounding),
    and its mask (H, W) to (1, size, size) with nearest (as the data module resizes masks).
    Returns (image, mask or None)."""
    image = item["image"].float()[None]
    if tuple(image.shape[-2:]) != (size, size):
        # linear in the pixel values, so resizing the normalised image = normalising the resized one;
        # antialias as PIL's bicubic resize does when shrinking
        image = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mask = item.get("mask")
    if mask is not None:
        mask = torch.as_tensor(mask).long()[None]
        if tuple(mask.shape[-2:]) != (size, size):
            mask = F.interpolate(mask[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return image, mask


# ------------------------------------------------------------------------------------------------------------
# analysis
def _normalise_map(x: torch.Tensor) -> np.ndarray:
    """x / max(x) of a non-negative map (not min-max: a flat, over-smoothed map must look flat)."""
    x = x.double().clamp_min(0)
    return (x / (x.max() + 1e-12)).cpu().numpy()


@torch.no_grad()
def analyse(model, dataset, *, image_size: int, max_images: Optional[int], eps: Optional[float],
            topk_fraction: float, rank_max_tokens: int, num_examples: int, device: torch.device,
            desc: str = "") -> Dict[str, Any]:
    """Stream over ``dataset`` (batch 1) and return {"entropy": EntropyAccumulator, "diagnostics":
    DiagnosticsAccumulator, "examples": [...], "n_images", "n_no_label", "grid"}."""
    from aream_fast.pseudo_labels.patch_labels import seg_to_patch_labels

    depth = model.depth
    layers = tuple(range(depth))
    ent = EntropyAccumulator(depth)
    diag = DiagnosticsAccumulator()
    examples: List[Dict[str, Any]] = []
    n_total = len(dataset) if max_images is None else min(len(dataset), max_images)
    n_no_label = 0
    grid = None
    for idx in tqdm(range(n_total), desc=desc or "analyse", unit="img"):
        item = dataset[idx]
        name = str(item.get("name", idx))
        image, mask = square_item(item, image_size)
        image = image.to(device)
        labels = torch.as_tensor(item["label"]).float().reshape(1, -1).to(device)
        out = model(image, AttentionRequest(refine_layers=layers))
        rec = out.records
        grid = rec.grid
        qs = [rec.qs[i] for i in layers]
        ks = [rec.ks[i] for i in layers]
        present = torch.nonzero(labels[0] > 0)[:, 0]
        if present.numel() == 0:
            n_no_label += 1
        # CAM_v (1, K_present, P): docs/semantics.md, "Entropy layer weights"
        cam_v = present_class_cam(out.cam, labels)
        f = refined_cams(qs, ks, cam_v, num_prefix_tokens=rec.num_prefix_tokens, scale=rec.scale)  # (L,1,Kv,P)
        ent.update(spatial_entropy(f[:, 0], eps=eps), name)
        patch_labels = None
        if mask is not None:
            patch_labels = seg_to_patch_labels(mask, model.patch_size).to(device)
        want_example = len(examples) < num_examples and present.numel() > 0
        metrics = layer_affinity_diagnostics(qs, ks, num_prefix_tokens=rec.num_prefix_tokens, scale=rec.scale,
                                             patch_labels=patch_labels, topk_fraction=topk_fraction,
                                             rank_max_tokens=rank_max_tokens,
                                             return_fg_attention=want_example and patch_labels is not None)
        fg_attention = metrics.pop("fg_attention", None)
        if depth > 1 and present.numel() > 0:  # successive similarity of the attention-apply outputs F_l
            flat = f[:, 0].reshape(depth, -1).double()
            norms = flat.norm(dim=-1)
            cos = (flat[:-1] * flat[1:]).sum(-1) / (norms[:-1] * norms[1:])  # NaN where a map is all zero
            metrics["refined_cam_similarity"] = cos[None]
        if patch_labels is not None:  # what fg_to_bg would be under uniform attention: the bg share of tokens
            valid = patch_labels[0] != 255
            n_fg = int((valid & (patch_labels[0] > 0)).sum())
            n_bg = int((patch_labels[0] == 0).sum())
            share = n_bg / int(valid.sum()) if n_fg > 0 and n_bg > 0 else float("nan")
            metrics["bg_token_share"] = torch.tensor([[share]], dtype=torch.float64)
            # spill beyond what uniform attention would put on background (> 0: attention prefers background)
            metrics["fg_to_bg_excess"] = metrics["fg_to_bg"] - share
        diag.update(metrics)
        if want_example:
            h, w = grid
            rgb = denormalize(image[0]).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            refined = f[:, 0].sum(dim=1).reshape(depth, h, w)  # s = Σ_k F_l[k] per layer
            examples.append({
                "name": name, "image": rgb,
                "cam": _normalise_map(cam_v[0].sum(0).reshape(h, w)),
                "refined": [_normalise_map(refined[i]) for i in range(depth)],
                "fg_attention": (None if fg_attention is None or not torch.isfinite(fg_attention).all()
                                 else [_normalise_map(fg_attention[0, i].reshape(h, w)) for i in range(depth)]),
                "mask": None if mask is None else mask[0].cpu().numpy(),
            })
    return {"entropy": ent, "diagnostics": diag, "examples": examples, "n_images": n_total,
            "n_no_label": n_no_label, "grid": grid}


def _clean(x: Any) -> Any:
    """NaN/inf -> None for strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    return x


def result_table(label: str, res: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers of one checkpoint as plain lists (per layer)."""
    ent: EntropyAccumulator = res["entropy"]
    summary = res["diagnostics"].summary()
    entropy = ent.mean().tolist() if ent.n_used > 0 else [float("nan")] * ent.num_layers
    return {"label": label, "entropy": entropy, "n_images": res["n_images"], "n_entropy_used": ent.n_used,
            "n_entropy_skipped_nan": ent.n_skipped, "entropy_skipped_images": ent.skipped_names,
            "n_images_without_labels": res["n_no_label"], "grid": list(res["grid"]) if res["grid"] else None,
            "diagnostics": summary}


def write_csv(path: str, tables: List[Dict[str, Any]]) -> None:
    names = list(PER_LAYER_METRICS) + ["fg_to_bg_excess", "successive_similarity", "refined_cam_similarity"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "layer", "entropy"] + [f"{n}{s}" for n in names for s in ("", "_std", "_count")])
        for t in tables:
            depth = len(t["entropy"])
            for layer in range(depth):
                row = [t["label"], layer, t["entropy"][layer]]
                for n in names:
                    d = t["diagnostics"].get(n)
                    if d is None or layer >= len(d["mean"]):
                        row += ["", "", ""]
                    else:
                        row += [d["mean"][layer], d["std"][layer], d["count"][layer]]
                writer.writerow(["" if isinstance(v, float) and not math.isfinite(v) else v for v in row])


# ------------------------------------------------------------------------------------------------------------
# plots and summary
def plot_curves(path: str, tables: List[Dict[str, Any]], num_patches: Optional[int],
                layer_index: Optional[int] = None) -> None:
    panels = ["entropy", "row_entropy", "topk_mass", "effective_rank", "row_similarity", "successive_similarity",
              "refined_cam_similarity", "fg_to_bg", "fg_to_bg_excess", "patch_mass"]
    fig, axes = plt.subplots(2, 5, figsize=(24, 9))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.ravel(), panels):
        for ti, t in enumerate(tables):
            color = colors[ti % len(colors)]
            if name == "entropy":
                y = np.asarray(t["entropy"], dtype=float)
                x = np.arange(len(y))
                ax.plot(x, y, "o-", color=color, label=t["label"])
                continue
            d = t["diagnostics"].get(name)
            if d is None:
                continue
            y = np.asarray(d["mean"], dtype=float)
            s = np.asarray(d["std"], dtype=float)
            x = np.arange(len(y))
            if not np.isfinite(y).any():
                continue
            ax.plot(x, y, "o-", color=color, label=t["label"])
            lo, hi = y - s, y + s
            if name in BOUNDED_01:
                lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
            ax.fill_between(x, lo, hi, color=color, alpha=0.15)
        if name == "fg_to_bg":  # the uniform-attention level of each checkpoint's images
            for ti, t in enumerate(tables):
                ref = t["diagnostics"].get("bg_token_share")
                if ref is not None and ref["count"][0] > 0:
                    ax.axhline(ref["mean"][0], color=colors[ti % len(colors)], ls=":", lw=1,
                               label=f"{t['label']}: bg share of tokens (uniform attention)")
        depth = len(tables[0]["entropy"]) if tables else 0
        if layer_index is not None and 0 < layer_index < depth:  # the AReAM-supervised (deep) layers
            pairs = name.endswith("_similarity") and name != "row_similarity"  # point l = layers (l, l+1)
            ax.axvspan(layer_index - 0.5, depth - (1.5 if pairs else 0.5),
                       color="gray", alpha=0.08, lw=0, label=f"supervised layers (>= {layer_index})")
        if name == "fg_to_bg_excess":
            ax.axhline(0.0, color="gray", ls="--", lw=1)
        if name in ("row_entropy", "entropy") and num_patches:
            ax.axhline(math.log2(num_patches), color="gray", ls="--", lw=1,
                       label=f"log2 P = {math.log2(num_patches):.2f}")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if name in ("successive_similarity", "refined_cam_similarity"):  # point l compares layers l and l+1
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{int(v)}-{int(v) + 1}"))
        ax.set_title(METRIC_TITLES[name], fontsize=10)
        ax.set_xlabel("layers l-(l+1)" if name.endswith("_similarity") and name != "row_similarity" else "layer")
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "not available\n(no GT masks)" if name.startswith("fg_to_bg") else "not available",
                    ha="center", va="center", transform=ax.transAxes, color="gray")
        else:
            ax.legend(fontsize=8)
    n = tables[0]["n_images"] if tables else 0
    fig.suptitle(f"Per-layer attention diagnostics ({n} images; mean, band = ± std over images)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(path: str, examples: List[Dict[str, Any]], label: str) -> None:
    if not examples:
        return
    depth = len(examples[0]["refined"])
    rows = []
    for ex in examples:
        rows.append(("refined CAM R_l·CAM", ex, "refined"))
        if ex["fg_attention"] is not None:
            rows.append(("attention of GT fg tokens", ex, "fg_attention"))
    ncols = 2 + depth
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.6 * ncols, 1.7 * len(rows)), squeeze=False)
    for r, (title, ex, key) in enumerate(rows):
        img = ex["image"]
        ax = axes[r, 0]
        ax.imshow(img)
        ax.set_ylabel(f"{ex['name']}\n{title}", fontsize=7)
        if ex["mask"] is not None and key == "fg_attention":
            m = np.ma.masked_where((ex["mask"] == 0) | (ex["mask"] == 255), ex["mask"])
            ax.imshow(m, alpha=0.4, cmap="tab20", interpolation="nearest")
        ax = axes[r, 1]
        ax.imshow(img)
        ax.imshow(ex["cam"], cmap="jet", alpha=0.5, extent=(0, img.shape[1], img.shape[0], 0),
                  interpolation="bilinear", vmin=0.0, vmax=1.0)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=8)
            ax.set_title("CAM (present cls)", fontsize=8)
        for layer in range(depth):
            ax = axes[r, 2 + layer]
            ax.imshow(img)
            ax.imshow(ex[key][layer], cmap="jet", alpha=0.5, extent=(0, img.shape[1], img.shape[0], 0),
                      interpolation="bilinear", vmin=0.0, vmax=1.0)
            if r == 0:
                ax.set_title(f"layer {layer}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{label}: per-layer refined CAM and foreground attention (each map / its max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt_layers(values: np.ndarray, order: np.ndarray, k: int, digits: int = 3) -> str:
    return ", ".join(f"{int(i)} ({values[i]:.{digits}f})" for i in order[:k])


def summarize(tables: List[Dict[str, Any]], layer_index: Optional[int]) -> str:
    lines = []
    for t in tables:
        num_patches = t["grid"][0] * t["grid"][1] if t["grid"] else 1
        d = t["diagnostics"]
        e = np.asarray(t["entropy"], dtype=float)
        sim = np.asarray(d["row_similarity"]["mean"], dtype=float)
        erank = np.asarray(d["effective_rank"]["mean"], dtype=float)
        k = min(3, len(e))
        lines.append(f"[{t['label']}] {t['n_images']} images, entropy from {t['n_entropy_used']} "
                     f"({t['n_entropy_skipped_nan']} skipped as NaN, {t['n_images_without_labels']} without labels)")
        if np.isfinite(e).all():
            lines.append(f"  entropy E_l (max log2 P = {math.log2(num_patches):.4f}): highest at layers "
                         f"{_fmt_layers(e, np.argsort(-e), k, 5)}; lowest at {_fmt_layers(e, np.argsort(e), k, 5)}")
        lines.append(f"  most over-smoothed (mean pairwise row cosine, 1 = all tokens attend alike): layers "
                     f"{_fmt_layers(sim, np.argsort(-np.nan_to_num(sim, nan=-1)), k)}")
        if np.isfinite(erank).any():
            lines.append(f"  lowest effective rank of the patch affinity: layers "
                         f"{_fmt_layers(erank, np.argsort(np.nan_to_num(erank, nan=np.inf)), k)}")
        else:
            lines.append("  effective rank: skipped (P above --rank-max-tokens)")
        fg = np.asarray(d["fg_to_bg"]["mean"], dtype=float)
        if np.isfinite(fg).any():
            uniform = d.get("bg_token_share", {"mean": [float("nan")]})["mean"][0]
            lines.append(f"  fg->bg attention share (GT masks; {uniform:.3f} = uniform attention): highest at layers "
                         f"{_fmt_layers(fg, np.argsort(-np.nan_to_num(fg, nan=-1)), k)}; "
                         f"lowest at {_fmt_layers(fg, np.argsort(np.nan_to_num(fg, nan=np.inf)), k)}")
            ex = np.asarray(d["fg_to_bg_excess"]["mean"], dtype=float)
            spill = [i for i in np.argsort(-np.nan_to_num(ex, nan=-np.inf)) if ex[i] > 0][:k]
            lines.append("  attention spills to background beyond uniform (fg_to_bg_excess > 0) at layers "
                         + (_fmt_layers(ex, np.asarray(spill), len(spill)) if spill else "none"))
        else:
            lines.append("  fg->bg attention share: not available (no GT masks)")
    if len(tables) == 2:
        a, b = tables
        depth = len(a["entropy"])
        if len(b["entropy"]) != depth:
            lines.append("compare: the checkpoints have different depths; no per-layer comparison")
        else:
            li = layer_index if layer_index is not None and 0 < layer_index < depth else depth // 2
            deep = slice(li, depth)
            lines.append(f"compare {b['label']} vs {a['label']} on the deep layers {li}..{depth - 1}:")
            for name in ("row_similarity", "effective_rank", "fg_to_bg", "fg_to_bg_excess", "row_entropy",
                         "topk_mass", "successive_similarity"):
                if name not in a["diagnostics"] or name not in b["diagnostics"]:
                    continue
                ya = np.asarray(a["diagnostics"][name]["mean"], dtype=float)[deep]
                yb = np.asarray(b["diagnostics"][name]["mean"], dtype=float)[deep]
                if np.isfinite(ya).any() and np.isfinite(yb).any():
                    lines.append(f"  {name}: {np.nanmean(ya):.4f} -> {np.nanmean(yb):.4f} "
                                 f"({np.nanmean(yb) - np.nanmean(ya):+.4f})")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint (train.py format, {'model': sd} or a state dict)")
    p.add_argument("--compare", default=None, help="a second checkpoint, overlaid in the plots")
    p.add_argument("--labels", nargs="+", default=None, help="names of the checkpoint(s) (1 or 2)")
    p.add_argument("--dataset", default=None, choices=["synthetic", "voc", "coco"],
                   help="default: the checkpoint's training dataset, else synthetic")
    p.add_argument("--data-root", default=None, help="dataset root (synthetic default: the checkpoint's training cache, as train.py finds it)")
    p.add_argument("--split", default=None,
                   help="default: train (synthetic, coco) / train_aug (voc), as the official entropy script")
    p.add_argument("--max-images", type=int, default=None, help="analyse the first N images (default: all)")
    p.add_argument("--image-size", type=int, default=None,
                   help="square size images are resized to (default: the checkpoint's training size; official 224)")
    p.add_argument("--eps", type=float, default=None,
                   help="use log2(p + eps) in the entropy (default: official log2(p); NaN images are skipped)")
    p.add_argument("--topk-fraction", type=float, default=0.05, help="k = ceil(fraction * P) for topk_mass")
    p.add_argument("--rank-max-tokens", type=int, default=1024, help="skip the effective rank above this P")
    p.add_argument("--num-examples", type=int, default=3, help="images in the per-layer overlay figure")
    p.add_argument("--num-heads", type=int, default=None, help="heads, for plain state dicts without a config")
    p.add_argument("--layer-index", type=int, default=None,
                   help="first supervised layer for the summary (default: the checkpoint config's)")
    p.add_argument("--out", default="runs/analysis", help="output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    paths = [args.checkpoint] + ([args.compare] if args.compare else [])
    if args.labels is not None and len(args.labels) != len(paths):
        raise ValueError(f"--labels needs {len(paths)} names (one per checkpoint), got {args.labels}")
    if args.labels is not None and len(set(args.labels)) != len(args.labels):
        raise ValueError(f"--labels must be distinct, got {args.labels}")
    labels: List[str] = []
    if args.max_images is not None and args.max_images <= 0:
        raise ValueError(f"--max-images must be > 0, got {args.max_images}")
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    tables = []
    layer_index = args.layer_index
    num_patches = None
    for ci, path in enumerate(paths):
        model, config = load_model(path, device, args.num_heads)
        if args.labels is not None:
            label = args.labels[ci]
        else:  # the training run's name, else the file name
            label = config.get("run_name")
            if not label and "aream" in config:  # train.py's default run name: <dataset>-<aream|baseline>
                label = f"{config.get('dataset', 'run')}-{'aream' if config['aream'] else 'baseline'}"
            label = str(label or os.path.splitext(os.path.basename(path))[0])
            if label in labels:
                label = f"{label}_{ci}"
        label = re.sub(r"[^A-Za-z0-9_.+-]", "_", label)
        labels.append(label)
        dataset_name = args.dataset or config.get("dataset") or "synthetic"
        root = args.data_root or (config.get("data_root") if dataset_name == config.get("dataset") else None)
        split = args.split or DEFAULT_SPLITS[dataset_name]
        size = args.image_size or int(config.get("image_size") or model.img_size[0])
        if size % model.patch_size:
            raise ValueError(f"--image-size must be a multiple of the patch size {model.patch_size}, got {size}")
        if layer_index is None and config.get("layer_index") is not None:
            layer_index = int(config["layer_index"])
        if layer_index is None and config:
            layer_index = int(math.floor(model.depth * 7 / 12 + 0.5))  # TRAIN's default split (official 7 of 12)
        dataset = build_split(dataset_name, root, split, config)
        res = analyse(model, dataset, image_size=size, max_images=args.max_images, eps=args.eps,
                      topk_fraction=args.topk_fraction, rank_max_tokens=args.rank_max_tokens,
                      num_examples=args.num_examples, device=device, desc=label)
        table = result_table(label, res)
        table.update({"checkpoint": os.path.abspath(path), "dataset": dataset_name, "split": split,
                      "image_size": size, "eps": args.eps, "topk_fraction": args.topk_fraction})
        sub = os.path.join(args.out, label)
        os.makedirs(sub, exist_ok=True)
        if res["entropy"].n_used > 0:
            save_entropy(sub, np.asarray(table["entropy"]), _clean({
                k: table[k] for k in ("label", "checkpoint", "dataset", "split", "image_size", "eps", "n_images",
                                      "n_entropy_used", "n_entropy_skipped_nan", "n_images_without_labels")}))
        else:
            print(f"[{label}] no image gave a finite entropy; entropy.npy not written (try --eps 1e-6)",
                  file=sys.stderr)
        with open(os.path.join(sub, "diagnostics.json"), "w") as f:
            json.dump(_clean(table), f, indent=2)
        plot_examples(os.path.join(sub, "layers_examples.png"), res["examples"], label)
        num_patches = res["grid"][0] * res["grid"][1] if res["grid"] else None
        tables.append(table)
    write_csv(os.path.join(args.out, "diagnostics.csv"), tables)
    plot_curves(os.path.join(args.out, "layers_curves.png"), tables, num_patches, layer_index)
    text = summarize(tables, layer_index)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text)
    print(text, end="")
    print(f"wrote {args.out}/ (diagnostics.csv, layers_curves.png, summary.txt, "
          f"{', '.join(lab + '/' for lab in labels)})")
    return {"tables": tables, "summary": text}


if __name__ == "__main__":
    from aream_fast.engine.errors import main_guard

    sys.exit(main_guard(main))
