"""aream_fast.models: timm parity, DeiT -> MCTformer loading (docs/semantics.md, "Model"), attention export, compile,
errors."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from aream_fast.models import build_model, load_pretrained
from aream_fast.official.model import forward_with_logits
from aream_fast.models.records import AttentionRequest

TINY = dict(embed_dim=48, num_heads=3, depth=4)


def _tiny(name="mct_deit_small", k=5, img_size=64, **kw):
    return build_model(name, k, img_size=img_size, drop_path=0.0, **{**TINY, **kw}).eval()


@pytest.fixture(scope="module")
def vit_small_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit_small.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


@pytest.fixture(scope="module")
def deit_small_ckpt(tmp_path_factory):
    torch.manual_seed(2)
    ref = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "deit_small.pth"
    torch.save({"model": ref.state_dict()}, path)
    return ref.state_dict(), path


@pytest.mark.slow
def test_vit_small_matches_timm_patch_tokens(vit_small_ckpt):
    ref, path = vit_small_ckpt
    model = build_model("vit_small", 20, drop_path=0.0).eval()
    report = load_pretrained(model, path)
    assert report.dropped_keys == ["head.weight", "head.bias"]
    assert sorted(report.missing_keys) == ["head.bias", "head.weight"] and report.unexpected_keys == []
    assert (model.num_prefix_tokens, model.num_heads, model.depth, model.patch_size, model.embed_dim,
            model.num_classes) == (1, 6, 12, 16, 384, 20)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        t = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))
        for blk in ref.blocks:
            t = blk(t)
        ours = model.forward_features(x)
    torch.testing.assert_close(ours, t, rtol=1e-5, atol=1e-5)
    # vit_* heads: final norm applied, 1x1 classifier map on patches, the same classifier on the cls token
    with torch.no_grad():
        out = model(x)
        normed = model.norm(ours)
        m = model.head(normed[:, 1:].transpose(1, 2).reshape(1, 384, 14, 14))
    torch.testing.assert_close(out.patch_logits, m.mean((2, 3)))
    torch.testing.assert_close(out.class_logits, F.linear(normed[:, 0], model.head.weight.flatten(1), model.head.bias))
    torch.testing.assert_close(out.cam, m.relu())


@pytest.mark.slow
def test_deit_small_loads_into_mct_per_spec(deit_small_ckpt):
    sd, path = deit_small_ckpt
    model = build_model("mct_deit_small", 20, pretrained=path)
    assert model.cls_token.shape == (1, 20, 384) and model.pos_embed.shape == (1, 216, 384)
    torch.testing.assert_close(model.cls_token.data, sd["cls_token"].expand(1, 20, 384))
    torch.testing.assert_close(model.pos_embed.data[:, :20], sd["pos_embed"][:, :1].expand(1, 20, 384))
    torch.testing.assert_close(model.pos_embed.data[:, 20:], sd["pos_embed"][:, 1:])
    torch.testing.assert_close(model.blocks[5].attn.qkv.weight.data, sd["blocks.5.attn.qkv.weight"])
    torch.testing.assert_close(model.norm.weight.data, sd["norm.weight"])
    assert model.head.weight.shape == (20, 384, 3, 3)
    # a different training size: the 14x14 patch grid is bicubic-resized (size-based) to 20x20
    big = build_model("mct_deit_small", 20, img_size=320)
    report = load_pretrained(big, path)
    assert "pos_embed" in report.adapted_keys and "cls_token" in report.adapted_keys
    assert sorted(report.missing_keys) == ["head.bias", "head.weight"] and report.unexpected_keys == []
    grid = sd["pos_embed"][:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(20, 20), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(big.pos_embed.data[:, 20:], want.reshape(1, 400, 384))
    torch.testing.assert_close(big.pos_embed.data[:, :20], sd["pos_embed"][:, :1].expand(1, 20, 384))


def test_runtime_pos_embed_interpolation():
    model = _tiny(k=3, img_size=64)  # stored grid 4x4
    pe = model.position_embedding((4, 4))
    assert pe is model.pos_embed
    pe = model.position_embedding((5, 7))
    grid = model.pos_embed[:, 3:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(5.1 / 4, 7.1 / 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pe[:, 3:], want.permute(0, 2, 3, 1).reshape(1, 35, 48))
    torch.testing.assert_close(pe[:, :3], model.pos_embed[:, :3])
    assert model(torch.randn(1, 3, 80, 112)).cam.shape == (1, 3, 5, 7)


def test_mct_heads_follow_spec():
    model = _tiny(k=4)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        tokens = model.forward_features(x)  # final norm NOT applied
        out = model(x)
        m = model.head(tokens[:, 4:].transpose(1, 2).reshape(2, 48, 4, 3))
    torch.testing.assert_close(out.class_logits, tokens[:, :4].mean(-1))
    torch.testing.assert_close(out.patch_logits, m.mean((2, 3)))
    torch.testing.assert_close(out.cam, m.relu())
    assert not out.cam.requires_grad and out.records is None


@pytest.mark.parametrize("name", ["mct_deit_small", "vit_small"])
def test_attention_export_matches_hand_and_eager(name):
    model = _tiny(name, k=5)
    x = torch.randn(2, 3, 48, 64)
    inputs = {}
    hooks = [blk.attn.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
             for i, blk in enumerate(model.blocks)]
    request = AttentionRequest(supervised_layers=(2, 3), refine_layers=(0, 1, 3), class_attention_layers=(0, 2, 3))
    out = model(x, request)
    for h in hooks:
        h.remove()
    rec = out.records
    c = model.num_prefix_tokens
    n, hd = c + 12, 16
    assert sorted(rec.qs) == [0, 1, 2, 3] and rec.grid == (3, 4) and rec.num_prefix_tokens == c
    assert rec.scale == pytest.approx(hd ** -0.5)
    for i in range(4):
        qkv = F.linear(inputs[i], model.blocks[i].attn.qkv.weight, model.blocks[i].attn.qkv.bias)
        q, k, _ = qkv.reshape(2, n, 3, 3, hd).permute(2, 0, 3, 1, 4)
        torch.testing.assert_close(rec.qs[i], q, rtol=0, atol=0)
        torch.testing.assert_close(rec.ks[i], k, rtol=0, atol=0)
        assert rec.qs[i].requires_grad == (i in (2, 3)) and rec.ks[i].requires_grad == (i in (2, 3))
    _, _, _, logits = forward_with_logits(model, x)
    if name == "vit_small":
        assert rec.class_attention is None
    else:
        ref = torch.stack([logits[i].softmax(-1).mean(1)[:, :c, c:] for i in (0, 2, 3)]).mean(0)
        torch.testing.assert_close(rec.class_attention, ref.detach(), rtol=0, atol=1e-6)
        assert not rec.class_attention.requires_grad
    # grads flow from the supervised records only
    model.zero_grad()
    (rec.qs[2].sum() + rec.ks[3].square().sum()).backward()
    assert model.blocks[2].attn.qkv.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None
    assert model.blocks[3].attn.proj.weight.grad is None  # layer 3's output does not feed its own q, k


def test_eager_reference_forward_matches_fused():
    model = _tiny(k=3)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        a = model(x)
        b = forward_with_logits(model, x)
    for u, v in zip(a[:3], b[:3]):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_with_request_matches_eager():
    torch._dynamo.reset()
    model = _tiny(k=3, depth=2)
    x = torch.randn(1, 3, 32, 48)
    request = AttentionRequest(supervised_layers=(1,), refine_layers=(0,), class_attention_layers=(0, 1))
    # fullgraph=True: no graph break in the request path. aot_eager traces forward and autograd like
    # inductor does but skips C++ code generation (inductor on this 2-core CI machine costs ~50 s).
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x, request)
    want = model(x, request)
    for u, v in zip(got[:3], want[:3]):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    for layer in (0, 1):
        torch.testing.assert_close(got.records.qs[layer], want.records.qs[layer], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.records.ks[layer], want.records.ks[layer], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.records.class_attention, want.records.class_attention, rtol=1e-4, atol=1e-6)
    assert got.records.qs[1].requires_grad and not got.records.qs[0].requires_grad


def test_bad_inputs(tmp_path):
    model = _tiny(k=3)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model(torch.randn(1, 3, 64, 60))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="floating"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="refine_layers"):
        model(torch.randn(1, 3, 64, 64), AttentionRequest(refine_layers=(4,)))
    with pytest.raises(ValueError, match="unknown model name 'deit_tiny'"):
        build_model("deit_tiny", 3)
    with pytest.raises(ValueError, match="attention_backend"):
        build_model("vit_small", 3, attention_backend="cudnn", **TINY)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(model, tmp_path / "nope.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_pretrained(model, bad)
    other = tmp_path / "other.pth"
    torch.save({"epoch": 3, "lr": 0.1}, other)
    with pytest.raises(ValueError, match="other.pth"):
        load_pretrained(model, other)
    wrong = tmp_path / "wrong.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(9, 9)}, wrong)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        load_pretrained(model, wrong)


def test_drop_path_is_linear_and_train_mode_is_stochastic():
    model = build_model("mct_deit_small", 3, img_size=32, drop_path=0.3, **TINY)
    rates = [blk.drop_path.drop_prob for blk in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert math.isclose(model.blocks[0].norm1.eps, 1e-6)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.train()
        a, b = model(x).class_logits, model(x).class_logits
        model.eval()
        c, d = model(x).class_logits, model(x).class_logits
    assert not torch.equal(a, b)
    torch.testing.assert_close(c, d, rtol=0, atol=0)
