"""Segmentation models: shapes at odd sizes, multi-block features against a plain loop, checkpoint loading
(DeiT/ViT, stage-one MCT, ImageNet ResNet), refusal of segmentation (COCO-with-VOC-labels) weights."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aream_fast import build_model
from aream_fast.stage2 import SEG_MODELS, build_seg_model
from aream_fast.stage2.seg_models import load_seg_model, save_seg_checkpoint

TINY_VIT = dict(embed_dim=32, depth=3, num_heads=2, img_size=64, head_channels=16)
TINY_RESNET = dict(layers=(1, 1, 1, 1))
VIT_NAMES = [n for n in SEG_MODELS if n.startswith("vit_")]
RESNET_NAMES = [n for n in SEG_MODELS if "resnet" in n]


def test_names_and_default():
    assert SEG_MODELS[0] == "vit_small_aspp"
    assert len(set(SEG_MODELS)) == len(SEG_MODELS)
    assert VIT_NAMES and RESNET_NAMES and set(VIT_NAMES) | set(RESNET_NAMES) == set(SEG_MODELS)


@pytest.mark.parametrize("name, hw", [(n, (37, 53)) for n in VIT_NAMES] + [("vit_small_largefov", (17, 16))])
def test_vit_shapes_any_size(name, hw):
    model = build_seg_model(name, 5, **TINY_VIT, feature_layers=(0, 2))
    x = torch.randn(2, 3, *hw, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 5, *hw)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", RESNET_NAMES)
def test_resnet_shapes_any_size(name):
    model = build_seg_model(name, 4, **TINY_RESNET).eval()
    out = model(torch.randn(1, 3, 21, 27))
    assert out.shape == (1, 4, 21, 27)
    # output stride 8: layer4's map of a 64 x 64 image is 8 x 8
    assert model.backbone(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)


def test_vit_features_match_plain_loop():
    """Several blocks feed the head: patch tokens of blocks 0 and 2, each normed, concatenated (slow loop)."""
    model = build_seg_model("vit_small_aspp", 3, **TINY_VIT, feature_layers=(2, 0)).eval()
    x = torch.randn(1, 3, 48, 32)
    bb = model.backbone
    tok, grid = bb.embed(x)
    per_block = []
    for blk in bb.blocks:
        tok = blk(tok, 1, False)[0]
        per_block.append(tok[:, 1:])
    maps = [model.feature_norms["0"](per_block[0]), bb.norm(per_block[2])]
    ref = torch.cat([m.transpose(1, 2).reshape(1, -1, *grid) for m in maps], dim=1)
    torch.testing.assert_close(model.features(x), ref)
    ref_logits = F.interpolate(model.head(ref), size=(48, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model(x), ref_logits)


def test_vit_padding_crops_back():
    """A 37 x 53 image runs as its zero-padded 48 x 64 version; the logits are cropped, not resized."""
    model = build_seg_model("vit_small_largefov", 3, **TINY_VIT).eval()
    x = torch.randn(1, 3, 37, 53)
    padded = model(F.pad(x, (0, 11, 0, 11)))
    torch.testing.assert_close(model(x), padded[..., :37, :53])


@pytest.mark.parametrize("kwargs, match", [
    (dict(feature_layers=(3,)), "feature_layers"), (dict(feature_layers=()), "feature_layers"),
    (dict(bogus=1), "unknown keyword"),
])
def test_vit_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_seg_model("vit_small_largefov", 3, **{**TINY_VIT, **kwargs})


def test_unknown_name_and_classes():
    with pytest.raises(ValueError, match="unknown segmentation model"):
        build_seg_model("unet", 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_seg_model("vit_small_largefov", 1, **TINY_VIT)
    with pytest.raises(ValueError, match="\\(B, 3, H, W\\)"):
        build_seg_model("vit_small_largefov", 3, **TINY_VIT)(torch.randn(3, 16, 16))


def _arch():
    return {k: TINY_VIT[k] for k in ("embed_dim", "depth", "num_heads")}


def test_load_deit_checkpoint(tmp_path):
    """A timm-keyed ViT file (224 grid, 1000-way head) loads into the backbone; the grid is resized."""
    src = build_model("vit_small", 1000, img_size=32, **_arch())
    state = src.state_dict()
    state["head.weight"] = torch.randn(1000, 32)  # a timm Linear head: dropped
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": state}, path)
    model = build_seg_model("vit_small_largefov", 4, pretrained=path, **TINY_VIT)
    own = model.backbone.state_dict()
    for key in ("blocks.1.attn.qkv.weight", "patch_embed.proj.weight", "norm.weight", "cls_token"):
        torch.testing.assert_close(own[key], state[key])
    assert own["pos_embed"].shape[1] == 1 + 16  # 64 / 16 = 4 x 4 grid, resized from 2 x 2
    assert "pos_embed" in model.pretrained_report["adapted_keys"]


def test_load_stage_one_mct_checkpoint(tmp_path):
    """A stage-one training checkpoint ({"format": 1, "model": ..., RNG state}) of an MCT model: its C class
    tokens (and their position slots) are averaged into the one cls token."""
    src = build_model("mct_deit_small", 3, img_size=64, **_arch())
    state = src.state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"format": 1, "model": state, "rng": {"numpy": np.random.get_state()}}, path)
    model = build_seg_model("vit_small_largefov", 4, pretrained=path, **TINY_VIT)
    own = model.backbone.state_dict()
    torch.testing.assert_close(own["cls_token"], state["cls_token"].mean(1, keepdim=True))
    torch.testing.assert_close(own["pos_embed"][:, 0], state["pos_embed"][:, :3].mean(1))
    torch.testing.assert_close(own["pos_embed"][:, 1:], state["pos_embed"][:, 3:])
    torch.testing.assert_close(own["blocks.2.mlp.fc1.weight"], state["blocks.2.mlp.fc1.weight"])


def test_vit_wrong_architecture_refused(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(build_model("vit_small", 5, img_size=64, embed_dim=32, depth=2, num_heads=2).state_dict(), path)
    with pytest.raises(ValueError, match="lacks ViT parameters"):
        build_seg_model("vit_small_largefov", 4, pretrained=path, **TINY_VIT)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_seg_model("vit_small_largefov", 4, pretrained=tmp_path / "nope.pth", **TINY_VIT)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        build_seg_model("vit_small_largefov", 4, pretrained=junk, **TINY_VIT)


def _imagenet_resnet_state():
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1]).state_dict()  # with fc.weight / fc.bias (1000 classes)


def test_load_imagenet_resnet(tmp_path):
    state = _imagenet_resnet_state()
    path = tmp_path / "resnet101-63fe2227.pth"
    torch.save(state, path)
    model = build_seg_model("deeplabv2_resnet101", 21, pretrained=path, **TINY_RESNET)
    own = model.backbone.state_dict()
    for key in ("conv1.weight", "layer3.0.conv2.weight", "layer4.0.bn3.running_mean"):
        torch.testing.assert_close(own[key], state[key])


@pytest.mark.parametrize("file_name, extra", [
    ("deeplabv3_resnet101_coco-586e9e4e.pth", None),  # torchvision COCO_WITH_VOC_LABELS_V1 file name
    ("deeplabv1_resnet101-coco.pth", None),           # deeplab-pytorch's COCO init
    ("weights.pth", "classifier"),                    # a renamed torchvision segmentation state dict
    ("weights.pth", "aux_classifier"),
])
def test_coco_voc_segmentation_weights_refused(tmp_path, file_name, extra):
    state = _imagenet_resnet_state()
    if extra is not None:  # torchvision segmentation layout: backbone.* + classifier.* (21 VOC classes)
        state = {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}
        state[f"{extra}.4.weight"] = torch.zeros(21, 256, 1, 1)
    path = tmp_path / file_name
    torch.save(state, path)
    with pytest.raises(ValueError, match="COCO_WITH_VOC_LABELS"):
        build_seg_model("deeplabv3_resnet101", 21, pretrained=path, **TINY_RESNET)


def test_resnet_wrong_keys_refused(tmp_path):
    path = tmp_path / "resnet50.pth"
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.save(ResNet(Bottleneck, [1, 1, 2, 1]).state_dict(), path)
    with pytest.raises(ValueError, match="not an ImageNet ResNet-101"):
        build_seg_model("deeplabv2_resnet101", 21, pretrained=path, **TINY_RESNET)


@pytest.mark.parametrize("name, kwargs", [("vit_small_aspp", {**TINY_VIT, "feature_layers": (1, 2)}),
                                          ("deeplabv2_resnet101", TINY_RESNET)])
def test_checkpoint_round_trip(tmp_path, name, kwargs):
    model = build_seg_model(name, 3, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # differ from a fresh init
    path = tmp_path / "seg.pth"
    save_seg_checkpoint(path, model, step=7)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["seg_model"]["name"] == name and ckpt["seg_model"]["num_classes"] == 3 and ckpt["step"] == 7
    loaded = load_seg_model(path)
    assert not loaded.training
    x = torch.randn(1, 3, 40, 24)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_load_seg_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_seg_model(tmp_path / "missing.pth")
    bad = tmp_path / "plain.pth"
    torch.save({"model": {}}, bad)
    with pytest.raises(ValueError, match="not a segmentation checkpoint"):
        load_seg_model(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_seg_model(junk)
    model = build_seg_model("vit_small_largefov", 3, **TINY_VIT)
    path = tmp_path / "seg.pth"
    save_seg_checkpoint(path, model)
    ckpt = torch.load(path, weights_only=False)
    ckpt["seg_model"]["num_classes"] = 4
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="does not fit"):
        load_seg_model(path)
