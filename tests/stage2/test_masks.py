"""Pseudo masks (aream_fast.stage2.masks) and scripts/make_pseudo_masks.py end to end on tiny synthetic data."""
import builtins
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aream_fast import load_cam_npy, save_cam_npy
from aream_fast.data import ensure_synthetic, read_image, read_mask
from aream_fast.evaluation.metrics import cam_to_prediction
from aream_fast.stage2.masks import IGNORE_ALPHAS, pseudo_mask
from aream_fast.stage2.random_walk import random_walk

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "make_pseudo_masks.py"


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _crf_module():
    try:
        import aream_fast.stage2.crf as crf  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the dense CRF (aream_fast.stage2.crf) is not in this tree yet: {e}")
    return crf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 5 + 2 image synthetic set (36 px), a depth-2 checkpoint and its CAM seeds for the train split."""
    from aream_fast.pseudo_labels.cam import inference_cam
    from aream_fast.data.transforms import EvalTransform
    from aream_fast.engine.build import build_model_from_config
    from aream_fast.engine.checkpoint import FORMAT_VERSION
    from aream_fast.engine.config import TrainConfig

    base = tmp_path_factory.mktemp("masks")
    root = ensure_synthetic(base / "syn", num_train=5, num_val=2, image_size=36, progress=False)
    cfg = TrainConfig().replace(dataset="synthetic", data_root=str(root), model="mct_deit_small", depth=2,
                                embed_dim=32, num_heads=2, image_size=32, layer_index=1)
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model, 6, image_size=32).eval()
    ckpt = base / "checkpoint.pth"
    torch.save({"format": FORMAT_VERSION, "config": cfg.to_dict(), "num_classes": 6, "model": model.state_dict()},
               ckpt)
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    names = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    cam_dir = base / "cams"
    cam_dir.mkdir()
    rng = np.random.default_rng(0)
    for n in names:
        image = EvalTransform(None)(read_image(root / "JPEGImages" / f"{n}.jpg"), None)[0]
        keys, cam = inference_cam(model, image, torch.as_tensor(labels[n]), flip=False)
        gt = read_mask(root / "SegmentationClassAug" / f"{n}.png")  # blend in the GT so the masks score > 0
        cam = 0.5 * cam + 0.5 * np.stack([(gt == k + 1) * rng.uniform(0.5, 1.0, gt.shape) for k in keys])
        save_cam_npy(cam_dir / f"{n}.npy", keys, cam.astype(np.float32))
    return {"root": root, "ckpt": ckpt, "cam_dir": cam_dir, "names": names, "base": base}


def _argv(tiny, out, *extra):
    return ["--cam-dir", str(tiny["cam_dir"]), "--data-root", str(tiny["root"]), "--split", "train",
            "--out-dir", str(out), "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------------------------
def test_threshold_only_is_the_cam_evaluation_rule():
    rng = np.random.default_rng(1)
    keys, cams = np.array([1, 4]), rng.random((2, 9, 7)).astype(np.float32)
    for t in (0.2, 0.55):
        np.testing.assert_array_equal(pseudo_mask(keys, cams, bg_threshold=t), cam_to_prediction(keys, cams, t))
    assert (pseudo_mask(np.zeros(0), np.zeros((0, 9, 7)), bg_threshold=0.3) == 0).all()


def test_ignore_rule_without_crf():
    rng = np.random.default_rng(2)
    keys, cams = np.array([0, 2]), rng.random((2, 8, 8)).astype(np.float32)
    top = cams.max(0)
    labels = []
    for a in IGNORE_ALPHAS:
        stack = np.concatenate([((1 - top) ** a)[None], cams])
        labels.append(np.concatenate([[0], keys + 1])[stack.argmax(0)])
    expect = np.where(labels[0] == labels[1], labels[0], 255)
    got = pseudo_mask(keys, cams, ignore=True)
    np.testing.assert_array_equal(got, expect)
    assert (got == 255).any() and (got != 255).any()


def test_random_walk_mask_is_the_argmax_of_the_walk():
    rng = np.random.default_rng(3)
    keys, cams = np.array([3, 5]), rng.random((2, 10, 13)).astype(np.float32)
    a = torch.rand(12, 12)
    aff = (a + a.T) / 2
    got = pseudo_mask(keys, cams, bg_threshold=0.45, random_walk="aream", affinity=aff, patch_size=4)
    scores = random_walk(cams, aff, patch_size=4, preset="aream", bg_threshold=0.45)
    np.testing.assert_array_equal(got, np.array([0, 4, 6])[scores.argmax(0).numpy()])
    psa = pseudo_mask(keys, cams, bg_threshold=0.45, random_walk="psa", affinity=aff, patch_size=4)
    ref = random_walk(cams, aff, patch_size=4, preset="psa")  # PSA's background is a power, not the threshold
    np.testing.assert_array_equal(psa, np.array([0, 4, 6])[ref.argmax(0).numpy()])


def test_pseudo_mask_bad_inputs():
    keys, cams = np.array([0]), np.ones((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="bg_threshold is required"):
        pseudo_mask(keys, cams)
    with pytest.raises(ValueError, match="len\\(keys\\)"):
        pseudo_mask(np.array([0, 1]), cams, bg_threshold=0.3)
    with pytest.raises(ValueError, match="NaN"):
        pseudo_mask(keys, cams * np.nan, bg_threshold=0.3)
    with pytest.raises(ValueError, match="uint8"):
        pseudo_mask(keys, cams, bg_threshold=0.3, crf="cam", image=np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="affinity"):
        pseudo_mask(keys, cams, bg_threshold=0.3, random_walk="aream")


# ---------------------------------------------------------------------------------------------------------------
def test_script_threshold_and_random_walk_end_to_end(tiny):
    script = _load(SCRIPT, "make_pseudo_masks_script")
    evaluate = _load(REPO / "scripts" / "evaluate.py", "evaluate_script")
    out = tiny["base"] / "thr"
    rep = script.main(_argv(tiny, out, "--bg-threshold", "0.4"))
    for n in tiny["names"]:
        keys, cams = load_cam_npy(tiny["cam_dir"] / f"{n}.npy")
        np.testing.assert_array_equal(read_mask(out / f"{n}.png"), cam_to_prediction(keys, cams, 0.4))
    saved = json.loads((out / "report.json").read_text())
    assert saved["split"] == "train" and saved["post_processing"] == "threshold" and saved["crf"] is None
    # the same number as scripts/evaluate.py --png-dir on the written folder
    ev = evaluate.evaluate(evaluate._parse(["--png-dir", str(out), "--data-root", str(tiny["root"]),
                                            "--split", "train", "--no-progress"]))
    assert rep["score"]["miou"] == pytest.approx(ev["miou"]) and 0 < rep["score"]["miou"] < 1

    rw_out = tiny["base"] / "rw"
    rep = script.main(_argv(tiny, rw_out, "--bg-threshold", "0.4", "--random-walk", "aream",
                            "--checkpoint", str(tiny["ckpt"])))
    assert rep["post_processing"] == "threshold + rw(aream)"
    assert rep["random_walk"]["t"] == 64 and "layers [1]" in rep["random_walk"]["affinity"]
    assert 0 < rep["score"]["miou"] < 1
    # an explicit check of one image against the library calls with the checkpoint's own attention
    from aream_fast.data.transforms import EvalTransform
    from aream_fast.engine.build import load_model_from_checkpoint
    from aream_fast.stage2.random_walk import vit_affinity

    model, _ = load_model_from_checkpoint(str(tiny["ckpt"]))
    n = tiny["names"][0]
    keys, cams = load_cam_npy(tiny["cam_dir"] / f"{n}.npy")
    image = EvalTransform(None)(read_image(tiny["root"] / "JPEGImages" / f"{n}.jpg"), None)[0]
    aff = vit_affinity(model, image, layers=(1,))
    expect = pseudo_mask(keys, cams, bg_threshold=0.4, random_walk="aream", affinity=aff, patch_size=16)
    np.testing.assert_array_equal(read_mask(rw_out / f"{n}.png"), expect)


def test_auto_threshold_comes_from_the_cam_sweep(tiny, tmp_path):
    script = _load(SCRIPT, "make_pseudo_masks_script")
    cam_dir = tmp_path / "cams"
    cam_dir.mkdir()
    for n in tiny["names"]:
        (cam_dir / f"{n}.npy").write_bytes((tiny["cam_dir"] / f"{n}.npy").read_bytes())
    argv = ["--cam-dir", str(cam_dir)] + _argv(tiny, tmp_path / "out")[2:]
    with pytest.raises(FileNotFoundError, match="--bg-threshold"):
        script.main(argv)
    (cam_dir / "eval_train.json").write_text(json.dumps({"best_threshold": 0.23}))
    rep = script.main(argv)
    assert rep["bg_threshold"] == 0.23 and rep["bg_threshold_source"].endswith("eval_train.json")


def test_masks_never_read_ground_truth(tiny, monkeypatch):
    """Instrument every file open while the masks are made (--no-eval): no ground-truth file is opened."""
    script = _load(SCRIPT, "make_pseudo_masks_script")
    opened = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def spy(real):
        def wrapper(file, *a, **k):
            opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
            return real(file, *a, **k)
        return wrapper

    monkeypatch.setattr(builtins, "open", spy(real_open))
    monkeypatch.setattr(io, "open", spy(real_io_open))
    monkeypatch.setattr(os, "open", spy(real_os_open))
    script.main(_argv(tiny, tiny["base"] / "no_gt", "--bg-threshold", "0.4", "--random-walk", "psa",
                      "--checkpoint", str(tiny["ckpt"]), "--no-eval"))
    monkeypatch.undo()
    assert any(p.endswith(".npy") and "cams" in p for p in opened)  # the spy does see the CAM reads
    assert any(p.endswith(".jpg") for p in opened)
    assert not [p for p in opened if "SegmentationClass" in p]


def test_script_bad_inputs(tiny, tmp_path):
    script = _load(SCRIPT, "make_pseudo_masks_script")
    root = tiny["root"]
    with pytest.raises(ValueError, match="ground-truth folder"):
        script.main(_argv(tiny, root / "SegmentationClassAug", "--bg-threshold", "0.4"))
    with pytest.raises(ValueError, match="ground-truth folder"):
        script.main(_argv(tiny, root / "SegmentationClassAug" / "sub", "--bg-threshold", "0.4"))
    with pytest.raises(ValueError, match="ground-truth folder"):
        script.main(["--cam-dir", str(root / "SegmentationClassAug")] + _argv(tiny, tmp_path / "o")[2:]
                    + ["--bg-threshold", "0.4"])
    assert not (root / "SegmentationClassAug" / "sub").exists()

    cam_dir = tmp_path / "cams"
    cam_dir.mkdir()
    names = tiny["names"]
    for n in names[1:]:
        (cam_dir / f"{n}.npy").write_bytes((tiny["cam_dir"] / f"{n}.npy").read_bytes())
    argv = ["--cam-dir", str(cam_dir)] + _argv(tiny, tmp_path / "out")[2:] + ["--bg-threshold", "0.4"]
    with pytest.raises(FileNotFoundError, match=f"CAM file missing for image .*{names[0]}"):
        script.main(argv)
    keys, cams = load_cam_npy(tiny["cam_dir"] / f"{names[0]}.npy")
    save_cam_npy(cam_dir / f"{names[0]}.npy", keys, cams[:, :-1])
    with pytest.raises(ValueError, match=f"{names[0]}.npy has size"):
        script.main(argv)
    (cam_dir / f"{names[0]}.npy").write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match=f"{names[0]}.npy"):
        script.main(argv)
    with pytest.raises(ValueError, match="--bg-threshold must be in"):
        script.main(_argv(tiny, tmp_path / "o", "--bg-threshold", "1.5"))
    with pytest.raises(ValueError, match="--ignore uses"):
        script.main(_argv(tiny, tmp_path / "o", "--bg-threshold", "0.4", "--ignore"))
    with pytest.raises(SystemExit):
        script.main(_argv(tiny, tmp_path / "o", "--random-walk", "aream"))  # no --checkpoint
    with pytest.raises(ValueError, match="preset"):
        script.main(_argv(tiny, tmp_path / "o", "--bg-threshold", "0.4", "--random-walk", "nope",
                          "--checkpoint", str(tiny["ckpt"])))
    # one subprocess for the command-line contract: a one-line "error:" message (+ the --debug hint), exit code 1
    proc = subprocess.run([sys.executable, str(SCRIPT)] + argv[:-1] + ["0.4", "--no-eval"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[1:] == ["(run with --debug or AREAM_FAST_DEBUG=1 for the traceback)"]


def test_crf_path_and_ignore_rule(tiny):
    crf = _crf_module()
    script = _load(SCRIPT, "make_pseudo_masks_script")
    out = tiny["base"] / "crf"
    rep = script.main(_argv(tiny, out, "--bg-threshold", "0.4", "--crf", "cam"))
    assert rep["crf"]["preset"] == "cam" and rep["post_processing"] == "threshold + crf(cam)"
    n = tiny["names"][0]
    keys, cams = load_cam_npy(tiny["cam_dir"] / f"{n}.npy")
    image = read_image(tiny["root"] / "JPEGImages" / f"{n}.jpg")
    probs = torch.cat([torch.full((1,) + cams.shape[1:], 0.4), torch.from_numpy(cams)])
    q = torch.as_tensor(crf.dense_crf(image, probs, preset="cam", iterations=10, normalized=False))
    np.testing.assert_array_equal(read_mask(out / f"{n}.png"), np.concatenate([[0], keys + 1])[q.argmax(0)])
    # the la / ha rule with both post-processings: RW then CRF on each of the two background planes
    ign = script.main(_argv(tiny, tiny["base"] / "crf_ign", "--crf", "cam", "--ignore", "--random-walk", "aream",
                            "--checkpoint", str(tiny["ckpt"])))
    assert ign["ignore_rule"]["alphas"] == [1.0, 12.0] and ign["bg_threshold"] is None
    assert ign["post_processing"] == "la/ha alphas (1.0, 12.0) + rw(aream) + crf(cam)"
    from aream_fast.data.transforms import EvalTransform
    from aream_fast.engine.build import load_model_from_checkpoint
    from aream_fast.stage2.random_walk import vit_affinity

    model, _ = load_model_from_checkpoint(str(tiny["ckpt"]))
    aff = vit_affinity(model, EvalTransform(None)(image, None)[0], layers=(1,))
    expect = pseudo_mask(keys, cams, image=image, crf="cam", random_walk="aream", affinity=aff, patch_size=16,
                         ignore=True)
    np.testing.assert_array_equal(read_mask(tiny["base"] / "crf_ign" / f"{n}.png"), expect)
    with pytest.raises(ValueError, match="--crf must be one of"):
        script.main(_argv(tiny, tiny["base"] / "x", "--bg-threshold", "0.4", "--crf", "no-such-preset"))
