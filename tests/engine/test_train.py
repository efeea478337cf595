"""scripts/train.py and scripts/make_cams.py end to end on a tiny synthetic set: checkpoints, CAMs, mIoU;
exact resume; torchrun + gloo; data errors; no recompiles under torch.compile; SIGTERM safety."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests._scripts import start_until_losses, synthetic_root

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
MAKE_CAMS = os.path.join(ROOT, "scripts", "make_cams.py")

# tiny: 16 train images of 48 px, batch 4 -> 4 steps/epoch; AReAM from epoch 1; depth 4 -> refine 0-1, loss 2-3
TINY = ["--synthetic-train-size", "16", "--synthetic-val-size", "6", "--image-size", "48", "--embed-dim", "32",
        "--depth", "4", "--num-heads", "2", "--batch-size", "4", "--epochs", "2", "--cls-epochs", "1",
        "--seed", "3"]


def _load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script = _load_script(TRAIN, "train_script")
make_cams_script = _load_script(MAKE_CAMS, "make_cams_script")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic_root(tmp_path_factory, num_train=16, num_val=6, image_size=48)


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _step_losses(run_dir):
    return {r["step"]: r["loss"] for r in _rows(run_dir) if "loss" in r}


@pytest.mark.slow
def test_train_end_to_end_writes_checkpoints_cams_and_miou(data_root, tmp_path):
    run_dir = str(tmp_path / "run")
    assert train_script.main(TINY + ["--data-root", data_root, "--run-dir", run_dir, "--cam-overlays", "1"]) == 0
    for name in ("checkpoint.pth", "checkpoint_best.pth", "manifest.json", "metrics.csv", "metrics.jsonl",
                 "summary.json", "train.log"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["status"] == "finished" and summary["global_step"] == 8
    assert 0.0 <= summary["cam_mIoU"] <= 1.0 and 0.0 < summary["cam_threshold"] < 0.8
    cams = sorted(f for f in os.listdir(os.path.join(run_dir, "cams_val")) if f.endswith(".npy"))
    assert len(cams) == 6
    content = np.load(os.path.join(run_dir, "cams_val", cams[0]), allow_pickle=True).item()
    assert set(content) == {"key", "cam"} and content["key"].dtype == np.int64
    assert content["cam"].dtype == np.float32 and content["cam"].shape[1:] == (48, 48)
    assert content["cam"].min() >= 0 and content["cam"].max() <= 1
    assert any(f.endswith(".png") for f in os.listdir(os.path.join(run_dir, "cams_val")))
    rows = _rows(run_dir)
    aream_rows = [r for r in rows if r.get("aream_active") == 1]
    assert len(aream_rows) == 4 and all(r["loss_aff"] > 0 for r in aream_rows)
    assert all("loss_aff" not in r for r in rows if r.get("aream_active") == 0)
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert manifest["layer_index"] == 2 and manifest["config"]["run"]["seed"] == 3

    # make_cams.py on the best checkpoint reproduces the same files and scores them
    out = str(tmp_path / "cams2")
    assert make_cams_script.main(["--checkpoint", os.path.join(run_dir, "checkpoint_best.pth"),
                                  "--out-dir", out, "--eval"]) == 0
    again = np.load(os.path.join(out, cams[0]), allow_pickle=True).item()
    np.testing.assert_array_equal(again["key"], content["key"])
    np.testing.assert_allclose(again["cam"], content["cam"], atol=1e-6)
    result = json.load(open(os.path.join(out, "cam_eval.json")))
    assert result["mIoU"] == pytest.approx(summary["cam_mIoU"], abs=1e-6)


def test_interrupt_and_resume_reproduce_the_uninterrupted_losses(data_root, tmp_path):
    # entropy layer weights ('E') on top: loss weights e_l for layers 2-3, refinement weights 1 - e_l for 0-1
    np.save(tmp_path / "entropy.npy", np.array([3.0, 2.5, 1.0, 2.0]))
    common = TINY + ["--data-root", data_root, "--no-cams", "--drop-path", "0.2",
                     "--layer-weights", str(tmp_path / "entropy.npy")]
    full = str(tmp_path / "full")
    assert train_script.main(common + ["--run-dir", full]) == 0
    cut = str(tmp_path / "cut")
    # stop mid AReAM epoch (after step 6 = batch 2 of epoch 1), then resume to the end
    assert train_script.main(common + ["--run-dir", cut, "--max-steps", "6"]) == 0
    ck = torch.load(os.path.join(cut, "checkpoint.pth"), weights_only=False)
    assert (ck["epoch"], ck["batch_in_epoch"], ck["global_step"]) == (1, 2, 6)
    assert train_script.main(common + ["--resume", os.path.join(cut, "checkpoint.pth")]) == 0
    a, b = _step_losses(full), _step_losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], abs=1e-6, rel=0), f"step {step}: {b[step]} != {a[step]}"
    ma = torch.load(os.path.join(full, "checkpoint.pth"), weights_only=False)["model"]
    mb = torch.load(os.path.join(cut, "checkpoint.pth"), weights_only=False)["model"]
    for key in ma:
        torch.testing.assert_close(mb[key], ma[key], rtol=0, atol=1e-6)
    # layer 2 has e = 0: its loss weight is 0; layer 3 has e = 0.5 -> loss = 0.5 * L_3 / 2 (not renormalised)
    assert "weights entropy (loss [0.0, 0.5], refine [0.0, 0.25])" in open(os.path.join(full, "train.log")).read()


@pytest.mark.parametrize("reuse", [False, True])
def test_loss_grad_layer_and_forward_train_identically(data_root, tmp_path, reuse):
    # the deferred per-layer gradients (default) and the gradients made in the forward: same training run
    common = TINY + ["--data-root", data_root, "--no-cams", "--epochs", "2", "--max-steps", "6"]
    common += ["--pseudo-from-forward"] if reuse else []
    layer, forward = str(tmp_path / "layer"), str(tmp_path / "forward")
    assert train_script.main(common + ["--run-dir", layer]) == 0
    assert train_script.main(common + ["--run-dir", forward, "--loss-grad", "forward"]) == 0
    a, b = _step_losses(layer), _step_losses(forward)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6, rel=0), f"step {step}: {b[step]} != {a[step]}"
    assert "made in each supervised layer's backward" in open(os.path.join(layer, "train.log")).read()
    assert "made with the loss value in the forward" in open(os.path.join(forward, "train.log")).read()


def test_bad_data_root_and_corrupt_image(data_root, tmp_path):
    from aream_fast.data.image_io import CorruptImageError
    from aream_fast.data.layout import DatasetLayoutError

    with pytest.raises(DatasetLayoutError, match="nonexistent"):
        train_script.main(["--dataset", "voc", "--data-root", str(tmp_path / "nonexistent"), "--no-cams"])
    with pytest.raises(SystemExit):  # argparse error naming --data-root
        train_script.main(["--dataset", "voc"])
    bad_root = tmp_path / "bad"
    shutil.copytree(data_root, bad_root)
    victim = sorted((bad_root / "JPEGImages").glob("train_*.jpg"))[0]
    victim.write_bytes(b"\xff\xd8 this is not a jpeg")
    args = TINY + ["--data-root", str(bad_root), "--no-cams"]
    with pytest.raises(CorruptImageError, match=victim.name):  # an epoch reads every image
        train_script.main(args + ["--run-dir", str(tmp_path / "r1"), "--max-steps", "4"])
    with pytest.warns(UserWarning, match=victim.name):
        assert train_script.main(args + ["--run-dir", str(tmp_path / "r2"), "--skip-bad-images",
                                         "--max-steps", "1"]) == 0
    manifest = json.load(open(tmp_path / "r2" / "manifest.json"))
    assert manifest["train_size"] == 15


def test_compiled_step_does_not_recompile(data_root, tmp_path):
    try:
        torch.compile(lambda x: x + 1, backend="aot_eager")(torch.ones(1))
    except Exception as exc:  # visible skip, only when compile itself is unavailable here
        pytest.skip(f"torch.compile unavailable: {exc}")
    from torch._dynamo.utils import counters

    run_dir = str(tmp_path / "c")
    before = int(counters["stats"]["unique_graphs"])
    # warm-up epoch, then an AReAM epoch of 4 steps; aot_eager has the same dynamo guards as inductor
    assert train_script.main(TINY + ["--data-root", data_root, "--no-cams", "--compile",
                                     "--compile-backend", "aot_eager", "--debug-recompiles",
                                     "--run-dir", run_dir]) == 0
    graphs = {r["step"]: r["dynamo_graphs"] - before for r in _rows(run_dir) if "dynamo_graphs" in r}
    # warm-up: the training graph only (a few frames at most); AReAM phase adds pseudo-forward + loss graphs
    assert graphs[2] == graphs[4] >= 1
    assert graphs[5] > graphs[4]
    assert graphs[6] == graphs[7] == graphs[8], graphs  # no recompilation after the first AReAM steps
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["compile_stats"]["graphs_after_warmup"] == summary["compile_stats"]["unique_graphs"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_torchrun_two_processes_gloo(data_root, tmp_path):
    run_dir = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           TRAIN] + TINY + ["--data-root", data_root, "--run-dir", run_dir, "--no-cams", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert manifest["world_size"] == 2 and manifest["steps_per_epoch"] == 2
    rows = [r for r in _rows(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 logs; steps 3-4 run the AReAM term under DDP
    assert all(np.isfinite(r["loss"]) for r in rows) and "loss_aff" in rows[-1]
    assert os.path.isfile(os.path.join(run_dir, "checkpoint.pth"))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes(data_root, tmp_path):
    run_dir = tmp_path / "sig"
    # --pseudo-from-forward: pseudo labels from the training forward's records (no second forward). 12 epochs
    # (48 steps, several seconds): the signal must land mid-training, not after the last step of a sub-second run
    args = TINY + ["--data-root", data_root, "--run-dir", str(run_dir), "--no-cams", "--pseudo-from-forward",
                   "--epochs", "12"]
    cmd = [sys.executable, TRAIN] + args
    proc = start_until_losses(cmd, run_dir / "metrics.jsonl", 1, timeout=240, env=_env(), poll=0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    ck = torch.load(run_dir / "checkpoint.pth", weights_only=False)
    done = ck["global_step"]
    assert 1 <= done < 48
    assert train_script.main(args + ["--resume"]) == 0
    rows = [r for r in _rows(str(run_dir)) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 49))  # nothing lost, nothing repeated
    assert all(r["loss_aff"] > 0 for r in rows if r["aream_active"])  # nothing lost, nothing repeated


def test_checkpoint_of_the_flat_config_layout_resumes_with_the_same_losses(tmp_path):
    """A checkpoint written before the config had sections (flat config dict; commit 396c705, stopped after
    step 6 of 8 with --max-steps 6, one CPU thread) resumes on this code with the losses that code's
    uninterrupted run logged for steps 7 and 8 (tests/data/legacy_flat_config_losses.json)."""
    from aream_fast.data import ensure_synthetic

    legacy = json.load(open(os.path.join(ROOT, "tests", "data", "legacy_flat_config_losses.json")))
    ckpt_path = os.path.join(ROOT, "tests", "data", "legacy_flat_config_checkpoint.pth")
    assert "data" not in torch.load(ckpt_path, weights_only=False)["config"]  # really the old flat layout
    root = tmp_path / "synthetic"
    ensure_synthetic(root, num_train=16, num_val=6, image_size=48, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = str(tmp_path / "resumed")
        argv = legacy["argv"] + ["--data-root", str(root), "--no-cams", "--run-dir", run_dir,
                                 "--resume", ckpt_path, "--threads", "1"]
        assert train_script.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    resumed = _step_losses(run_dir)
    assert sorted(resumed) == [7, 8]
    for step in (7, 8):
        assert resumed[step] == pytest.approx(legacy["losses"][str(step)], abs=1e-6, rel=0), step
