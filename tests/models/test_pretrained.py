"""--pretrained files that fit only partly (issue 15, item 4): refused unless allowed, reported; this project's
own checkpoint.pth loads its model weights; a width mismatch names the flags that fix it. Tiny models."""
import pytest
import torch

from aream_fast.engine.checkpoint import FORMAT_VERSION, atomic_save, capture_rng_state
from aream_fast.models import build_model, load_pretrained


def _tiny(depth=3, embed_dim=32):
    torch.manual_seed(depth * 100 + embed_dim)
    return build_model("mct_deit_small", 3, img_size=32, embed_dim=embed_dim, depth=depth, num_heads=2)


def test_a_file_sharing_one_tensor_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "one.pth"
    torch.save({"norm.weight": torch.full((32,), 2.0)}, path)
    model = _tiny()
    before = model.norm.weight.detach().clone()
    with pytest.raises(ValueError, match=r"loaded 1 of the model's \d+ backbone tensors.*--allow-partial-pretrained"):
        load_pretrained(model, path)
    torch.testing.assert_close(model.norm.weight.detach(), before)  # a refused file leaves the model untouched
    report = load_pretrained(model, path, allow_partial=True)
    assert report.loaded == 1 and report.backbone > 40 and "blocks.0.attn.qkv.weight" in report.missing_keys
    assert torch.all(model.norm.weight == 2.0)
    assert report.as_dict()["loaded"] == 1


def test_a_shallower_checkpoint_is_refused_with_a_depth_hint(tmp_path):
    path = tmp_path / "depth1.pth"
    torch.save({"model": _tiny(depth=1).state_dict()}, path)
    with pytest.raises(ValueError, match=r"1 blocks deep \(the model 3\).*--depth none"):
        build_model("mct_deit_small", 3, img_size=32, embed_dim=32, depth=3, num_heads=2, pretrained=path)
    model = build_model("mct_deit_small", 3, img_size=32, embed_dim=32, depth=3, num_heads=2, pretrained=path,
                        allow_partial_pretrained=True)
    assert model.pretrained_report.loaded < model.pretrained_report.backbone / 2
    # a deeper checkpoint fills the whole backbone: loaded, its extra blocks reported as unexpected
    deep = tmp_path / "depth3.pth"
    torch.save(_tiny(depth=3).state_dict(), deep)
    report = load_pretrained(_tiny(depth=2), deep)
    assert report.loaded == report.backbone and any(k.startswith("blocks.2.") for k in report.unexpected_keys)


def test_a_wider_checkpoint_names_the_size_flags(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(_tiny(depth=2, embed_dim=64).state_dict(), path)
    with pytest.raises(ValueError, match=r"64 wide \(the model 32\).*--embed-dim none --depth none --num-heads none"):
        load_pretrained(_tiny(depth=2), path)


def test_the_projects_own_checkpoint_loads_its_model_weights(tmp_path):
    src = _tiny(depth=2)
    path = str(tmp_path / "checkpoint.pth")
    # the training checkpoint's layout (engine/checkpoint.py): numpy RNG state makes weights_only=True refuse it
    atomic_save({"format": FORMAT_VERSION, "model": src.state_dict(), "rng": capture_rng_state(),
                 "config": {"model": {"depth": 2}}, "num_classes": 3}, path)
    model = _tiny(depth=2)
    report = load_pretrained(model, path)
    assert report.loaded == report.backbone and report.missing_keys == [] and report.unexpected_keys == []
    for key, value in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_other_pickled_objects_still_fail_the_weights_only_load(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _tiny(depth=2).state_dict(), "extra": torch.nn.ReLU()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_pretrained(_tiny(depth=2), path)
