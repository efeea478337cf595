"""The Conformer-S training path (issue 14): ``ConformerTask``, ``--preset official-conformer``, the img_box
augmentation, and make_cams.py / analyze_layers.py on a Conformer checkpoint.

The step is checked against ``aream_fast.official.conformer.official_conformer_training_step`` (dense attention,
official pseudo-label branch with the crop box); the runs use a tiny Conformer (4 stem channels, CNN ratio 1,
embed 16, 2 heads, 12 layers) on 64 px synthetic images.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from aream_fast import PAR, build_model
from aream_fast.data.conformer_transforms import ConformerTrainTransform
from aream_fast.data.transforms import normalize
from aream_fast.engine.conformer_task import HEAD_LR_SCALE, ConformerTask
from aream_fast.engine.config import PRESETS, TrainConfig, config_from_args
from aream_fast.engine.optim import freeze_unused_parameters
from aream_fast.engine.task import TaskContext
from aream_fast.models.records import LayerSplit
from aream_fast.official.conformer import OfficialConformer, official_conformer_training_step
from aream_fast.official.pseudo_labels import OfficialPAR
from aream_fast.pseudo_labels.conformer import CONFORMER_TRAINING, conformer_inference_cam
from tests._scripts import load_script, synthetic_root

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K = 5
TINY_MODEL = dict(base_channel=4, channel_ratio=1, embed_dim=16, num_heads=2)
# the official preset, shrunk: 8 train images of 64 px, batch 4 -> 2 steps/epoch, AReAM from epoch 1
TINY = ["--preset", "official-conformer", "--dataset", "synthetic", "--train-split", "train", "--cam-split", "val",
        "--synthetic-train-size", "8", "--synthetic-val-size", "4", "--image-size", "64", "--base-channel", "4",
        "--channel-ratio", "1", "--embed-dim", "16", "--depth", "12", "--num-heads", "2", "--batch-size", "4",
        "--epochs", "2", "--cls-epochs", "1", "--lr", "1e-3", "--seed", "3"]


def _load_script(name):
    return load_script(f"scripts/{name}.py", f"{name}_script")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic_root(tmp_path_factory, num_train=8, num_val=4, image_size=64)


def _step_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r for r in map(json.loads, fh) if "loss" in r}


# ------------------------------------------------------------------------------------------------ config
def test_preset_is_the_official_recipe_and_flags_win():
    preset = PRESETS["official-conformer"]
    ref = CONFORMER_TRAINING
    for ours, theirs in [("model", "model"), ("image_size", "crop_size"), ("batch_size", "batch_size"),
                         ("epochs", "epochs"), ("cls_epochs", "cls_epochs"), ("layer_index", "layer_index"),
                         ("lr", "lr"), ("warmup_lr", "start_lr"), ("min_lr", "final_lr"),
                         ("warmup_epochs", "warmup_epochs"), ("weight_decay", "weight_decay"),
                         ("aream_weight", "aream_weight"), ("bg_low", "bg_low"), ("bg_high", "bg_high"),
                         ("pseudo_scales", "pseudo_scales"), ("cam_scales", "inference_scales")]:
        assert preset[ours] == ref[theirs], ours
    assert HEAD_LR_SCALE == ref["lr_scale"]
    cfg = config_from_args(["--preset", "official-conformer", "--data-root", "VOC", "--batch-size", "4"])
    assert (cfg.model.model, cfg.data.image_size, cfg.aream.layer_index, cfg.optim.batch_size) == \
        ("conformer_small", 384, 9, 4)
    assert cfg.aream.pseudo_scales == (0.5, 1.0, 1.5) and cfg.model.overrides() == {}
    with pytest.raises(ValueError, match="--base-channel"):
        TrainConfig().replace(base_channel=0)


# ------------------------------------------------------------------------------------------------ data
def test_train_transform_places_the_image_inside_its_box():
    """Scale 1, no flip/jitter: the crop holds the image exactly inside img_box and normalised black (and
    mask 255) outside; with the official ranges the box still marks exactly the non-padding pixels."""
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (40, 56, 3), dtype=np.uint8)  # no black pixel: padding is recognisable
    mask = rng.integers(0, 4, (40, 56), dtype=np.uint8)
    plain = ConformerTrainTransform(64, scale_range=(1.0, 1.0), hflip=0.0, color_jitter=None)
    black = normalize(torch.zeros(3, 1, 1))
    for _ in range(4):
        img, m, extra = plain(image, mask)
        i1, i2, j1, j2 = extra["img_box"].tolist()
        assert img.shape == (3, 64, 64) and m.shape == (64, 64) and (i2 - i1, j2 - j1) == (40, 56)
        want = normalize(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
        torch.testing.assert_close(img[:, i1:i2, j1:j2], want, rtol=0, atol=1e-6)
        assert torch.equal(m[i1:i2, j1:j2], torch.from_numpy(mask).long())
        outside = torch.ones(64, 64, dtype=torch.bool)
        outside[i1:i2, j1:j2] = False
        assert torch.equal(img[:, outside], black.view(3, 1).expand(3, int(outside.sum())))
        assert bool((m[outside] == 255).all())
    official = ConformerTrainTransform(64)
    for _ in range(6):
        img, m, extra = official(image, None)
        i1, i2, j1, j2 = extra["img_box"].tolist()
        assert m is None and img.shape == (3, 64, 64) and 0 <= i1 < i2 <= 64 and 0 <= j1 < j2 <= 64
        # scaled by 0.5..2: the image part is 20..80 rows (clipped to the crop)
        assert min(20, 64) <= i2 - i1 + (1 if i2 - i1 < 20 else 0) and j2 - j1 <= 64
    with pytest.raises(ValueError, match="crop_size"):
        ConformerTrainTransform(0)
    with pytest.raises(ValueError, match="scale_range"):
        ConformerTrainTransform(64, scale_range=(0.0, 1.0))


# ------------------------------------------------------------------------------------------------ step
def test_task_step_matches_the_official_training_step():
    """ConformerTask's step after cls_epochs (pseudo labels at 0.5/1/1.5 + flips in train mode, crop box,
    deferred loss gradients) = main_voc_conformer.py's step with dense attention: loss and every gradient."""
    model = build_model("conformer_small", K, img_size=64, drop_path=0.0, **TINY_MODEL).double()
    ref = OfficialConformer.from_model(model)
    cfg = TrainConfig().replace(model="conformer_small", depth=12, **TINY_MODEL, image_size=64, cls_epochs=2,
                                epochs=12, layer_index=9, pseudo_scales=(0.5, 1.0, 1.5))
    task = ConformerTask(cfg)
    task.model, task.split = model, LayerSplit.from_depth(12, 9)
    task.prepare(TaskContext(cfg=cfg, device=torch.device("cpu"), dist=None, log=lambda msg: None), model)
    torch.manual_seed(5)
    x = torch.randn(2, 3, 32, 64, dtype=torch.float64)  # non-square; x0.5 and x1.5 stay multiples of 16
    labels = torch.zeros(2, K, dtype=torch.float64)
    labels[0, [1, 3]] = 1
    labels[1, 2] = 1
    img_box = torch.tensor([[0, 32, 0, 64], [0, 20, 17, 64]])  # image 1: padding above row 20, left of col 17
    batch = {"image": x, "label": labels, "img_box": img_box}
    model.train()
    loss, terms = task.step(batch, epoch=2)
    assert int(terms["aream_active"]) == 1 and float(terms["pseudo_ignore_frac"]) > 0
    loss.backward()
    theirs = official_conformer_training_step(ref, x, labels, par=OfficialPAR(), img_box=img_box)
    # AReAMStep reports loss_aff in float32 (``loss_aff.float()``): values agree to float32 rounding
    torch.testing.assert_close(loss.detach(), theirs["loss"], rtol=0, atol=1e-7)
    torch.testing.assert_close(terms["loss_aff"].double(), theirs["loss_aff"], rtol=0, atol=1e-7)
    # ... and the float32 cast scales the affinity gradients by float32(1) (relative 1e-8 of the largest
    # gradient, measured 4.5e-8; biases in front of train-mode BN have ~0 gradients, so no per-tensor rtol)
    grads = dict(ref.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in grads.values())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=1e-6 * scale, msg=name)


