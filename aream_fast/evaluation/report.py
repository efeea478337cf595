"""One report for the whole pipeline: CAM seeds -> pseudo masks -> segmentation, every number named.

A report is a list of :class:`ReportEntry` rows. Each row says what was measured (``stage``: "CAM seeds",
"pseudo masks", "segmentation", "upper bound"), on which split, with which post-processing and preset, from which
checkpoint / folder, and its mIoU (in %) with the per-class IoU; ``commit`` is the code's git commit. The rows are
read from the JSON files the pipeline's commands write (``summary.json`` / ``cam_eval.json`` of stage one,
``report.json`` of ``make_pseudo_masks.py``, ``report_<split>.json`` of ``infer_seg.py``), never typed in.

``write_report(rows, out_dir)`` writes ``report.json`` (the rows, machine readable) and ``report.md`` (a table and
notes) and returns the markdown.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence


@dataclass
class ReportEntry:
    """One measured number of the pipeline (mIoU in %, per-class IoU in % keyed by class name)."""

    stage: str
    split: str
    post_processing: str
    miou: float
    source: str  # the checkpoint or folder the number comes from
    preset: Optional[str] = None
    per_class: Dict[str, float] = field(default_factory=dict)
    details: Dict[str, Any] = field(default_factory=dict)


def git_commit(repo: Optional[str] = None) -> Optional[str]:
    """The checkout's commit (with "+dirty" when it has uncommitted changes), or None outside git."""
    repo = repo or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _read_json(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"report input {path} does not exist")
    with open(path) as fh:
        return json.load(fh)


def _percent(value: float) -> float:
    """Scores are stored as fractions in [0, 1]; the report shows %."""
    return round(100.0 * float(value), 2)


def _per_class(values: Any, names: Optional[Sequence[str]]) -> Dict[str, float]:
    """{class: IoU %} from a {name: fraction} dict or a list of fractions in class order (needs ``names``)."""
    if isinstance(values, dict):
        return {str(k): _percent(v) for k, v in values.items()}
    values = list(values or [])
    names = list(names) if names is not None else [str(i) for i in range(len(values))]
    if len(names) != len(values):
        raise ValueError(f"{len(values)} per-class values for {len(names)} class names")
    return {str(n): _percent(v) for n, v in zip(names, values)}


def cam_entry(cam_eval_json: str, *, split: str, source: str) -> ReportEntry:
    """A row from the CAM scoring of stage one (``score_cams`` results: mIoU in [0, 1], best threshold)."""
    r = _read_json(cam_eval_json)
    return ReportEntry("CAM seeds", split, f"background threshold {r['threshold']:.2f} (best of the sweep)",
                       _percent(r["mIoU"]), source, per_class=_per_class(r.get("per_class"), None),
                       details={"threshold": r["threshold"], "num_images": r.get("num_images")})


def mask_entry(report_json: str, *, name: str, class_names: Optional[Sequence[str]] = None) -> ReportEntry:
    """A row from ``make_pseudo_masks.py``'s ``report.json`` (its "score": miou and per-class IoU in [0, 1])."""
    r = _read_json(report_json)
    score = r.get("score")
    if not score:
        raise ValueError(f"{report_json} has no score (made with --no-eval?)")
    return ReportEntry("pseudo masks", str(r.get("split", "train")), f"{name}: {r.get('post_processing', name)}",
                       _percent(score["miou"]), os.path.dirname(os.path.abspath(report_json)),
                       preset=_mask_presets(r),
                       per_class=_per_class(score.get("per_class_iou"), class_names),
                       details={k: v for k, v in r.items() if k not in ("score",)})


def _mask_presets(r: Dict[str, Any]) -> Optional[str]:
    """"crf cam, rw aream" from a make_pseudo_masks.py report ({"crf": {"preset"}, "random_walk": {"preset"}})."""
    parts = [f"{label} {r[key]['preset']}" for key, label in (("random_walk", "rw"), ("crf", "crf"))
             if isinstance(r.get(key), dict) and r[key].get("preset")]
    return ", ".join(parts) or None


