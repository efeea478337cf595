"""scripts/analyze_layers.py end to end on a tiny checkpoint and a tiny synthetic split, with --compare."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from tests._scripts import load_script



def _script():
    return load_script("scripts/analyze_layers.py", "analyze_layers")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from aream_fast.data import build_dataset, ensure_synthetic
    from aream_fast.engine.build import build_model_from_config
    from aream_fast.engine.config import TrainConfig

    tmp = tmp_path_factory.mktemp("analyze")
    root = str(ensure_synthetic(str(tmp / "syn"), num_train=4, num_val=1, image_size=32, progress=False))
    k = build_dataset("synthetic", root, "train", train=False, image_size=None).num_classes
    cfg = TrainConfig().replace(dataset="synthetic", data_root=root, image_size=32, embed_dim=32, depth=3, num_heads=2,
                                synthetic_train_size=4, synthetic_val_size=1, run_name="tiny-baseline")
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model, k, image_size=32)
    # the TRAIN engine's checkpoint format (aream_fast/engine/checkpoint.py)
    engine_ckpt = str(tmp / "checkpoint.pth")
    torch.save({"format": 1, "model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1, "num_classes": k},
               engine_ckpt)
    torch.manual_seed(1)
    other = build_model_from_config(cfg.model, k, image_size=32)
    with torch.no_grad():  # sharpen attention so the two checkpoints differ visibly
        for blk in other.blocks:
            blk.attn.qkv.weight.mul_(20.0)
    plain_ckpt = str(tmp / "plain.pth")
    torch.save(other.state_dict(), plain_ckpt)
    return {"tmp": tmp, "root": root, "engine": engine_ckpt, "plain": plain_ckpt, "model": model, "k": k}


@pytest.mark.slow
def test_script_end_to_end_with_compare(tiny_setup):
    mod = _script()
    out = str(tiny_setup["tmp"] / "out")
    res = mod.main(["--checkpoint", tiny_setup["engine"], "--compare", tiny_setup["plain"], "--labels", "base",
                    "sharp", "--num-heads", "2", "--max-images", "3", "--num-examples", "1", "--out", out,
                    "--device", "cpu"])
    for rel in ("diagnostics.csv", "layers_curves.png", "summary.txt", "base/entropy.npy", "base/entropy.json",
                "base/diagnostics.json", "base/layers_examples.png", "sharp/entropy.npy",
                "sharp/layers_examples.png"):
        path = os.path.join(out, rel)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, rel
    ent = np.load(os.path.join(out, "base", "entropy.npy"))
    assert ent.shape == (3,) and np.all(np.isfinite(ent)) and np.all(ent <= np.log2(4) + 1e-6)
    with open(os.path.join(out, "base", "diagnostics.json")) as f:
        table = json.load(f)
    assert table["n_images"] == 3 and table["n_entropy_used"] == 3
    assert len(table["diagnostics"]["row_similarity"]["mean"]) == 3
    assert len(table["diagnostics"]["successive_similarity"]["mean"]) == 2
    assert all(v is not None for v in table["diagnostics"]["fg_to_bg"]["mean"])  # synthetic has GT masks
    with open(os.path.join(out, "diagnostics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["base"] * 3 + ["sharp"] * 3
    # sharpened attention is less smooth than the random-init one
    sharp = np.array([float(r["row_entropy"]) for r in rows[3:]])
    base = np.array([float(r["row_entropy"]) for r in rows[:3]])
    assert np.all(sharp < base)
    assert "compare sharp vs base" in res["summary"]
    # the file train.py --layer-weights reads
    from aream_fast.analysis.entropy import load_entropy

    for name in ("entropy.npy", "entropy.json"):
        np.testing.assert_allclose(load_entropy(os.path.join(out, "base", name)), ent)


def test_script_entropy_matches_library_on_first_image(tiny_setup):
    """The script's per-image entropy equals layer_entropies on the same square-resized image."""
    from aream_fast.data import build_dataset
    from aream_fast.analysis.entropy import layer_entropies
    from aream_fast.models.records import AttentionRequest

    mod = _script()
    model, config = mod.load_model(tiny_setup["engine"], torch.device("cpu"))
    torch.testing.assert_close(model.state_dict()["pos_embed"], tiny_setup["model"].state_dict()["pos_embed"])
    ds = build_dataset("synthetic", tiny_setup["root"], "train", train=False, image_size=None)
    res = mod.analyse(model, ds, image_size=32, max_images=1, eps=None, topk_fraction=0.1, rank_max_tokens=64,
                      num_examples=0, device=torch.device("cpu"))
    image, _ = mod.square_item(ds[0], 32)
    with torch.no_grad():
        out = model(image, AttentionRequest(refine_layers=(0, 1, 2)))
    r = out.records
    ref = layer_entropies([r.qs[i] for i in range(3)], [r.ks[i] for i in range(3)], out.cam,
                          torch.as_tensor(ds[0]["label"]), num_prefix_tokens=r.num_prefix_tokens, scale=r.scale)
    np.testing.assert_allclose(res["entropy"].mean(), ref.double().numpy(), atol=1e-6)


def test_load_model_rejects_foreign_files(tmp_path):
    mod = _script()
    bad = tmp_path / "bad.pth"
    torch.save({"weights": [1, 2]}, bad)
    with pytest.raises(ValueError, match="state dict"):
        mod.load_model(str(bad), torch.device("cpu"))
    torch.save({"model": {"foo": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="cls_token"):
        mod.load_model(str(bad), torch.device("cpu"))
    with pytest.raises(FileNotFoundError):
        mod.load_model(str(tmp_path / "missing.pth"), torch.device("cpu"))


def test_script_skips_and_counts_nan_entropy_images(tiny_setup):
    """Huge CAMs make the official log2(p) NaN (softmax underflow): counted and skipped with a warning;
    --eps gives finite values instead."""
    from aream_fast.data import build_dataset

    mod = _script()
    model, _ = mod.load_model(tiny_setup["engine"], torch.device("cpu"))
    with torch.no_grad():
        model.head.weight.mul_(1e6)
        model.head.bias.fill_(1.0)
    ds = build_dataset("synthetic", tiny_setup["root"], "train", train=False, image_size=None)
    kw = dict(image_size=32, max_images=2, topk_fraction=0.1, rank_max_tokens=64, num_examples=0,
              device=torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="not finite"):
        res = mod.analyse(model, ds, eps=None, **kw)
    assert res["entropy"].n_skipped == 2 and res["entropy"].n_used == 0
    table = mod.result_table("x", res)
    assert table["n_entropy_skipped_nan"] == 2 and np.isnan(table["entropy"]).all()
    res = mod.analyse(model, ds, eps=1e-6, **kw)
    assert res["entropy"].n_skipped == 0 and np.all(np.isfinite(res["entropy"].mean()))
