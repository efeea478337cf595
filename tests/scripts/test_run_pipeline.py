"""scripts/run_pipeline.py end to end on a tiny synthetic run: every number of the report equals an independent
recomputation from the files the pipeline saved, a second invocation resumes (skips every finished step), and
--stage1-only stops after the CAM seeds."""
import json
import os

import numpy as np
import pytest
import torch

from aream_fast.data.image_io import read_mask
from tests._scripts import load_script

STAGE1 = ("--epochs 2 --cls-epochs 1 --synthetic-train-size 10 --synthetic-val-size 4 --image-size 32 "
          "--embed-dim 32 --depth 3 --num-heads 2 --batch-size 5")
SEG = "--epochs 1 --batch-size 5"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _iou_from_pngs(pred_dir, gt_dir, names, num_classes):
    """mIoU (%) over every class (absent classes count 0, as the official metric), GT 255 skipped, a 255
    prediction a miss; written without the library's confusion matrix."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for n in names:
        pred = read_mask(os.path.join(pred_dir, f"{n}.png")).astype(np.int64)
        gt = read_mask(os.path.join(gt_dir, f"{n}.png")).astype(np.int64)
        valid = gt != 255
        for c in range(num_classes):
            p, g = (pred == c) & valid, (gt == c) & valid
            inter[c] += np.sum(p & g)
            union[c] += np.sum(p | g)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return 100.0 * iou.mean()


def _cam_miou(cam_dir, gt_dir, names, threshold, num_classes):
    """The CAM row's mIoU from the saved .npy seeds and the reported threshold."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for n in names:
        gt = read_mask(os.path.join(gt_dir, f"{n}.png")).astype(np.int64)
        path = os.path.join(cam_dir, f"{n}.npy")
        if os.path.isfile(path):
            d = np.load(path, allow_pickle=True).item()
            scores = np.concatenate([np.full((1,) + gt.shape, threshold, np.float32), d["cam"]])
            pred = np.concatenate([[0], d["key"] + 1])[scores.argmax(0)]
        else:
            pred = np.zeros_like(gt)
        valid = gt != 255
        for c in range(num_classes):
            p, g = (pred == c) & valid, (gt == c) & valid
            inter[c] += np.sum(p & g)
            union[c] += np.sum(p | g)
    return 100.0 * np.where(union > 0, inter / np.maximum(union, 1), 0.0).mean()


