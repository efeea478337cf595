"""scripts/evaluate.py end to end on a tiny synthetic split."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aream_fast.data import ensure_synthetic, read_mask, write_mask
from aream_fast.evaluation.metrics import cam_to_prediction, confusion_matrix, iou_from_confusion
from tests._scripts import REPO, load_script

SCRIPT = REPO / "scripts" / "evaluate.py"


def _load_script():
    return load_script("scripts/evaluate.py", "evaluate_script")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("ev")
    root = ensure_synthetic(base / "syn", num_train=6, num_val=2, image_size=32, progress=False)
    names = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    cam_dir = base / "cams"
    cam_dir.mkdir()
    rng = np.random.default_rng(0)
    data = {}
    for n in names:
        gt = read_mask(root / "SegmentationClassAug" / f"{n}.png")
        lab = np.load(root / "cls_labels.npy", allow_pickle=True).item()[n]
        keys = np.nonzero(lab)[0].astype(np.int64)
        cams = np.stack([(gt == k + 1) * 0.6 + rng.random(gt.shape) * 0.5 for k in keys]).astype(np.float32)
        np.save(cam_dir / f"{n}.npy", {"key": keys, "cam": cams}, allow_pickle=True)
        data[n] = (keys, cams, gt)
    return _load_script(), root, cam_dir, data, base


def test_npy_sweep_end_to_end(setup, capsys):
    ev, root, cam_dir, data, base = setup
    out = base / "res.json"
    res = ev.main(["--cam-dir", str(cam_dir), "--data-root", str(root), "--dataset", "synthetic",
                   "--split", "train", "--start", "10", "--stop", "70", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "best background threshold" in printed and "mIoU" in printed and "circle" in printed
    saved = json.loads(out.read_text())
    assert saved["num_images"] == 6 and len(saved["sweep"]) == 60
    # recompute every threshold directly from the official per-threshold rule
    mious = []
    for i in range(10, 70):
        cm = sum(confusion_matrix(cam_to_prediction(k, c, np.float32(i / 100)), g, 7) for k, c, g in data.values())
        mious.append(iou_from_confusion(cm).mean())
    best = int(np.argmax(mious))
    assert res["best_threshold"] == pytest.approx((10 + best) / 100)
    assert res["miou"] == pytest.approx(mious[best])
    assert [s["miou"] for s in saved["sweep"]] == pytest.approx(mious)
    assert 0.3 < res["miou"] < 1.0


def test_png_mode_and_gt_folder_refusal(setup, tmp_path):
    ev, root, cam_dir, data, base = setup
    gt_dir = root / "SegmentationClassAug"
    with pytest.raises(ValueError, match="ground-truth folder"):
        ev.main(["--png-dir", str(gt_dir), "--data-root", str(root), "--no-progress"])
    link = tmp_path / "link"
    os.symlink(gt_dir, link)
    with pytest.raises(ValueError, match="resolves to"):
        ev.main(["--png-dir", str(link), "--data-root", str(root), "--no-progress"])
    # a plain copy of the GT elsewhere is evaluated, with a warning
    png = tmp_path / "png"
    shutil.copytree(gt_dir, png)
    res = ev.main(["--png-dir", str(png), "--data-root", str(root), "--no-progress"])
    assert set(np.round(list(res["per_class_iou"].values()), 6)) <= {0.0, 1.0} and "WARNING" in ev.report(res)
    # a copy of the GT with some pixels set to 255 (ignored predictions count as misses)
    n0 = next(iter(data))
    m = read_mask(png / f"{n0}.png")
    m[:4] = 255
    write_mask(png / f"{n0}.png", m)
    res = ev.main(["--png-dir", str(png), "--data-root", str(root), "--no-progress"])
    cm = sum(confusion_matrix(read_mask(png / f"{n}.png"), g, 7) for n, (_, _, g) in data.items())
    assert res["miou"] == pytest.approx(iou_from_confusion(cm).mean())
    assert res["miou"] < 1.0 and (png / "eval_train.json").is_file()


@pytest.mark.slow  # runs the script in a subprocess once
def test_missing_prediction_is_an_error(setup, tmp_path):
    ev, root, cam_dir, data, base = setup
    partial = tmp_path / "partial"
    shutil.copytree(cam_dir, partial)
    victim = sorted(partial.glob("*.npy"))[2]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        ev.main(["--cam-dir", str(partial), "--data-root", str(root), "--no-progress"])
    bad = tmp_path / "bad"
    shutil.copytree(cam_dir, bad)
    np.save(sorted(bad.glob("*.npy"))[0], {"cam": np.zeros((1, 32, 32))}, allow_pickle=True)
    with pytest.raises(ValueError, match="'key' and 'cam'"):
        ev.main(["--cam-dir", str(bad), "--data-root", str(root), "--no-progress"])
    # the command line reports the error and exits non-zero
    r = subprocess.run([sys.executable, str(SCRIPT), "--cam-dir", str(partial), "--data-root", str(root),
                        "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and victim.name in r.stderr and "missing" in r.stderr


def test_unlabelled_image_may_lack_a_cam_file(tmp_path):
    ev = _load_script()
    from PIL import Image

    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nempty\n")
    for n, cls in (("a", 3), ("empty", 0)):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages" / f"{n}.jpg")
        m = np.zeros((8, 8), np.uint8)
        m[2:6, 2:6] = cls
        write_mask(root / "SegmentationClass" / f"{n}.png", m)
    cams = tmp_path / "cams"
    cams.mkdir()
    c = np.zeros((1, 8, 8), np.float32)
    c[0, 2:6, 2:6] = 1.0
    np.save(cams / "a.npy", {"key": np.array([2]), "cam": c}, allow_pickle=True)
    res = ev.main(["--cam-dir", str(cams), "--dataset", "voc", "--data-root", str(root), "--no-progress"])
    assert res["per_class_iou"]["background"] == pytest.approx(1.0)
    assert res["per_class_iou"]["bird"] == pytest.approx(1.0)  # class index 2 -> id 3
    (cams / "a.npy").unlink()
    with pytest.raises(FileNotFoundError, match="a.npy"):
        ev.main(["--cam-dir", str(cams), "--dataset", "voc", "--data-root", str(root), "--no-progress"])


def _voc_tree_with_both_mask_folders(tmp_path):
    """VOC layout with one image "a" whose SegmentationClass mask (class 3 square) differs from its
    SegmentationClassAug mask (all background)."""
    from PIL import Image

    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("a\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages" / "a.jpg")
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 2:6] = 3
    write_mask(root / "SegmentationClass" / "a.png", m)
    write_mask(root / "SegmentationClassAug" / "a.png", np.zeros((8, 8), np.uint8))  # differs on purpose
    return root


def test_voc_default_ground_truth_is_segmentation_class(tmp_path):
    # Official protocol (docs/semantics.md, "Evaluation"): VOC CAMs are scored against SegmentationClass even when
    # SegmentationClassAug (preferred for training) exists; Aug is the fallback when Class lacks masks.
    ev = _load_script()
    root = _voc_tree_with_both_mask_folders(tmp_path)
    cams = tmp_path / "cams"
    cams.mkdir()
    c = np.zeros((1, 8, 8), np.float32)
    c[0, 2:6, 2:6] = 1.0
    np.save(cams / "a.npy", {"key": np.array([2]), "cam": c}, allow_pickle=True)
    args = ["--cam-dir", str(cams), "--dataset", "voc", "--data-root", str(root), "--no-progress"]
    res = ev.main(args)
    assert res["gt_dir"].endswith("SegmentationClass") and res["per_class_iou"]["bird"] == pytest.approx(1.0)
    (root / "SegmentationClass" / "a.png").unlink()  # Class lacks a mask: fall back to Aug
    assert ev.main(args)["gt_dir"].endswith("SegmentationClassAug")


def test_cam_eval_split_uses_segmentation_class_for_voc(tmp_path):
    # the trainer's end-of-run CAM score and make_cams.py --eval follow the same rule as evaluate.py
    from aream_fast.engine.build import build_cam_eval_split
    from aream_fast.engine.config import DataConfig

    root = _voc_tree_with_both_mask_folders(tmp_path)
    cfg = DataConfig(dataset="voc", data_root=str(root))
    ds = build_cam_eval_split(cfg, str(root), "train")
    assert ds.files.mask_dir.name == "SegmentationClass" and int(ds[0]["mask"].max()) == 3
    assert build_cam_eval_split(cfg, str(root), "train", mask_dir="SegmentationClassAug").files.mask_dir.name == \
        "SegmentationClassAug"
    (root / "SegmentationClass" / "a.png").unlink()  # Class lacks a mask: fall back to Aug
    assert build_cam_eval_split(cfg, str(root), "train").files.mask_dir.name == "SegmentationClassAug"


def test_a_cam_holding_nan_is_refused_naming_the_file(setup, tmp_path, capsys):
    """issue 15 item 6: a NaN in one CAM file stops the sweep with one error line naming that file."""
    from aream_fast.engine.errors import main_guard

    ev, root, cam_dir, data, base = setup
    nan_dir = tmp_path / "nan"
    shutil.copytree(cam_dir, nan_dir)
    victim = sorted(nan_dir.glob("*.npy"))[1]
    keys, cams, _ = data[victim.stem]
    cams = cams.copy()
    cams[0, 3, 4] = np.nan
    np.save(victim, {"key": keys, "cam": cams}, allow_pickle=True)
    status = main_guard(ev.main, ["--cam-dir", str(nan_dir), "--data-root", str(root), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert victim.name in line and "NaN" in line
    assert not (nan_dir / "eval_train.json").exists()