def seg_entry(report_json: str, *, stage: str, name: str,
              class_names: Optional[Sequence[str]] = None) -> ReportEntry:
    """A row from ``infer_seg.py``'s ``report_<split>.json`` (miou and per-class IoU in [0, 1])."""
    r = _read_json(report_json)
    post = f"{name}: scales {r.get('scales')}, flip {r.get('flip')}, CRF {r.get('crf_preset') or 'none'}"
    checkpoint = r.get("checkpoint", {})
    source = checkpoint.get("path") if isinstance(checkpoint, dict) else str(checkpoint)
    return ReportEntry(stage, str(r.get("split", "val")), post, _percent(r["miou"]), str(source),
                       preset=r.get("crf_preset"), per_class=_per_class(r.get("per_class_iou"), class_names),
                       details={"num_images": r.get("num_images"), "checkpoint": checkpoint})


def write_report(rows: Sequence[ReportEntry], out_dir: str, *, title: str = "aream-fast pipeline report",
                 notes: Sequence[str] = (), meta: Optional[Dict[str, Any]] = None) -> str:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    commit = git_commit()
    payload = {"title": title, "commit": commit, "meta": dict(meta or {}),
               "rows": [dataclasses.asdict(r) for r in rows], "notes": list(notes)}
    with open(os.path.join(out_dir, "report.json"), "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
    lines = [f"# {title}", "", f"Code commit: `{commit}`" if commit else "Code commit: unknown (not a git checkout)",
             ""]
    for key, value in (meta or {}).items():
        lines.append(f"- {key}: {value}")
    if meta:
        lines.append("")
    lines += ["| stage | split | post-processing | preset | mIoU (%) | from |", "|---|---|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r.stage} | {r.split} | {r.post_processing} | {r.preset or '-'} | {r.miou:.2f} | "
                     f"`{r.source}` |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(md)
    return md


def plot_per_class(rows: Sequence[ReportEntry], path: str) -> Optional[str]:
    """Grouped bars of per-class IoU for the rows that have it (PNG at ``path``); None when none has."""
    rows = [r for r in rows if r.per_class]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(rows[0].per_class)
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) * len(rows) ** 0.5), 3.5))
    for i, r in enumerate(rows):
        ax.bar(np.arange(len(names)) + i * width, [r.per_class.get(n, 0.0) for n in names], width,
               label=f"{r.stage} ({r.split}, {r.post_processing.split(':')[0]})")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_examples(dataset: str, root: str, split: str, *, cam_dir: str, mask_dir: str, pred_dir: str, path: str,
                  count: int = 4, threshold: Optional[float] = None) -> str:
    """One row per image for the first ``count`` images of ``split`` that have a CAM file: image, CAM (the
    max over the image's classes, as a heat map; with ``threshold`` the background contour), pseudo mask,
    prediction, ground truth (VOC palette; 255 white). Files: ``cam_dir/<name>.npy`` (``save_cam_npy``
    format), ``mask_dir/<name>.png``, ``pred_dir/<name>.png``. Writes a PNG at ``path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from aream_fast.data.image_io import read_image, read_mask, voc_palette
    from aream_fast.data.layout import resolve_split
    from aream_fast.pseudo_labels.seeds import load_cam_npy

    files = resolve_split(dataset, root, split, with_masks=True)
    palette = voc_palette().astype(np.uint8)
    palette[255] = 255

    def colour(mask: np.ndarray) -> np.ndarray:
        return palette[mask.astype(np.int64)]

    picked = [(n, i, m) for n, i, m in zip(files.names, files.image_paths, files.mask_paths)
              if os.path.isfile(os.path.join(cam_dir, f"{n}.npy"))][:max(1, count)]
    if not picked:
        raise FileNotFoundError(f"no CAM file of {dataset}/{split} in {cam_dir} for the example figure")
    titles = ("image", "CAM (max over classes)", "pseudo mask", "prediction", "ground truth")
    fig, axes = plt.subplots(len(picked), 5, figsize=(10, 2.1 * len(picked)), squeeze=False)
    for row, (name, image_path, gt_path) in zip(axes, picked):
        image = read_image(image_path)
        _, cam = load_cam_npy(os.path.join(cam_dir, f"{name}.npy"))
        heat = cam.max(0) if cam.shape[0] else np.zeros(image.shape[:2], np.float32)
        panels = [image, None, colour(read_mask(os.path.join(mask_dir, f"{name}.png"))),
                  colour(read_mask(os.path.join(pred_dir, f"{name}.png"))), colour(read_mask(gt_path))]
        for ax, panel, title in zip(row, panels, titles):
            if panel is None:
                ax.imshow(image)
                ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
                if threshold is not None:
                    ax.contour(heat, levels=[threshold], colors="white", linewidths=0.8)
            else:
                ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if ax is row[0]:
                ax.set_ylabel(name, fontsize=7)
        for ax, title in zip(axes[0], titles):
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