@pytest.mark.slow
def test_pipeline_report_equals_recomputation_and_resumes(tmp_path, capsys):
    pipeline = load_script("scripts/run_pipeline.py", "run_pipeline")
    out, data = tmp_path / "out", tmp_path / "data"
    argv = ["--out", str(out), "--no-amp", "--no-compile", "--examples", "2",
            "--stage1-args", f"{STAGE1} --data-root {data}", "--seg-args", SEG]
    assert pipeline.main(argv) == 0
    report = json.load(open(out / "report.json"))
    rows = report["rows"]
    stages = [r["stage"] for r in rows]
    assert stages == ["CAM seeds"] + ["pseudo masks"] * 4 + ["segmentation"] * 3 + \
        ["upper bound (ground-truth masks)"]
    assert all(r["split"] == ("val" if r["stage"] != "CAM seeds" and r["stage"] != "pseudo masks" else "train")
               for r in rows)
    gt_dir = data / "SegmentationClassAug"
    train = (data / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (data / "ImageSets/Segmentation/val.txt").read_text().split()
    C = 7
    cam = rows[0]
    assert cam["miou"] == pytest.approx(_cam_miou(out / "stage1/cams_train", gt_dir, train,
                                                  cam["details"]["threshold"], C), abs=0.006)
    for r in rows[1:5]:
        assert r["miou"] == pytest.approx(_iou_from_pngs(r["source"], gt_dir, train, C), abs=0.006), r
    assert [r["preset"] for r in rows[1:5]] == [None, "crf cam", "rw aream", "rw aream, crf cam"]
    for r in rows[5:]:
        name = {"single scale": "single_scale", "MS + flip": "ms_flip", "MS + flip + CRF": "ms_flip_crf"}
        key = r["post_processing"].split(":")[0]
        folder = "upper_bound_ms_flip" if r["stage"].startswith("upper") else name[key]
        assert r["miou"] == pytest.approx(_iou_from_pngs(out / "infer" / folder / "val", gt_dir, val, C),
                                          abs=0.006), r
    assert rows[7]["preset"] == "official-test" and "CRF official-test" in rows[7]["post_processing"]
    md = (out / "report.md").read_text()
    assert "weakly supervised / upper bound" in md and report["commit"]
    assert (out / "examples.png").is_file() and (out / "per_class.png").is_file()

    # a second invocation resumes: every step is skipped and the report is the same
    capsys.readouterr()
    assert pipeline.main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("skipped") == 13 and "train.py --amp" not in log
    assert [r["miou"] for r in json.load(open(out / "report.json"))["rows"]] == [r["miou"] for r in rows]

    # stage one only (another folder): CAM seeds and nothing else
    quick = tmp_path / "quick"
    assert pipeline.main(["--out", str(quick), "--no-amp", "--no-compile", "--stage1-only",
                          "--stage1-args", f"{STAGE1} --data-root {data}"]) == 0
    assert [r["stage"] for r in json.load(open(quick / "report.json"))["rows"]] == ["CAM seeds"]
    assert not (quick / "seg").exists()


def test_failed_step_stops_with_one_error_line(tmp_path):
    pipeline = load_script("scripts/run_pipeline.py", "run_pipeline_err")
    argv = ["--out", str(tmp_path / "o"), "--no-amp", "--no-compile",
            "--stage1-args", f"{STAGE1} --data-root {tmp_path / 'd'} --lr nan"]
    with pytest.raises(SystemExit, match=r"^error: step 'stage one \(train.py\)' failed with exit code 2"):
        pipeline.main(argv)  # SystemExit(message): Python prints it on stderr and exits with status 1
    assert "--lr nan" in (tmp_path / "o" / "commands.sh").read_text()


# flag -> (bad value, start of the one-line message)
BAD_FLAGS = {"--mask-crf": ("nope", "must be one of"), "--infer-crf": ("nope", "must be one of"),
             "--random-walk": ("nope", "must be one of"), "--model": ("resnet", "must be one of"),
             "--patch-size": ("5", "must divide 16"), "--stage1-args": ("--epochs '3", "is not a valid argument"),
             "--examples": ("-1", "must be >= 0")}


@pytest.mark.parametrize("flag", sorted(BAD_FLAGS))
def test_bad_flags_refused_before_any_work(tmp_path, capsys, flag):
    value, message = BAD_FLAGS[flag]
    pipeline = load_script("scripts/run_pipeline.py", "run_pipeline_flags")
    with pytest.raises(SystemExit) as exc:
        pipeline.main(["--out", str(tmp_path / "o"), flag, value])
    assert exc.value.code == 2 and f"{flag} {message}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started, no output folder


@pytest.mark.parametrize("argv, want", [([], ["--amp", "--cpu-amp", "fp32", "--compile"]),
                                        (["--cpu-amp", "measure"], ["--amp", "--cpu-amp", "measure", "--compile"]),
                                        (["--no-amp", "--no-compile"], [])])
def test_trainings_get_a_pinned_cpu_precision(tmp_path, argv, want):
    """Every training gets --cpu-amp (default fp32): the pipeline's numbers must not depend on the --amp probe,
    which flips between bf16 and fp32 from run to run for the demo's model."""
    pipeline = load_script("scripts/run_pipeline.py", "run_pipeline_amp")
    assert pipeline.Pipeline(pipeline._parse(["--out", str(tmp_path / "o"), *argv])).train_flags() == want


def test_bad_cpu_amp_refused_before_any_work(tmp_path, capsys):
    pipeline = load_script("scripts/run_pipeline.py", "run_pipeline_amp_bad")
    with pytest.raises(SystemExit) as exc:
        pipeline.main(["--out", str(tmp_path / "o"), "--cpu-amp", "fp16"])
    assert exc.value.code == 2 and "--cpu-amp: invalid choice: 'fp16'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
