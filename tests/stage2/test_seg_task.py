"""scripts/train_seg.py: the segmentation network as a second Task on the engine (SegTask).

A few steps end to end on tiny synthetic data, an interrupted run resumed to the uninterrupted losses, the
ground-truth upper bound, and the refusal of ground-truth mask folders."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from aream_fast.data.image_io import read_mask, write_mask
from tests._scripts import load_script

TINY = ["--epochs", "2", "--batch-size", "2", "--image-size", "32", "--embed-dim", "32", "--depth", "2",
        "--num-heads", "2", "--seed", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def train_seg():
    return load_script("scripts/train_seg.py", "train_seg_script")


@pytest.fixture(scope="module")
def masks(tiny_synthetic, tmp_path_factory):
    """Pseudo masks = the ground truth with every second foreground pixel row relabelled background and a band
    of 255 (so they are not a copy of the ground truth)."""
    out = tmp_path_factory.mktemp("pseudo") / "masks"
    out.mkdir()
    names = (tiny_synthetic / "ImageSets/Segmentation/train.txt").read_text().split()
    for n in names:
        m = read_mask(tiny_synthetic / "SegmentationClassAug" / f"{n}.png").copy()
        m[::2][m[::2] != 255] = 0
        m[:, :2] = 255
        write_mask(out / f"{n}.png", m)
    return out


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh) if "loss" in r}


def test_train_resume_reproduces_the_uninterrupted_losses(train_seg, tiny_synthetic, masks, tmp_path):
    common = TINY + ["--data-root", str(tiny_synthetic), "--masks", str(masks)]
    full = str(tmp_path / "full")
    assert train_seg.main(common + ["--run-dir", full]) == 0
    summary = json.load(open(os.path.join(full, "summary.json")))
    assert summary["status"] == "finished" and summary["global_step"] == 6  # 6 images / batch 2 x 2 epochs
    assert summary["masks"] == os.path.abspath(masks) and summary["gt_upper_bound"] is False
    ck = torch.load(os.path.join(full, "checkpoint_best.pth"), weights_only=False)
    assert ck["seg_model"]["name"] == "vit_small_aspp" and ck["num_classes"] == 7
    cut = str(tmp_path / "cut")
    assert train_seg.main(common + ["--run-dir", cut, "--max-steps", "4"]) == 0
    assert train_seg.main(common + ["--run-dir", cut, "--resume", "auto"]) == 0
    a, b = _losses(full), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6, rel=0), step
    # the trainer's checkpoint is what infer_seg.py reads
    from aream_fast.stage2.seg_models import load_seg_model

    model = load_seg_model(os.path.join(cut, "checkpoint.pth"))
    assert model.num_classes == 7
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 40, 24)).shape == (1, 7, 40, 24)


def test_upper_bound_trains_on_the_ground_truth(train_seg, tiny_synthetic, tmp_path):
    run = str(tmp_path / "ub")
    assert train_seg.main(TINY + ["--epochs", "1", "--data-root", str(tiny_synthetic), "--gt-upper-bound",
                                  "--run-dir", run]) == 0
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["gt_upper_bound"] is True and summary["masks"] is None
    assert json.load(open(os.path.join(run, "manifest.json")))["train_size"] == 6


@pytest.mark.parametrize("kind", ["gt_folder", "copy", "both_flags", "missing"])
def test_ground_truth_and_bad_mask_folders_refused(train_seg, tiny_synthetic, masks, tmp_path, kind, capsys):
    from aream_fast.engine.errors import main_guard

    argv = TINY + ["--data-root", str(tiny_synthetic), "--run-dir", str(tmp_path / "run")]
    if kind == "gt_folder":
        argv += ["--masks", str(tiny_synthetic / "SegmentationClassAug")]
    elif kind == "copy":
        shutil.copytree(tiny_synthetic / "SegmentationClassAug", tmp_path / "my_masks")
        argv += ["--masks", str(tmp_path / "my_masks")]
    elif kind == "both_flags":
        argv += ["--masks", str(masks), "--gt-upper-bound"]
    else:
        argv += ["--masks", str(tmp_path / "nowhere")]
    if kind == "both_flags":
        with pytest.raises(SystemExit):  # argparse-level refusal of the config
            train_seg.main(argv)
        assert "exclude each other" in capsys.readouterr().err
        return
    assert main_guard(train_seg.main, argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and ("ground-truth" in err or "does not exist" in err), err
    assert not os.path.isfile(tmp_path / "run" / "checkpoint.pth")


@pytest.mark.parametrize("flag, value", [("--patch-size", "0"), ("--patch-size", "5"), ("--depth", "0")])
def test_bad_architecture_overrides_refused(train_seg, tiny_synthetic, masks, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        train_seg.main(TINY + ["--data-root", str(tiny_synthetic), "--masks", str(masks), "--run-dir",
                               str(tmp_path / "run"), flag, value])
    assert flag in capsys.readouterr().err and not (tmp_path / "run").exists()
