"""Engine pieces that need no model: config, schedule, optimizer groups, checkpoints, RNG, sampling, layer
weights, precision choice, graceful stop, run logging."""
import dataclasses
import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

from aream_fast.engine import checkpoint as ck
from aream_fast.engine.config import OFFICIAL_PRESET, TrainConfig, build_parser, config_from_args
from aream_fast.engine.interrupt import GracefulStop
from aream_fast.analysis.entropy import entropy_to_layer_weights, load_entropy
from aream_fast.models.records import LayerSplit
from aream_fast.engine.optim import build_optimizer, param_groups
from aream_fast.engine.precision import choose_precision
from aream_fast.engine.run_log import RunLogger, write_manifest
from aream_fast.engine.sampling import ResumableBatchSampler, SeededSampleDataset
from aream_fast.engine.schedule import WarmupCosineSchedule


# ------------------------------------------------------------------------------------------------- config
def test_config_defaults_and_official_preset():
    cfg = config_from_args([])
    assert cfg.data.dataset == "synthetic" and cfg.aream.aream and not cfg.precision.amp
    assert LayerSplit.from_depth(12).layer_index == 7  # official 7 of 12
    assert LayerSplit.from_depth(6).layer_index == 4
    off = config_from_args(["--preset", "official", "--data-root", "x"])
    flat = off.flat()
    for key, value in OFFICIAL_PRESET.items():
        assert flat[key] == value, key
    # explicit flags win over the preset
    off2 = config_from_args(["--preset", "official", "--epochs", "20", "--data-root", "x"])
    assert off2.optim.epochs == 20 and off2.optim.batch_size == 64
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # the flat config of checkpoints written before the sections existed
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.flat()))) == cfg


def test_config_file_json_and_toml_under_explicit_flags(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"optim": {"lr": 0.5, "epochs": 7}, "seed": 3}))
    (tmp_path / "c.toml").write_text("[optim]\nlr = 0.25\n[run]\nseed = 5\n")
    cfg = config_from_args(["--config", str(tmp_path / "c.json"), "--seed", "4"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.run.seed) == (0.5, 7, 4)
    cfg = config_from_args(["--config", str(tmp_path / "c.toml")])
    assert (cfg.optim.lr, cfg.run.seed) == (0.25, 5)
    (tmp_path / "bad.json").write_text(json.dumps({"optim": {"nope": 1}}))
    with pytest.raises(SystemExit):
        config_from_args(["--config", str(tmp_path / "bad.json")])


def test_every_field_has_one_flag_and_help():
    parser_flags = {a.dest: a for a in build_parser()._actions}
    for section_cls in TrainConfig.sections().values():
        for f in dataclasses.fields(section_cls):
            assert f.name in parser_flags, f.name
            assert f.metadata.get("help"), f.name


@pytest.mark.parametrize("argv, word", [
    (["--image-size", "100"], "--image-size"),
    (["--epochs", "2", "--cls-epochs", "2"], "--cls-epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--cam-scales", "0"], "--cam-scales"),
])
def test_config_rejects_bad_values(argv, word, capsys):
    with pytest.raises(SystemExit):
        config_from_args(argv)
    assert word in capsys.readouterr().err


def test_layer_index_out_of_range():
    with pytest.raises(ValueError, match="layer_index"):
        LayerSplit.from_depth(6, 6)