def test_optimizer_groups_and_schedule_scale_the_heads():
    from aream_fast.engine.schedule import WarmupCosineSchedule

    model = build_model("conformer_small", K, img_size=64, **TINY_MODEL)
    cfg = TrainConfig().replace(model="conformer_small", depth=12, **TINY_MODEL, image_size=64, lr=5e-5,
                                weight_decay=0.01)
    opt = ConformerTask(cfg).build_optimizer(model)
    head = {id(p) for n, p in model.named_parameters() if "head" in n}
    # official: no decay on 1-D parameters, biases and cls_token
    decay = {id(p) for n, p in model.named_parameters() if p.ndim > 1 and n != "cls_token"}
    for group in opt.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1 and group["lr_scale"] == (10.0 if in_head.pop() else 1.0)
        decayed = group["weight_decay"] == 0.01
        assert all((id(p) in decay) == decayed for p in group["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    sched = WarmupCosineSchedule(opt, base_lr=5e-5, total_steps=10, warmup_steps=2, warmup_lr=1e-6, min_lr=1e-6)
    for _ in range(2):
        sched.step()
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([5e-5, 5e-4])


def test_probes_leave_the_bn_statistics_untouched():
    model = build_model("conformer_small", K, img_size=64, **TINY_MODEL)
    before = {n: b.clone() for n, b in model.named_buffers()}
    assert len(before) > 0
    assert freeze_unused_parameters(model, 64, torch.device("cpu")) == []
    cfg = TrainConfig().replace(model="conformer_small", depth=12, **TINY_MODEL, image_size=64, batch_size=2)
    task = ConformerTask(cfg)
    task.model = model
    fp32_s, bf16_s = task.precision_probe()()
    assert fp32_s > 0 and bf16_s > 0
    for name, buf in model.named_buffers():
        assert torch.equal(buf, before[name]), name
    model(torch.randn(2, 3, 64, 64))  # a train-mode forward does move them (the probes would too, unguarded)
    assert not torch.equal(model.bn1.running_mean, before["bn1.running_mean"])


# ------------------------------------------------------------------------------------------------ runs
def test_train_resume_make_cams_and_analyze_layers(data_root, tmp_path):
    """scripts/train.py picks ConformerTask; a run cut mid AReAM epoch and resumed reproduces the
    uninterrupted losses; make_cams.py writes the infer_conformer.py seeds; analyze_layers.py reads it."""
    train = _load_script("train")
    common = TINY + ["--data-root", data_root, "--no-cams"]
    full = str(tmp_path / "full")
    assert train.main(common + ["--run-dir", full]) == 0
    manifest = json.load(open(os.path.join(full, "manifest.json")))
    assert manifest["task"] == "ConformerTask" and manifest["layer_index"] == 9
    rows = _step_rows(full)
    assert sorted(rows) == [1, 2, 3, 4] and all(r["loss_aff"] > 0 for s, r in rows.items() if s > 2)
    assert all(r["pseudo_ignore_frac"] > 0 for s, r in rows.items() if s > 2)
    assert rows[1]["lr"] == pytest.approx(1e-6)  # warm-up start (base group; heads at 10x)
    cut = str(tmp_path / "cut")
    assert train.main(common + ["--run-dir", cut, "--max-steps", "3"]) == 0
    assert train.main(common + ["--resume", os.path.join(cut, "checkpoint.pth")]) == 0
    resumed = _step_rows(cut)
    for step in rows:
        assert resumed[step]["loss"] == pytest.approx(rows[step]["loss"], abs=1e-6, rel=0), step
    ma = torch.load(os.path.join(full, "checkpoint.pth"), weights_only=False)["model"]
    mb = torch.load(os.path.join(cut, "checkpoint.pth"), weights_only=False)["model"]
    for key in ma:  # BN running statistics included
        torch.testing.assert_close(mb[key].float(), ma[key].float(), rtol=0, atol=1e-6, msg=key)

    ckpt = os.path.join(full, "checkpoint.pth")
    out = str(tmp_path / "cams")
    assert _load_script("make_cams").main(["--checkpoint", ckpt, "--out-dir", out, "--eval"]) == 0
    from aream_fast.data import build_dataset
    from aream_fast.engine.build import load_model_from_checkpoint

    model, _ = load_model_from_checkpoint(ckpt)
    item = build_dataset("synthetic", data_root, "val", train=False, image_size=None)[0]
    keys, cam = conformer_inference_cam(model, item["image"], item["label"])
    written = np.load(os.path.join(out, f"{item['name']}.npy"), allow_pickle=True).item()
    np.testing.assert_array_equal(written["key"], keys)
    np.testing.assert_allclose(written["cam"], cam, rtol=0, atol=1e-6)
    assert 0.0 <= json.load(open(os.path.join(out, "cam_eval.json")))["mIoU"] <= 1.0

    result = _load_script("analyze_layers").main(["--checkpoint", ckpt, "--max-images", "2", "--num-examples", "1",
                                                  "--out", str(tmp_path / "analysis"), "--device", "cpu"])
    assert len(result["tables"][0]["entropy"]) == 12 and "9" in result["summary"]


def test_pseudo_from_forward_run_with_cams(data_root, tmp_path):
    """--pseudo-from-forward (no separate forward) end to end, then the CAM seeds of the finished run."""
    run_dir = str(tmp_path / "fwd")
    assert _load_script("train").main(TINY + ["--data-root", data_root, "--run-dir", run_dir,
                                              "--pseudo-from-forward", "--epochs", "2"]) == 0
    rows = _step_rows(run_dir)
    assert all(np.isfinite(r["loss_aff"]) and r["pseudo_ignore_frac"] > 0 for s, r in rows.items() if s > 2)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["status"] == "finished" and 0.0 <= summary["cam_mIoU"] <= 1.0
    assert len([f for f in os.listdir(os.path.join(run_dir, "cams_val")) if f.endswith(".npy")]) == 4


@pytest.mark.slow
def test_amp_compile_and_torchrun(data_root, tmp_path):
    """The Conformer-S trains like the ViT models under --amp --compile (no recompiles after warm-up; the
    aot_eager backend traces the same graphs as inductor without its minutes of CPU code generation, which
    tests/engine/test_train.py covers for the ViT) and under torchrun with two gloo processes (DDP over its BN
    layers and both branches)."""
    import subprocess
    import sys

    run_dir = str(tmp_path / "compiled")
    assert _load_script("train").main(TINY + ["--data-root", data_root, "--run-dir", run_dir, "--no-cams",
                                              "--amp", "--compile", "--compile-backend", "aot_eager"]) == 0
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["status"] == "finished" and summary["compile_stats"] is not None
    assert summary["compile_stats"]["graphs_after_warmup"] == summary["compile_stats"]["unique_graphs"]
    assert all(np.isfinite(r["loss"]) for r in _step_rows(run_dir).values())
    assert json.load(open(os.path.join(run_dir, "manifest.json")))["precision"] in ("fp32", "bfloat16")

    ddp = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "scripts", "train.py")] + TINY + ["--data-root", data_root, "--run-dir", ddp,
                                                                "--no-cams", "--device", "cpu", "--batch-size", "2"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.load(open(os.path.join(ddp, "manifest.json")))
    assert manifest["world_size"] == 2 and manifest["task"] == "ConformerTask"
    rows = _step_rows(ddp)
    assert sorted(rows) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows.values())
    assert all(r["loss_aff"] > 0 for s, r in rows.items() if s > 2)
