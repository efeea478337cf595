#!/usr/bin/env python
"""The whole pipeline, image labels to a segmentation network, and one report (``make demo``).

    python scripts/run_pipeline.py                          # synthetic data, random init: the demo
    python scripts/run_pipeline.py --stage1-only            # stage one only: train + CAM seeds (fast)
    python scripts/run_pipeline.py --out runs/p --stage1-args "--epochs 4" --seg-args "--epochs 2"

Steps, each one of the project's own commands run as a subprocess (so every number can be reproduced by hand;
the exact commands are written to ``<out>/commands.sh``):

1. ``train.py``: stage one (AReAM on the ViT) with ``--cam-split train``: CAM seeds of the train split and
   their best-threshold mIoU (``stage1/cams_train/cam_eval.json``); ``make_cams.py --split val --eval``: the val
   CAMs for the figure.
2. ``make_pseudo_masks.py``: train pseudo masks, threshold only, + dense CRF (``--mask-crf`` preset), + random
   walk on the ViT's own attention (``--random-walk`` preset), + both; each scored on the train ground truth.
3. ``train_seg.py --masks``: the segmentation network on the ``--seg-masks`` variant (chosen in advance, not by
   its score); ``train_seg.py --gt-upper-bound``: the same network and budget on the ground truth.
4. ``infer_seg.py``: val mIoU single scale, multi-scale + flip, multi-scale + flip + CRF (``--infer-crf``).
5. ``report.md`` / ``report.json`` (``aream_fast.evaluation.report``): every number with its split,
   post-processing, preset, source checkpoint or folder and the code's commit; ``per_class.png`` and
   ``examples.png`` (image / CAM / pseudo mask / prediction / ground truth for a few val images).

Interrupted? Run the same command again: finished steps are skipped (each leaves its result file), an
interrupted training resumes from its last checkpoint (``--resume auto`` in its fixed run folder). ``--fresh``
deletes ``<out>`` first.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

MASK_VARIANTS = ("threshold", "crf", "rw", "rw_crf")


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_pipeline.py", description=__doc__.split("\n")[0],
                                epilog="See the module docstring (python -m pydoc scripts/run_pipeline.py).")
    p.add_argument("--out", type=Path, default=Path("runs/pipeline"), help="output folder (default runs/pipeline)")
    p.add_argument("--stage1-only", action="store_true", help="stop after stage one's CAM seeds and their mIoU")
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming it")
    p.add_argument("--seed", type=int, default=0, help="seed of both trainings")
    p.add_argument("--no-aream", action="store_true", help="stage one without the AReAM loss (cls-only)")
    p.add_argument("--model", default="vit_small",
                   help="stage-one model (default vit_small: measured best for the synthetic demo, "
                        "benchmarks/RESULTS.md; the official AReAM system is mct_deit_small)")
    p.add_argument("--patch-size", type=int, default=8,
                   help="stage-one ViT patch size (default 8: a 12 x 12 token grid at the demo's 96 px; measured, "
                        "benchmarks/RESULTS.md; the official models use 16); the segmentation network inherits it")
    p.add_argument("--stage1-args", default="", help="extra train.py arguments, one string (they win)")
    p.add_argument("--seg-args", default="", help="extra train_seg.py arguments (both trainings), one string")
    p.add_argument("--mask-crf", default="cam", help="CRF preset of the pseudo masks (official CAM CRF: cam)")
    p.add_argument("--random-walk", default="aream", help="random-walk preset of the pseudo masks")
    p.add_argument("--seg-init", default="stage1", choices=("stage1", "random"),
                   help="segmentation backbone init: the stage-one ViT (image labels only; the default, as peers "
                        "start from ImageNet weights) or random")
    p.add_argument("--seg-masks", default="crf", choices=MASK_VARIANTS,
                   help="the pseudo-mask variant the segmentation network trains on (default crf)")
    p.add_argument("--infer-crf", default="official-test", help="CRF preset of MS+flip+CRF inference")
    p.add_argument("--no-upper-bound", action="store_true", help="skip the ground-truth upper bound training")
    p.add_argument("--examples", type=int, default=4, help="val images in examples.png (0: no figure)")
    p.add_argument("--no-amp", action="store_true", help="train without --amp")
    p.add_argument("--cpu-amp", default="fp32", choices=("fp32", "bf16", "measure"),
                   help="what --amp means for every training on a CPU (default fp32: the pipeline's numbers must not "
                        "depend on a timing probe; 'measure' picks bf16 autocast when it is >= 20 %% faster, which "
                        "on the demo's model sits at that margin and flips between runs, benchmarks/RESULTS.md)")
    p.add_argument("--no-compile", action="store_true", help="train without --compile")
    p.add_argument("--device", default=None, help="device of every step (default: cuda if available, else cpu)")
    a = p.parse_args(argv)
    if a.examples < 0:
        p.error(f"--examples must be >= 0, got {a.examples}")
    # names are checked here, before minutes of stage-one training, not when their step comes
    from aream_fast.models.factory import MODEL_CONFIGS
    from aream_fast.stage2.crf import CRF_PRESETS
    from aream_fast.stage2.random_walk import RW_PRESETS

    if a.model not in MODEL_CONFIGS:
        p.error(f"--model must be one of {sorted(MODEL_CONFIGS)} (the pipeline's ViT models), got {a.model!r}")
    if a.patch_size <= 0 or 16 % a.patch_size:
        p.error(f"--patch-size must divide 16, got {a.patch_size}")
    for flag, value, presets in (("--mask-crf", a.mask_crf, CRF_PRESETS), ("--infer-crf", a.infer_crf, CRF_PRESETS),
                                 ("--random-walk", a.random_walk, RW_PRESETS)):
        if value not in presets:
            p.error(f"{flag} must be one of {sorted(presets)}, got {value!r}")
    for flag, value in (("--stage1-args", a.stage1_args), ("--seg-args", a.seg_args)):
        try:
            shlex.split(value)
        except ValueError as exc:
            p.error(f"{flag} is not a valid argument string ({exc}): {value!r}")
    return a


class Pipeline:
    """Runs the steps; a step whose result file exists is skipped (the pipeline resumes)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = args.out.resolve()
        self.py = sys.executable
        self.timings: Dict[str, float] = {}
        self.commands = self.out / "commands.sh"

    # ------------------------------------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        print(f"[pipeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def step(self, name: str, cmd: List[str], done: Path) -> None:
        """Run ``cmd`` unless ``done`` exists; a failing command stops the pipeline with its exit code."""
        line = " ".join(shlex.quote(c) for c in cmd)
        with open(self.commands, "a") as fh:
            fh.write(f"# {name}\n{line}\n")
        if done.exists():
            self.log(f"{name}: done before ({done}), skipped")
            return
        self.log(f"{name}: {line}")
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=str(ROOT))
        self.timings[name] = round(time.time() - t0, 1)
        if rc != 0:
            raise SystemExit(f"error: step {name!r} failed with exit code {rc}; fix it and run the same command "
                             f"again to continue (finished steps are kept)")
        if not done.exists():
            raise SystemExit(f"error: step {name!r} finished but did not write {done}")
        self.log(f"{name}: {self.timings[name]:.0f} s")

    def script(self, name: str, *args: str) -> List[str]:
        return [self.py, str(ROOT / "scripts" / name), *args]

    def device(self) -> List[str]:
        return [] if self.args.device is None else ["--device", self.args.device]

    def train_flags(self) -> List[str]:
        amp = [] if self.args.no_amp else ["--amp", "--cpu-amp", self.args.cpu_amp]
        return amp + ([] if self.args.no_compile else ["--compile"])

    @staticmethod
    def finished(run_dir: Path) -> Path:
        """The trainer's summary.json, written only when a run finished."""
        return run_dir / "summary.json"

    # ------------------------------------------------------------------------------------------------- steps
    def stage_one(self) -> Dict[str, Any]:
        a = self.args
        run_dir = self.out / "stage1"
        cmd = self.script("train.py", *self.train_flags(), "--run-dir", str(run_dir), "--resume", "auto",
                          "--cam-split", "train", "--seed", str(a.seed), "--model", a.model,
                          "--patch-size", str(a.patch_size), *self.device(),
                          *(["--no-aream"] if a.no_aream else []), *shlex.split(a.stage1_args))
        self.step("stage one (train.py)", cmd, self.finished(run_dir))
        manifest = json.loads((run_dir / "manifest.json").read_text())
        summary = json.loads(self.finished(run_dir).read_text())
        if summary.get("status") != "finished":
            raise SystemExit(f"error: stage one did not finish ({summary.get('status')}); see {run_dir}")
        cfg = manifest.get("config", {})
        data = cfg.get("data", cfg)
        self.dataset = data.get("dataset", "synthetic")
        self.data_root = manifest.get("data_root") or data.get("data_root")
        self.class_names = ["background"] + list(manifest.get("class_names") or [])
        self.stage1_ckpt = run_dir / "checkpoint_best.pth"
        if not self.stage1_ckpt.is_file():
            self.stage1_ckpt = run_dir / "checkpoint.pth"
        self.stage1_model = cfg.get("model", cfg)
        self.image_size = data.get("image_size")
        self.cams_train = run_dir / "cams_train"
        if not (self.cams_train / "cam_eval.json").is_file():
            raise SystemExit(f"error: stage one wrote no {self.cams_train / 'cam_eval.json'} (was --no-cams given "
                             f"in --stage1-args?)")
        self.cams_val = run_dir / "cams_val"
        if a.examples and not a.stage1_only:
            self.step("val CAMs (make_cams.py)",
                      self.script("make_cams.py", "--checkpoint", str(self.stage1_ckpt), "--split", "val",
                                  "--out-dir", str(self.cams_val), "--eval", *self.device()),
                      self.cams_val / "cam_eval.json")
        return summary

    def masks_cmd(self, variant: str, split: str, cam_dir: Path, out_dir: Path) -> List[str]:
        a = self.args
        extra: List[str] = []
        if variant in ("crf", "rw_crf"):
            extra += ["--crf", a.mask_crf]
        if variant in ("rw", "rw_crf"):
            extra += ["--random-walk", a.random_walk, "--checkpoint", str(self.stage1_ckpt)]
        return self.script("make_pseudo_masks.py", "--cam-dir", str(cam_dir), "--dataset", self.dataset,
                           "--data-root", str(self.data_root), "--split", split, "--out-dir", str(out_dir),
                           "--bg-threshold", str(self.threshold), *extra,
                           *(["--device", a.device] if a.device else []))

    def pseudo_masks(self) -> None:
        self.threshold = json.loads((self.cams_train / "cam_eval.json").read_text())["threshold"]
        self.mask_dirs = {}
        for variant in MASK_VARIANTS:
            out_dir = self.out / "masks_train" / variant
            self.step(f"pseudo masks {variant} (make_pseudo_masks.py)",
                      self.masks_cmd(variant, "train", self.cams_train, out_dir), out_dir / "report.json")
            self.mask_dirs[variant] = out_dir
        if self.args.examples:  # the figure's pseudo masks: the same variant and threshold on the val CAMs
            out_dir = self.out / "masks_val" / self.args.seg_masks
            self.step("val pseudo masks for the figure", self.masks_cmd(self.args.seg_masks, "val", self.cams_val,
                                                                          out_dir), out_dir / "report.json")
            self.val_masks = out_dir

    def segmentation(self) -> None:
        a = self.args
        init: List[str] = []
        if a.seg_init == "stage1":  # the same ViT as stage one, its weights as the backbone's start
            init += ["--pretrained", str(self.stage1_ckpt)]
            for key in ("embed_dim", "depth", "num_heads", "patch_size"):
                if self.stage1_model.get(key) is not None:
                    init += [f"--{key.replace('_', '-')}", str(self.stage1_model[key])]
        if self.image_size:
            init += ["--image-size", str(self.image_size)]
        common = [*self.train_flags(), "--resume", "auto", "--dataset", self.dataset, "--data-root",
                  str(self.data_root), "--seed", str(a.seed), *self.device(), *init, *shlex.split(a.seg_args)]
        self.seg_dir = self.out / "seg"
        self.step("segmentation on pseudo masks (train_seg.py)",
                  self.script("train_seg.py", "--masks", str(self.mask_dirs[a.seg_masks]), "--run-dir",
                              str(self.seg_dir), *common), self.finished(self.seg_dir))
        self.upper_dir = None
        if not a.no_upper_bound:
            self.upper_dir = self.out / "seg_upper_bound"
            self.step("upper bound on ground truth (train_seg.py --gt-upper-bound)",
                      self.script("train_seg.py", "--gt-upper-bound", "--run-dir", str(self.upper_dir), *common),
                      self.finished(self.upper_dir))

    @staticmethod
    def best(run_dir: Path) -> Path:
        best = run_dir / "checkpoint_best.pth"
        return best if best.is_file() else run_dir / "checkpoint.pth"

    def inference(self) -> Dict[str, Path]:
        a = self.args
        variants = {"single scale": ["--scales", "1.0", "--no-flip"], "MS + flip": [],
                    "MS + flip + CRF": ["--crf", a.infer_crf]}
        reports: Dict[str, Path] = {}
        for name, extra in variants.items():
            out = self.out / "infer" / name.replace(" + ", "_").replace(" ", "_").lower()
            self.step(f"inference {name} (infer_seg.py)",
                      self.script("infer_seg.py", "--checkpoint", str(self.best(self.seg_dir)), "--dataset",
                                  self.dataset, "--data-root", str(self.data_root), "--splits", "val", "--out",
                                  str(out), "--no-progress", *extra, *(["--device", a.device] if a.device else [])),
                      out / "report_val.json")
            reports[name] = out / "report_val.json"
        if self.upper_dir is not None:
            out = self.out / "infer" / "upper_bound_ms_flip"
            self.step("inference upper bound MS + flip (infer_seg.py)",
                      self.script("infer_seg.py", "--checkpoint", str(self.best(self.upper_dir)), "--dataset",
                                  self.dataset, "--data-root", str(self.data_root), "--splits", "val", "--out",
                                  str(out), "--no-progress", *(["--device", a.device] if a.device else [])),
                      out / "report_val.json")
            reports["upper bound"] = out / "report_val.json"
        return reports

    # ------------------------------------------------------------------------------------------------ report
    def report(self, stage1_summary: Dict[str, Any], infer_reports: Optional[Dict[str, Path]]) -> str:
        from aream_fast.evaluation.report import (cam_entry, mask_entry, plot_examples, plot_per_class, seg_entry,
                                                  write_report)

        a = self.args
        names = self.class_names
        rows = [cam_entry(str(self.cams_train / "cam_eval.json"), split="train", source=str(self.stage1_ckpt))]
        notes = []
        meta: Dict[str, Any] = {"dataset": self.dataset, "data root": self.data_root, "seed": a.seed,
                                "stage one": "cls-only (no AReAM loss)" if a.no_aream else "AReAM",
                                "stage one checkpoint": str(self.stage1_ckpt),
                                "segmentation backbone init": ("the stage-one checkpoint" if a.seg_init == "stage1"
                                                               else "random")}
        if infer_reports is not None:
            for variant in MASK_VARIANTS:
                rows.append(mask_entry(str(self.mask_dirs[variant] / "report.json"), name=variant,
                                       class_names=names))
            for name, path in infer_reports.items():
                stage = "upper bound (ground-truth masks)" if name == "upper bound" else "segmentation"
                rows.append(seg_entry(str(path), stage=stage, name="MS + flip" if name == "upper bound" else name,
                                      class_names=names))
            meta["segmentation trained on"] = f"pseudo masks '{a.seg_masks}' ({self.mask_dirs[a.seg_masks]})"
            seg_rows = {r.post_processing.split(":")[0]: r for r in rows if r.stage == "segmentation"}
            upper = next((r for r in rows if r.stage.startswith("upper bound")), None)
            if upper is not None and upper.miou > 0:
                ms = seg_rows["MS + flip"]
                meta["weakly supervised / upper bound (MS + flip)"] = (
                    f"{ms.miou:.2f} / {upper.miou:.2f} = {ms.miou / upper.miou:.3f}")
            notes.append("CAM seeds: best background threshold of the sweep on the train ground truth (the "
                         "official protocol); pseudo masks use that threshold; no other choice reads ground truth.")
        if self.timings:
            meta["step seconds (this invocation)"] = json.dumps(self.timings)
        md = write_report(rows, str(self.out), notes=notes, meta=meta)
        plot = plot_per_class(rows, str(self.out / "per_class.png"))
        if plot:
            md += f"\nPer-class IoU: `{plot}`\n"
        if infer_reports is not None and a.examples:
            fig = plot_examples(self.dataset, self.data_root, "val", cam_dir=str(self.cams_val),
                                mask_dir=str(self.val_masks),
                                pred_dir=str(Path(json.loads(infer_reports["MS + flip"].read_text())["prediction_dir"])),
                                path=str(self.out / "examples.png"), count=a.examples, threshold=self.threshold)
            md += f"Examples (image / CAM / pseudo mask / prediction / ground truth): `{fig}`\n"
        with open(self.out / "report.md", "w") as fh:
            fh.write(md)
        return md

    def run(self) -> int:
        a = self.args
        if a.fresh and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.commands, "a") as fh:
            fh.write(f"# run_pipeline.py {' '.join(shlex.quote(x) for x in sys.argv[1:])} "
                     f"({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        t0 = time.time()
        summary = self.stage_one()
        reports = None
        if not a.stage1_only:
            self.pseudo_masks()
            self.segmentation()
            reports = self.inference()
        md = self.report(summary, reports)
        print(md)
        self.log(f"done in {time.time() - t0:.0f} s: {self.out / 'report.md'}")
        return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return Pipeline(_parse(argv)).run()


if __name__ == "__main__":
    from aream_fast.engine.errors import main_guard

    sys.exit(main_guard(main))