# ----------------------------------------------------------------------------------------------- schedule
def test_warmup_cosine_schedule_values_and_state():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
    s = WarmupCosineSchedule(opt, base_lr=1.0, total_steps=10, warmup_steps=2, warmup_lr=0.0, min_lr=0.1)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(9):
        s.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[1] == 0.5 and lrs[2] == 1.0
    expect = [0.1 + 0.45 * (1 + math.cos(math.pi * (t - 2) / 8)) for t in range(2, 10)]
    np.testing.assert_allclose(lrs[2:], expect, rtol=0, atol=1e-12)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # monotone after warm-up
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
    s2 = WarmupCosineSchedule(opt2, base_lr=1.0, total_steps=10, warmup_steps=2, warmup_lr=0.0, min_lr=0.1)
    s2.load_state_dict(s.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    bad = WarmupCosineSchedule(opt2, base_lr=2.0, total_steps=10, warmup_steps=2)
    with pytest.raises(ValueError, match="base_lr"):
        bad.load_state_dict(s.state_dict())


def test_param_groups_no_decay_on_1d_bias_pos_embed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
            self.cls_token = nn.Parameter(torch.zeros(1, 2, 4))
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

    m = M()
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"cls_token", "fc.weight"}  # cls_token decayed (docs/semantics.md, Oddities)
    assert {names[id(p)] for p in no_decay["params"]} == {"pos_embed", "fc.bias", "norm.weight", "norm.bias"}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(m, lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["eps"] == 1e-8


# -------------------------------------------------------------------------------------------- checkpoints
def test_atomic_save_and_load(tmp_path):
    path = str(tmp_path / "sub" / "checkpoint.pth")
    state = {"format": ck.FORMAT_VERSION, "model": {"w": torch.arange(3.0)}, "epoch": 2}
    ck.atomic_save(state, path)
    assert not os.path.exists(path + ".tmp")
    got = ck.load_checkpoint(path)
    assert got["epoch"] == 2 and torch.equal(got["model"]["w"], torch.arange(3.0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.load_checkpoint(str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pth"):
        ck.load_checkpoint(str(tmp_path / "junk.pth"))
    torch.save({"a": 1}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="not an aream-fast"):
        ck.load_checkpoint(str(tmp_path / "foreign.pth"))


def test_rng_state_roundtrip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = ck.capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_find_resume_checkpoint(tmp_path):
    assert ck.find_resume_checkpoint(None, str(tmp_path), "run") is None
    for stamp, t in (("a", 100), ("b", 200)):
        p = tmp_path / "run" / stamp / ck.CHECKPOINT_NAME
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (t, t))
    assert ck.find_resume_checkpoint(None, str(tmp_path), "run").endswith(os.path.join("b", "checkpoint.pth"))
    assert ck.find_resume_checkpoint(str(tmp_path / "run" / "a"), str(tmp_path), "run").endswith(
        os.path.join("a", "checkpoint.pth"))


# ----------------------------------------------------------------------------------------------- sampling
def test_sampler_is_deterministic_resumable_and_sharded():
    s = ResumableBatchSampler(23, 4, seed=3)
    assert len(s) == 5
    s.set_epoch(1)
    full = list(s)
    assert all(len(b) == 4 for b in full) and all(e == 1 for b in full for e, _ in b)
    s.set_epoch(1, start_batch=2)
    assert list(s) == full[2:]
    s.set_epoch(2)
    assert list(s) != full
    r0 = ResumableBatchSampler(23, 4, seed=3, rank=0, world_size=2)
    r1 = ResumableBatchSampler(23, 4, seed=3, rank=1, world_size=2)
    r0.set_epoch(0), r1.set_epoch(0)
    i0 = {i for b in r0 for _, i in b}
    i1 = {i for b in r1 for _, i in b}
    assert not i0 & i1 and len(r0) == len(r1) == 2
    with pytest.raises(ValueError, match="batch-size"):
        ResumableBatchSampler(3, 4, seed=0)


def test_seeded_dataset_is_a_function_of_the_key_and_keeps_global_rng():
    class Rand(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(2), np.random.rand(), random.random()

    ds = SeededSampleDataset(Rand(), seed=5)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = ds[(1, 3)]
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.rand(5), np.random.rand(), random.random()  # disturb the global streams
    b = ds[(1, 3)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    c = ds[(2, 3)]
    assert not torch.equal(a[0], c[0])


# ------------------------------------------------------------------------------------------ layer weights
def test_entropy_layer_weights_npy_and_json(tmp_path):
    ent = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 3.0])
    np.save(tmp_path / "e.npy", ent)
    (tmp_path / "e.json").write_text(json.dumps({"entropy": ent.tolist()}))
    for name in ("e.npy", "e.json"):
        loss_w, refine_w = entropy_to_layer_weights(load_entropy(str(tmp_path / name)), layer_index=4)
        e = (ent - 1.0) / 4.0
        np.testing.assert_allclose(loss_w, e[4:])
        np.testing.assert_allclose(refine_w, 1 - e[:4])
    loss_w, refine_w = entropy_to_layer_weights(ent, layer_index=7 - 2)
    with pytest.raises(ValueError, match="one value per supervised layer"):
        LayerSplit.from_depth(12, 7, loss_weights=loss_w, refine_weights=refine_w)
    (tmp_path / "bad.json").write_text(json.dumps({"foo": [1, 2]}))
    with pytest.raises(ValueError, match="entropy"):
        load_entropy(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=".npy or .json"):
        load_entropy(__file__)


# ------------------------------------------------------------------------------------------------ precision
def test_precision_choice_cpu_is_measured_and_explained():
    p = choose_precision(torch.device("cpu"), amp=False)
    assert p.dtype is None and not p.use_scaler
    state = torch.random.get_rng_state()
    p = choose_precision(torch.device("cpu"), amp=True, width=32)
    assert torch.equal(torch.random.get_rng_state(), state)  # the measurement leaves the RNG alone
    assert p.dtype in (None, torch.bfloat16) and not p.use_scaler
    assert "measured" in p.reason and ("fp32" in p.reason or "bf16" in p.reason)


# ------------------------------------------------------------------------------------------ graceful stop
def test_graceful_stop_sets_flag_and_restores_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.exit_code() == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous


# -------------------------------------------------------------------------------------------------- logging
def test_run_logger_csv_jsonl_and_manifest(tmp_path):
    log = RunLogger(str(tmp_path), use_tensorboard=False)
    log.log_metrics({"step": 1, "loss": 0.5}, step=1)
    log.log_metrics({"step": 2, "loss": 0.4, "loss_aff": torch.tensor(0.1)}, step=2)
    log.info("hello")
    log.close()
    lines = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert lines[0] == "step,loss,loss_aff" and len(lines) == 3
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss_aff"] == pytest.approx(0.1)
    assert "hello" in (tmp_path / "train.log").read_text()
    path = write_manifest(str(tmp_path), TrainConfig().to_dict(), device=torch.device("cpu"), world_size=1,
                          precision="fp32", precision_reason="test")
    man = json.loads(open(path).read())
    assert man["seed"] == 0 and man["versions"]["torch"] == torch.__version__ and man["precision"] == "fp32"


def test_param_groups_follow_the_models_no_weight_decay():
    # MCT models exempt only pos_embed (official; docs/semantics.md, Oddities); single-token ViTs also exempt cls_token (timm).
    from aream_fast import build_model

    for name, exempt in (("mct_deit_small", {"pos_embed"}), ("vit_small", {"pos_embed", "cls_token"})):
        m = build_model(name, 3, img_size=32, embed_dim=16, depth=1, num_heads=2)
        decay, no_decay = param_groups(m, 0.05)
        names = {id(p): n for n, p in m.named_parameters()}
        multi_dim_exempt = {names[id(p)] for p in no_decay["params"] if p.ndim > 1}
        assert multi_dim_exempt == exempt, name
        assert "cls_token" in {names[id(p)] for p in decay["params"]} or "cls_token" in exempt
        wrapped = nn.Sequential()
        wrapped.module = m  # DDP-style wrapper: names gain a "module." prefix
        _, no_decay_w = param_groups(wrapped, 0.05)
        assert {p.ndim > 1 and names[id(p)] for p in no_decay_w["params"]} - {False} == exempt
