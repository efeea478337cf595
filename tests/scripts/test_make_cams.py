"""scripts/make_cams.py from any working directory and never into the dataset (issue 15, item 11): a run trained
on the default (relative) synthetic root writes CAMs from elsewhere; an older checkpoint without the absolute
root is resolved next to its run folder, or the error says where it looked; --out-dir inside the image or mask
folders is refused. One tiny run (one step, depth 2, embed 32, 48 px)."""
import os
import shutil

import pytest
import torch

from aream_fast.engine.errors import main_guard
from tests._scripts import load_script
from tests.engine.conftest import TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    train_dir = tmp_path_factory.mktemp("trained_here")
    train = load_script("scripts/train.py", "train_for_make_cams")
    old = os.getcwd()
    os.chdir(train_dir)  # the synthetic default root data_cache/... is relative to this folder
    try:
        assert train.main(TINY + ["--no-cams", "--max-steps", "1", "--run-dir", "runs/tiny/stamp"]) == 0
    finally:
        os.chdir(old)
    (root,) = (train_dir / "data_cache").iterdir()
    return load_script("scripts/make_cams.py", "make_cams_under_test"), train_dir, root


def _older_checkpoint(src, dst):
    """``src`` as a checkpoint written before the absolute root was stored, at ``dst`` (no manifest beside)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ckpt.pop("data_root")
    dst.parent.mkdir(parents=True)
    torch.save(ckpt, dst)
    return dst


def test_make_cams_runs_from_another_directory(trained, tmp_path, monkeypatch):
    make_cams, train_dir, root = trained
    monkeypatch.chdir(tmp_path)
    ckpt = train_dir / "runs" / "tiny" / "stamp" / "checkpoint.pth"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["data_root"] == str(root)
    assert make_cams.main(["--checkpoint", str(ckpt), "--split", "val", "--out-dir", "cams"]) == 0
    assert len(list((tmp_path / "cams").glob("*.npy"))) == 6
    # an older checkpoint (relative root, no manifest): found relative to the folders above its run folder
    older = _older_checkpoint(ckpt, train_dir / "runs" / "old" / "stamp" / "checkpoint.pth")
    assert make_cams.main(["--checkpoint", str(older), "--split", "val", "--out-dir", "cams_old"]) == 0
    assert len(list((tmp_path / "cams_old").glob("*.npy"))) == 6


def test_an_unresolvable_root_says_where_it_looked(trained, tmp_path, monkeypatch, capsys):
    make_cams, train_dir, root = trained
    monkeypatch.chdir(tmp_path)
    lonely = _older_checkpoint(train_dir / "runs" / "tiny" / "stamp" / "checkpoint.pth",
                               tmp_path / "lonely" / "checkpoint.pth")
    assert main_guard(make_cams.main, ["--checkpoint", str(lonely), "--split", "val"]) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "looked in" in line and "--data-root" in line
    assert os.path.join(str(tmp_path), "data_cache", root.name) in line  # the working directory was tried


@pytest.mark.parametrize("folder", ["JPEGImages", "SegmentationClassAug"])
def test_out_dir_inside_the_dataset_is_refused(folder, trained, capsys):
    make_cams, train_dir, root = trained
    target = root / folder / "cams"
    ckpt = train_dir / "runs" / "tiny" / "stamp" / "checkpoint.pth"
    status = main_guard(make_cams.main, ["--checkpoint", str(ckpt), "--split", "val", "--out-dir", str(target)])
    assert status == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "--out-dir" in line and folder in line and "refusing" in line
    assert not target.exists()
    shutil.rmtree(target, ignore_errors=True)
