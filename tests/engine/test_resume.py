"""Nothing lost on resume, the right run resumed (issue 15, items 1-3, 7, 11): metrics rows exactly once, the
manifest's invocation history, config checks on resume, fallback to the previous checkpoint, a truncated best
checkpoint, --max-steps already reached, the recorded thread count. Tiny synthetic runs (tests/engine/conftest.py)."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from aream_fast.engine.errors import UserError
from tests._scripts import start_until_losses
from tests.engine.conftest import ROOT, SCRIPTS, TINY, rows, step_rows


def _csv_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def _val_epochs(run_dir):
    return [r["epoch"] for r in rows(run_dir) if "val_mAP" in r]


def test_resume_logs_every_step_once_and_keeps_the_manifest_history(train_script, data_root, tmp_path):
    run_dir = str(tmp_path / "run")
    args = TINY + ["--data-root", data_root, "--no-cams", "--run-dir", run_dir]
    assert train_script.main(args + ["--max-steps", "6", "--save-every-steps", "1"]) == 0
    first = json.load(open(os.path.join(run_dir, "manifest.json")))
    # fault injection: what a process killed after step 6's checkpoint had already logged (steps 7, 8 and a
    # validation row), then a torn line; resuming must drop them and log steps 7 and 8 once
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as fh:
        for step in (7, 8):
            fh.write(json.dumps({"step": step, "loss": 123.0, "epoch": 1}) + "\n")
        fh.write(json.dumps({"step": 8, "epoch": 1, "val_mAP": 0.5}) + "\n")
        fh.write('{"step": 9, "lo')
    assert train_script.main(args + ["--resume", "auto"]) == 0
    steps = [r["step"] for r in step_rows(run_dir)]
    assert steps == list(range(1, 9))
    assert all(r["loss"] != 123.0 for r in step_rows(run_dir))
    assert _val_epochs(run_dir) == [0, 1]
    # metrics.csv: the same rows as metrics.jsonl (the resumed process knew the earlier columns)
    table = _csv_rows(run_dir)
    assert len(table) == len(rows(run_dir))
    assert [int(r["step"]) for r in table if r.get("loss")] == list(range(1, 9))
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert len(manifest["invocations"]) == 2
    assert manifest["started_utc"] == first["started_utc"] == manifest["invocations"][0]["started_utc"]
    assert manifest["invocations"][1]["resumed_from"].endswith("checkpoint.pth")
    assert manifest["torch_threads"] == 1 and manifest["threads_reason"] == "--threads"


def test_sigkill_mid_run_then_resume_logs_each_step_once(train_script, data_root, tmp_path):
    run_dir = tmp_path / "killed"
    args = TINY + ["--data-root", data_root, "--run-dir", str(run_dir), "--no-cams", "--epochs", "6",
                   "--save-every-steps", "1", "--pseudo-from-forward"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = start_until_losses([sys.executable, os.path.join(SCRIPTS, "train.py")] + args, run_dir / "metrics.jsonl",
                              3, timeout=120, env=env)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert train_script.main(args + ["--resume"]) == 0
    assert [r["step"] for r in step_rows(str(run_dir))] == list(range(1, 25))
    assert _val_epochs(str(run_dir)) == list(range(6))


def test_resume_auto_refuses_a_changed_config_and_skips_finished_runs(train_script, data_root, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)  # --resume auto looks in ./runs/<run-name>/*
    args = TINY + ["--data-root", data_root, "--no-cams", "--run-name", "tiny"]
    assert train_script.main(args + ["--max-steps", "2"]) == 0
    (first,) = os.listdir(tmp_path / "runs" / "tiny")
    with pytest.raises(UserError, match=r"--seed: checkpoint 3, now 4.*--resume-override"):
        train_script.main(args + ["--resume", "auto", "--seed", "4"])
    with pytest.raises(UserError, match=r"--aream-weight: checkpoint 0.1, now 0.2"):
        train_script.main(args + ["--resume", os.path.join("runs", "tiny", first, "checkpoint.pth"),
                                  "--aream-weight", "0.2"])
    with pytest.raises(UserError, match=r"--embed-dim: checkpoint 32, now 64"):  # not a load_state_dict trace
        train_script.main(args + ["--resume", "auto", "--embed-dim", "64"])
    time.sleep(1.1)  # run folders are named by the second
    # a deliberate change, said in the log and recorded in the manifest
    assert train_script.main(args + ["--resume", "auto", "--aream-weight", "0.2", "--resume-override"]) == 0
    run_dir = tmp_path / "runs" / "tiny" / first
    assert "--aream-weight: checkpoint 0.1, now 0.2" in (run_dir / "train.log").read_text()
    assert any("resume-override" in n for n in json.load(open(run_dir / "manifest.json"))["resume_notes"])
    # the run is finished now: --resume auto starts a new run instead of resuming (and rewriting) it
    assert train_script.main(args + ["--resume", "auto", "--aream-weight", "0.2", "--max-steps", "1"]) == 0
    assert len(os.listdir(tmp_path / "runs" / "tiny")) == 2
    assert json.load(open(run_dir / "summary.json"))["status"] == "finished"


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(train_script, data_root, tmp_path):
    run_dir = str(tmp_path / "run")
    args = TINY + ["--data-root", data_root, "--run-dir", run_dir, "--no-cams"]
    assert train_script.main(args + ["--max-steps", "6", "--save-every-steps", "1"]) == 0
    latest = os.path.join(run_dir, "checkpoint.pth")
    prev = os.path.join(run_dir, "checkpoint_prev.pth")
    assert torch.load(prev, weights_only=False)["global_step"] == 5
    with open(latest, "r+b") as fh:  # truncated by a failing disk / copy
        fh.truncate(os.path.getsize(latest) // 3)
    assert train_script.main(args + ["--resume", "auto"]) == 0
    log = open(os.path.join(run_dir, "train.log")).read()
    assert f"skipped checkpoint {latest} (does not load" in log and f"resuming from {prev} instead" in log
    assert "global step 5" in log
    assert [r["step"] for r in step_rows(run_dir)] == list(range(1, 9))  # step 6 once, from the fallback on
    assert torch.load(latest, weights_only=False)["global_step"] == 8  # the final checkpoint is whole again
    for path in (latest, prev):
        with open(path, "wb") as fh:
            fh.write(b"garbage")
    with pytest.raises(UserError, match="no checkpoint loads"):
        train_script.main(args + ["--resume", "auto"])


def test_crash_in_validation_loses_no_training(train_script, data_root, tmp_path, monkeypatch):
    from aream_fast.engine import aream_task

    run_dir = str(tmp_path / "run")
    args = TINY + ["--data-root", data_root, "--run-dir", run_dir, "--no-cams"]
    real_validate = aream_task.AReAMTask.validate

    def broken(self, ctx):  # e.g. a val image that turns out unreadable
        raise OSError("val image broke")

    monkeypatch.setattr(aream_task.AReAMTask, "validate", broken)
    with pytest.raises(OSError, match="val image broke"):
        train_script.main(args)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pth"), weights_only=False)
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["validation_pending"]) == (1, 4, True)
    monkeypatch.setattr(aream_task.AReAMTask, "validate", real_validate)
    assert train_script.main(args + ["--resume", "auto"]) == 0
    assert [r["step"] for r in step_rows(run_dir)] == list(range(1, 9))
    assert _val_epochs(run_dir) == [0, 1]  # epoch 0's validation ran first on resume, once


def test_truncated_best_checkpoint_at_the_end_writes_cams_from_the_last_weights(train_script, data_root,
                                                                                tmp_path, monkeypatch):
    from aream_fast.engine import aream_task

    run_dir = str(tmp_path / "run")
    real_save = aream_task.AReAMTask.finish

    def truncate_then_finish(self, ctx):  # the best checkpoint is damaged after training, before the CAMs
        best = os.path.join(ctx.run_dir, "checkpoint_best.pth")
        with open(best, "r+b") as fh:
            fh.truncate(64)
        return real_save(self, ctx)

    monkeypatch.setattr(aream_task.AReAMTask, "finish", truncate_then_finish)
    assert train_script.main(TINY + ["--data-root", data_root, "--run-dir", run_dir, "--epochs", "2"]) == 0
    log = open(os.path.join(run_dir, "train.log")).read()
    assert "checkpoint_best.pth does not load" in log and "(last weights)" in log
    assert json.load(open(os.path.join(run_dir, "summary.json")))["cam_mIoU"] is not None


def test_resume_at_max_steps_trains_no_more_step(train_script, data_root, tmp_path):
    run_dir = str(tmp_path / "run")
    args = TINY + ["--data-root", data_root, "--no-cams", "--run-dir", run_dir, "--max-steps", "3"]
    assert train_script.main(args) == 0
    assert train_script.main(args + ["--resume", "auto"]) == 0
    assert torch.load(os.path.join(run_dir, "checkpoint.pth"), weights_only=False)["global_step"] == 3
    assert [r["step"] for r in step_rows(run_dir)] == [1, 2, 3]
    assert "--max-steps 3 already reached" in open(os.path.join(run_dir, "train.log")).read()
