"""Conformer (TransCAM-style AReAM, docs/semantics.md, "Conformer", "CAM refinement", "Inference CAMs", "Training
details") against the official-style eager Conformer.

``aream_fast.official.conformer.OfficialConformer`` is built with the official stage loops and materialises
every layer's (B, H, N, N) logits; the fast ``Conformer`` gets the same weights (``from_model``). The models are
tiny (4 stem channels, embed 16, 2 heads, 12 layers) so the whole file runs in a few seconds on 2 CPU cores.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aream_fast import PAR, AttentionRequest, aream_loss, build_model, load_pretrained
from aream_fast.official.loss import official_seg_to_aff
from aream_fast.official.pseudo_labels import OfficialPAR
from aream_fast.pseudo_labels.conformer import (CONFORMER_TRAINING, apply_crop_box, conformer_inference_cam,
                                       conformer_layers, conformer_lr_schedule, conformer_param_groups,
                                       conformer_patch_labels, conformer_pseudo_label_cams,
                                       crop_box_patch_mask)
from aream_fast.data.conformer_transforms import conformer_random_crop
from aream_fast.models.conformer import Conformer
from aream_fast.official.conformer import (OfficialConformer, official_apply_img_box,
                                           official_conformer_gen_msf_cam, official_conformer_inference_cam,
                                           official_conformer_pseudo_affinity)
from aream_fast.official.loss import patch_labels_to_affinity

K = 5
TINY = dict(base_channel=4, channel_ratio=1, embed_dim=16, num_heads=2)
SUPERVISED, REFINE = conformer_layers(12, 9)
SHAPES = [(64, 64), (64, 96)]  # square and non-square; x0.5 and x1.5 stay multiples of 16


def tiny_pair(drop_path: float = 0.0, dtype=torch.float64):
    model = build_model("conformer_small", K, drop_path=drop_path, **TINY).to(dtype)
    return model, OfficialConformer.from_model(model)


def labels_for(b: int) -> torch.Tensor:
    labels = torch.zeros(b, K)
    labels[0, [1, 3]] = 1
    labels[1:, 2] = 1
    return labels


def test_state_dict_is_the_official_conformer_s_layout():
    with torch.device("meta"):
        model = build_model("conformer_small", 1000)
    state = model.state_dict()
    # Conformer-S has 37.7 M parameters with its ImageNet heads (Peng et al., Conformer, ICCV 2021, Table 1)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 37.7
    assert state["cnn_head.weight"].shape == (1000, 1024, 1, 1)
    assert state["att_head.weight"].shape == (1000, 384)
    assert state["trans_patch_conv.weight"].shape == (384, 64, 4, 4)
    assert state["conv_trans_12.fusion_block.residual_conv.weight"].shape == (1024, 1024, 1, 1)  # last fusion
    assert state["conv_trans_9.cnn_block.residual_conv.weight"].shape == (1024, 512, 1, 1)
    assert state["conv_trans_4.trans_block.attn.qkv.bias"].shape == (3 * 384,)
    assert "pos_embed" not in state and state["cls_token"].shape == (1, 1, 384)
    assert {k.split(".")[0] for k in state} == ({"cls_token", "trans_norm", "cnn_head", "att_head", "conv1", "bn1",
                                                 "conv_1", "trans_patch_conv", "trans_1"}
                                                | {f"conv_trans_{i}" for i in range(2, 13)})
    with torch.device("meta"):
        official = OfficialConformer(1000)
    assert {k: v.shape for k, v in official.state_dict().items()} == {k: v.shape for k, v in state.items()}


@pytest.mark.parametrize("hw", SHAPES)
@pytest.mark.parametrize("train", [True, False])
def test_forward_matches_official(hw, train):
    model, ref = tiny_pair()
    model.train(train)
    ref.train(train)
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    out = model(x, AttentionRequest(supervised_layers=SUPERVISED, refine_layers=REFINE))
    cnn_logits, att_logits, cam, z = ref(x)
    torch.testing.assert_close(out.class_logits, att_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.patch_logits, cnn_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.cam, cam, rtol=0, atol=1e-10)
    assert not out.cam.requires_grad and bool((out.cam < 0).any())  # detached, not ReLU'd
    rec = out.records
    assert rec.num_prefix_tokens == 1 and rec.class_attention is None and rec.grid == (hw[0] // 16, hw[1] // 16)
    assert sorted(rec.qs) == list(range(12))
    for layer in range(12):
        assert rec.qs[layer].requires_grad == (layer in SUPERVISED)
        torch.testing.assert_close(rec.scale * rec.qs[layer] @ rec.ks[layer].transpose(-1, -2), z[layer],
                                   rtol=0, atol=1e-10)
    if train:  # BN batch statistics were updated identically
        torch.testing.assert_close(model.conv_trans_9.cnn_block.bn2.running_var,
                                   ref.conv_trans_9.cnn_block.bn2.running_var)
    assert model(x).records is None


@pytest.mark.parametrize("hw", SHAPES)
def test_pseudo_label_cams_match_official(hw):
    model, ref = tiny_pair()  # train mode, as the official pseudo-label pass
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    labels = labels_for(2)
    ours = conformer_pseudo_label_cams(model, x, labels)
    theirs = official_conformer_gen_msf_cam(ref, x, layer_index=9) * labels[:, :, None, None]
    assert ours.shape == (2, K, *hw)
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=1e-5)
    # 'E' weights 1 - e_l on layers 0..8
    ent = torch.rand(12, dtype=torch.float64)
    ours = conformer_pseudo_label_cams(model, x, labels, refine_weights=(1 - ent[:9]).tolist())
    theirs = official_conformer_gen_msf_cam(ref, x, layer_index=9, ent_weights=ent) * labels[:, :, None, None]
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=1e-5)
    # the three multi-scale passes updated BN running statistics the same way
    torch.testing.assert_close(model.bn1.running_mean, ref.bn1.running_mean)


@pytest.mark.parametrize("hw", SHAPES)
def test_patch_labels_and_loss_match_official(hw):
    model, ref = tiny_pair()
    torch.manual_seed(3)
    x = torch.randn(3, 3, *hw, dtype=torch.float64)
    labels = labels_for(3)
    img_box = torch.tensor([[0, hw[0], 0, hw[1]], [8, hw[0], 0, hw[1] - 20], [0, 40, 17, hw[1]]])
    patch_labels = conformer_patch_labels(model, x, labels, par=PAR(), img_box=img_box)
    seg, aff = official_conformer_pseudo_affinity(ref, x, labels, par=OfficialPAR(), img_box=img_box)
    assert torch.equal(patch_labels_to_affinity(patch_labels), aff)
    assert bool((patch_labels == 255).any()) and bool((patch_labels != 255).any())
    # training step: L = MLSM(cnn) + MLSM(att) + 0.1 L_aff(layers 9..11), gradients into both models
    out = model(x, AttentionRequest(supervised_layers=SUPERVISED))
    rec = out.records
    loss_ours = (torch.nn.functional.multilabel_soft_margin_loss(out.class_logits, labels.double())
                 + torch.nn.functional.multilabel_soft_margin_loss(out.patch_logits, labels.double())
                 + 0.1 * aream_loss([rec.qs[l] for l in SUPERVISED], [rec.ks[l] for l in SUPERVISED], patch_labels,
                                    scale=rec.scale, num_prefix_tokens=1))
    from aream_fast.official.conformer import official_conformer_training_step

    terms = official_conformer_training_step(ref, x, labels.double(), par=OfficialPAR(), aff=aff)
    loss_ours.backward()
    torch.testing.assert_close(loss_ours.detach(), terms["loss"], rtol=0, atol=1e-10)
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-7, atol=1e-10, msg=name)
    assert model.conv1.weight.grad.abs().sum() > 0 and model.trans_1.attn.qkv.weight.grad.abs().sum() > 0


def test_aream_gradient_reaches_the_supervised_layers_only_through_q_k():
    model, _ = tiny_pair()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out = model(x, AttentionRequest(supervised_layers=SUPERVISED, refine_layers=REFINE))
    rec = out.records
    patch_labels = torch.tensor([[1, 1, 0, 0] * 4, [0, 3, 3, 255] * 4])
    loss = aream_loss([rec.qs[l] for l in SUPERVISED], [rec.ks[l] for l in SUPERVISED], patch_labels,
                      scale=rec.scale, num_prefix_tokens=1)
    loss.backward()
    assert model.conv_trans_12.trans_block.attn.qkv.weight.grad.abs().sum() > 0
    assert model.conv1.weight.grad.abs().sum() > 0  # through the tokens of the shared trunk
    assert model.cnn_head.weight.grad is None and model.att_head.weight.grad is None  # heads are after layer 11


@pytest.mark.parametrize("hw", [(40, 56), (64, 96)])
def test_inference_cam_matches_official(hw):
    model, ref = tiny_pair()
    image = torch.randn(3, *hw, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0, 1.0])
    keys, cam = conformer_inference_cam(model, image, labels)
    keys_ref, cam_ref = official_conformer_inference_cam(ref, image, labels)
    assert model.training  # mode restored
    np.testing.assert_array_equal(keys, keys_ref)
    assert cam.shape == (2, *hw) and cam.dtype == np.float32
    np.testing.assert_allclose(cam, cam_ref, rtol=0, atol=1e-5)
    keys, cam = conformer_inference_cam(model, image, torch.zeros(K))
    assert keys.shape == (0,) and cam.shape == (0, *hw)


def test_crop_box_rule_equals_official_box_then_seg_to_aff():
    seg = torch.randint(0, 4, (2, 32, 48))
    box = torch.tensor([[0, 20, 16, 48], [5, 32, 0, 33]])
    mask = crop_box_patch_mask(box, (32, 48))
    # sampled pixels rows (0, 16), cols (0, 16, 32): image 0 keeps rows 0..19, cols 16..47
    assert mask[0].view(2, 3).tolist() == [[False, True, True], [False, True, True]]
    assert mask[1].view(2, 3).tolist() == [[False, False, False], [True, True, True]]
    patch = seg[:, ::16, ::16].reshape(2, -1)
    ours = apply_crop_box(patch, box, (32, 48))
    assert torch.equal(patch_labels_to_affinity(ours), official_seg_to_aff(official_apply_img_box(seg, box)))
    assert apply_crop_box(patch, None, (32, 48)) is patch
    with pytest.raises(ValueError, match="img_box"):
        apply_crop_box(patch, torch.tensor([[0, 40, 0, 48], [0, 32, 0, 48]]), (32, 48))
    with pytest.raises(ValueError, match="img_box"):
        apply_crop_box(patch, torch.tensor([[0.0, 32, 0, 48], [0, 32, 0, 48]]), (32, 48))
    with pytest.raises(ValueError, match="img_box"):
        apply_crop_box(patch, box[:1], (32, 48))


@pytest.mark.parametrize("hw", [(20, 50), (40, 40), (16, 16)])
def test_random_crop_box_marks_the_image_pixels(hw):
    for _ in range(5):
        crop, box = conformer_random_crop(torch.rand(3, *hw) + 0.5, crop_size=32)  # image pixels > 0, pad = 0
        assert crop.shape == (3, 32, 32)
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[box[0]:box[1], box[2]:box[3]] = True
        assert torch.equal(crop[0] > 0, inside)
    with pytest.raises(ValueError, match="crop_size"):
        conformer_random_crop(torch.rand(3, 8, 8), crop_size=0)


# ------------------------------------------------------------------------------------------------------------
# Loading an official-layout checkpoint
# ------------------------------------------------------------------------------------------------------------


def imagenet_checkpoint(model: Conformer) -> dict:
    """A synthetic ImageNet Conformer checkpoint: the model's keys with random values, 1000-class heads
    under the ImageNet names (conv_cls_head, trans_cls_head)."""
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v.clone()
             for k, v in model.state_dict().items() if "head" not in k}
    width = model.cnn_head.in_channels
    state.update({"conv_cls_head.weight": torch.randn(1000, width), "conv_cls_head.bias": torch.randn(1000),
                  "trans_cls_head.weight": torch.randn(1000, model.embed_dim),
                  "trans_cls_head.bias": torch.randn(1000)})
    return state


def test_load_pretrained_official_layout(tmp_path):
    model = build_model("conformer_small", K, **TINY)
    state = imagenet_checkpoint(model)
    path = tmp_path / "conformer_sm.pth"
    torch.save(state, path)
    head_before = model.cnn_head.weight.clone()
    report = load_pretrained(model, path)
    assert sorted(report.dropped_keys) == sorted(k for k in state if "head" in k)
    assert sorted(report.missing_keys) == ["att_head.bias", "att_head.weight", "cnn_head.bias", "cnn_head.weight"]
    assert report.unexpected_keys == []
    torch.testing.assert_close(model.conv_trans_7.squeeze_block.conv_project.weight,
                               state["conv_trans_7.squeeze_block.conv_project.weight"])
    torch.testing.assert_close(model.trans_1.attn.qkv.weight, state["trans_1.attn.qkv.weight"])
    assert torch.equal(model.cnn_head.weight, head_before)
    # through build_model, with the state dict under "model"
    torch.save({"model": state}, tmp_path / "wrapped.pth")
    built = build_model("conformer_small", K, pretrained=tmp_path / "wrapped.pth", **TINY)
    torch.testing.assert_close(built.cls_token, state["cls_token"])


def test_load_pretrained_partial_and_bad_files(tmp_path):
    model = build_model("conformer_small", K, **TINY)
    state = imagenet_checkpoint(model)
    partial = {k: v for k, v in state.items() if not k.startswith("conv_trans_12.")}
    torch.save(partial, tmp_path / "partial.pth")
    report = load_pretrained(model, tmp_path / "partial.pth")
    assert report.missing_keys and all(k.startswith(("conv_trans_12.", "cnn_head", "att_head"))
                                       for k in report.missing_keys)
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_pretrained(model, tmp_path / "corrupt.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_pretrained(model, tmp_path / "absent.pth")
    wider = build_model("conformer_small", K, **{**TINY, "embed_dim": 32})
    torch.save(wider.state_dict(), tmp_path / "wider.pth")
    with pytest.raises(ValueError, match="wrong Conformer architecture"):
        load_pretrained(model, tmp_path / "wider.pth")
    deit = build_model("vit_small", K, img_size=32, embed_dim=16, depth=2, num_heads=2)
    torch.save(deit.state_dict(), tmp_path / "deit.pth")
    with pytest.raises(ValueError, match="not a Conformer checkpoint"):
        load_pretrained(model, tmp_path / "deit.pth")


# ------------------------------------------------------------------------------------------------------------
# Input checks, optimiser and schedule
# ------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise():
    model = build_model("conformer_small", K, **TINY)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model(torch.randn(1, 3, 40, 64))
    with pytest.raises(ValueError, match="floating"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="supervised_layers"):
        model(torch.randn(1, 3, 32, 32), AttentionRequest(supervised_layers=(12,)))
    with pytest.raises(ValueError, match="unknown keyword"):
        build_model("conformer_small", K, patch_size=32)
    with pytest.raises(ValueError, match="img_size"):
        build_model("conformer_small", K, img_size=380, **TINY)
    assert build_model("conformer_small", K, img_size=(384, 256), **TINY).img_size == (384, 256)
    with pytest.raises(ValueError, match="depth"):
        build_model("conformer_small", K, **{**TINY, "depth": 10})
    with pytest.raises(ValueError, match="layer_index"):
        conformer_layers(12, 12)


def test_param_groups_follow_the_official_rule():
    model = build_model("conformer_small", K, **TINY)
    groups = conformer_param_groups(model, weight_decay=0.01, lr_scale=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    got = [sorted(names[id(p)] for p in g["params"]) for g in groups]
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.01), (1.0, 0.0), (10.0, 0.01), (10.0, 0.0)]
    assert got[2] == ["att_head.weight", "cnn_head.weight"] and got[3] == ["att_head.bias", "cnn_head.bias"]
    assert "cls_token" in got[1] and "trans_1.norm1.weight" in got[1] and "conv1.weight" in got[0]
    assert sum(map(len, got)) == len(names)


def test_lr_schedule_is_the_official_cosine():
    lrs = conformer_lr_schedule(5e-5, start_lr=1e-6, final_lr=1e-6, total_steps=30, warmup_steps=10)
    assert lrs.shape == (30,) and lrs[0] == 1e-6 and lrs[9] == 5e-5 and lrs[10] == 5e-5
    assert math.isclose(lrs[20], 1e-6 + 0.5 * (5e-5 - 1e-6) * (1 + math.cos(math.pi * 10 / 20)))
    assert np.all(np.diff(lrs[10:]) < 0) and lrs[-1] > 1e-6
    assert CONFORMER_TRAINING["layer_index"] == 9 and CONFORMER_TRAINING["pseudo_scales"] == (0.5, 1.0, 1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        conformer_lr_schedule(5e-5, total_steps=10, warmup_steps=10)


# ------------------------------------------------------------------------------------------------------------
# Trainer paths: deferred loss gradients, pseudo labels from the training forward, a short training run
# ------------------------------------------------------------------------------------------------------------


def test_deferred_loss_grad_equals_direct():
    from aream_fast import DeferredGrads, deferred_aream_loss

    model, _ = tiny_pair()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    patch_labels = torch.randint(0, 3, (2, 24))
    patch_labels[0, :5] = 255
    grads = []
    for defer in (False, True):
        model.zero_grad()
        deferred = DeferredGrads() if defer else None
        out = model(x, AttentionRequest(supervised_layers=SUPERVISED), qk_hook=deferred.attach if defer else None)
        rec = out.records
        if defer:
            loss = deferred_aream_loss(deferred, patch_labels, scale=rec.scale, num_prefix_tokens=1)
        else:
            loss = aream_loss([rec.qs[l] for l in SUPERVISED], [rec.ks[l] for l in SUPERVISED], patch_labels,
                              scale=rec.scale, num_prefix_tokens=1)
        (loss + out.class_logits.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-7, atol=1e-12, msg=name)


def test_cams_from_training_forward_match_dense():
    from aream_fast import cams_from_output

    model, ref = tiny_pair()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    labels = labels_for(2)
    model.eval()
    ref.eval()
    out = model(x, AttentionRequest(supervised_layers=SUPERVISED, refine_layers=REFINE))
    ours = cams_from_output(out, labels, (64, 96), refine_layers=REFINE)
    _, _, cam, z = ref(x)
    r = z[:9].softmax(-1).mean(2).mean(0)[:, 1:, 1:]  # (B, P, P) dense, as the official refinement
    dense = torch.einsum("bmn,bkn->bkm", r, cam.flatten(2)).reshape(cam.shape)
    dense = torch.nn.functional.interpolate(dense, size=(64, 96), mode="bilinear", align_corners=False).relu()
    dense = dense - dense.amin(dim=(2, 3), keepdim=True)
    dense = dense / (dense.amax(dim=(2, 3), keepdim=True) + 1e-6) * labels[:, :, None, None]
    torch.testing.assert_close(ours.double(), dense, rtol=0, atol=1e-5)


def test_short_training_run_end_to_end():
    """Three official-style steps (1 classification-only, then 2 with AReAM) with the official optimiser groups
    and per-step schedule: finite losses, every trainable parameter updated, heads at 10x the lr."""
    model, _ = tiny_pair(drop_path=0.1, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(conformer_param_groups(model), lr=5e-5)
    lrs = conformer_lr_schedule(5e-5, total_steps=3, warmup_steps=1)
    par = PAR()
    x = torch.randn(2, 3, 64, 64)
    labels = labels_for(2)
    box = torch.tensor([[0, 64, 0, 48], [0, 64, 0, 64]])
    for step, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        aream = step >= 1  # cls_epochs
        patch_labels = conformer_patch_labels(model, x, labels, par=par, img_box=box) if aream else None
        out = model(x, AttentionRequest(supervised_layers=SUPERVISED) if aream else None)
        loss = (torch.nn.functional.multilabel_soft_margin_loss(out.class_logits, labels)
                + torch.nn.functional.multilabel_soft_margin_loss(out.patch_logits, labels))
        if aream:
            rec = out.records
            loss = loss + 0.1 * aream_loss([rec.qs[l] for l in SUPERVISED], [rec.ks[l] for l in SUPERVISED],
                                           patch_labels, scale=rec.scale, num_prefix_tokens=1)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert optimizer.param_groups[2]["lr"] == pytest.approx(10 * lrs[-1])
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
