"""Refused before training starts, with one ``error:`` line and no run folder (issue 15, item 8, and item 6's
--bg-low > --bg-high): bad flag values, a missing --cam-split, --loss-backend triton on CPU, a missing
--pretrained file, a corrupt or mismatched image / mask (header check up front; --full-image-check decodes all);
--attention-backend triton on CPU falls back to SDPA, logged and recorded in the manifest."""
import json
import os
import shutil

import pytest

from aream_fast.engine.errors import main_guard
from tests.engine.conftest import TINY

REFUSED = [
    (["--aream-weight", "nan"], "--aream-weight must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
    (["--drop-path", "1"], "--drop-path must be < 1.0"),
    (["--drop-path", "-0.1"], "--drop-path must be >= 0.0"),
    (["--depth", "1"], "--depth must be >= 2"),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--bg-low", "0.6", "--bg-high", "0.4"], "--bg-low (0.6) must be <= --bg-high (0.4)"),
    (["--cam-split", "nosuch"], "--cam-split 'nosuch'"),
    (["--loss-backend", "triton"], "--loss-backend triton needs a CUDA device"),
    (["--pretrained", "absent.pth"], "--pretrained 'absent.pth' does not exist"),
]


def _error_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if "error:" in line]


@pytest.mark.parametrize("extra, message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused_before_the_run_folder_with_one_error_line(extra, message, train_script, data_root, tmp_path,
                                                            capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the test session may run Triton interpreted
    run_dir = tmp_path / "run"
    try:
        status = main_guard(train_script.main, TINY + ["--data-root", data_root, "--run-dir", str(run_dir)] + extra)
    except SystemExit as exc:  # argparse's refusal: usage lines, then "train.py: error: ..."
        status = exc.code
    assert status in (1, 2)
    (line,) = _error_lines(capsys)
    assert message in line
    assert not run_dir.exists()


@pytest.fixture
def damaged_root(data_root, tmp_path):
    root = tmp_path / "damaged"
    shutil.copytree(data_root, root)
    return root


def _first_train_name(root):
    with open(os.path.join(root, "ImageSets", "Segmentation", "train.txt")) as fh:
        return fh.read().split()[0]


@pytest.mark.parametrize("damage, message", [
    ("garbage image", "cannot read image"),
    ("small mask", "has size"),
    ("rgb mask", "has PIL mode 'RGB'"),
])
def test_a_bad_listed_file_stops_the_run_before_it_starts(damage, message, damaged_root, train_script, tmp_path,
                                                          capsys):
    from PIL import Image

    name = _first_train_name(damaged_root)
    image = damaged_root / "JPEGImages" / f"{name}.jpg"
    mask = damaged_root / "SegmentationClassAug" / f"{name}.png"
    if not mask.exists():
        mask = damaged_root / "SegmentationClass" / f"{name}.png"
    if damage == "garbage image":
        image.write_bytes(b"not a jpeg at all" * 4)
    elif damage == "small mask":
        Image.new("P", (8, 8)).save(mask)
    else:
        Image.new("RGB", Image.open(image).size).save(mask)
    run_dir = tmp_path / "run"
    status = main_guard(train_script.main, TINY + ["--data-root", str(damaged_root), "--run-dir", str(run_dir)])
    assert status == 1
    (line,) = _error_lines(capsys)
    assert message in line and name in line and "header check" in line
    assert not run_dir.exists()


def test_full_image_check_decodes_a_truncated_image(damaged_root, train_script, tmp_path, capsys):
    name = _first_train_name(damaged_root)
    image = damaged_root / "JPEGImages" / f"{name}.jpg"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])  # the header survives, the data not
    args = TINY + ["--data-root", str(damaged_root), "--run-dir", str(tmp_path / "run"), "--full-image-check"]
    assert main_guard(train_script.main, args) == 1
    (line,) = _error_lines(capsys)
    assert name in line and "full decoding check" in line
    assert not (tmp_path / "run").exists()


def test_triton_attention_on_cpu_falls_back_to_sdpa_and_says_so(train_script, data_root, tmp_path):
    run_dir = tmp_path / "run"
    args = TINY + ["--data-root", data_root, "--run-dir", str(run_dir), "--no-cams", "--max-steps", "1",
                   "--attention-backend", "triton", "--device", "cpu"]
    assert train_script.main(args) == 0
    manifest = json.load(open(run_dir / "manifest.json"))
    assert manifest["attention_backend_used"] == "sdpa" and manifest["loss_backend_used"] == "torch"
    assert "--attention-backend triton runs on CUDA only" in (run_dir / "train.log").read_text()


def test_pretrained_coverage_is_refused_or_recorded(train_script, data_root, tmp_path, capsys):
    """issue 15 item 4 through train.py: a file filling 1 tensor is refused with one error line; allowed, its
    report is logged and kept in manifest.json; the run's own checkpoint.pth then loads as --pretrained."""
    import torch

    partial = tmp_path / "one.pth"
    torch.save({"norm.weight": torch.ones(32)}, partial)
    base = TINY + ["--data-root", data_root, "--no-cams", "--max-steps", "1"]
    assert main_guard(train_script.main, base + ["--run-dir", str(tmp_path / "a"), "--pretrained", str(partial)]) == 1
    (line,) = _error_lines(capsys)
    assert "loaded 1 of the model's" in line and "--allow-partial-pretrained" in line
    allowed = tmp_path / "b"
    assert train_script.main(base + ["--run-dir", str(allowed), "--pretrained", str(partial),
                                     "--allow-partial-pretrained"]) == 0
    report = json.load(open(allowed / "manifest.json"))["pretrained_report"]
    assert report["loaded"] == 1 and report["path"] == str(partial) and report["missing_keys"]
    assert "loaded 1 of the model's" in (allowed / "train.log").read_text()
    own = tmp_path / "c"
    assert train_script.main(base + ["--run-dir", str(own), "--pretrained", str(allowed / "checkpoint.pth")]) == 0
    report = json.load(open(own / "manifest.json"))["pretrained_report"]
    assert report["loaded"] == report["backbone"] and report["missing_keys"] == []
