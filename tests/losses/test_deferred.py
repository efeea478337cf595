"""deferred_aream_loss (gradients made in each supervised layer's backward) against the official-formulation
reference and aream_loss: values, gradients, edge cases, the model path, and WHEN the gradients are made."""
import pytest
import torch

import aream_fast.losses.deferred as loss_deferred
from aream_fast.losses.aream import aream_loss
from aream_fast.losses.deferred import DeferredGrads, deferred_aream_loss
from aream_fast.models import build_model
from aream_fast.models.records import AttentionRequest
from aream_fast.official.loss import aream_loss_reference
from tests._qk_inputs import make_inputs


def deferred_with_downstream(qs, ks, labels, *, prefix, layer_weights=None, coef=1.0, first_layer=3):
    """Attach every layer, use the returned q, k downstream (as attention would) and return
    (coef * loss + downstream, loss)."""
    grads = DeferredGrads()
    downstream = 0.0
    for i, (q, k) in enumerate(zip(qs, ks)):
        q2, k2 = grads.attach(first_layer + i, q, k)
        downstream = downstream + (q2.sin() * k2).sum() * 1e-3  # a gradient arrives from the "attention" too
    loss = deferred_aream_loss(grads, labels, scale=qs[0].shape[-1] ** -0.5, num_prefix_tokens=prefix,
                               layer_weights=layer_weights)
    return coef * loss + downstream, loss


def reference_total(qs, ks, labels, *, prefix, layer_weights=None, coef=1.0):
    scale = qs[0].shape[-1] ** -0.5
    logits = [(q @ k.transpose(-2, -1)) * scale for q, k in zip(qs, ks)]
    ref = aream_loss_reference(logits, labels, num_prefix_tokens=prefix, layer_weights=layer_weights)
    downstream = sum((q.sin() * k).sum() * 1e-3 for q, k in zip(qs, ks))
    return coef * ref + downstream, ref


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("prefix,patches", [(1, 6), (0, 17), (1, 196), (20, 17), (1, 7)])
def test_values_and_gradients_match_reference(prefix, patches):
    qs, ks, labels = make_inputs(2, 3, prefix, patches, 8, 2, seed=prefix * 100 + patches)
    total, loss = deferred_with_downstream(qs, ks, labels, prefix=prefix, coef=0.7)
    grads = torch.autograd.grad(total, qs + ks)
    ref_total, ref = reference_total(qs, ks, labels, prefix=prefix, coef=0.7)
    ref_grads = torch.autograd.grad(ref_total, qs + ks)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for g, rg in zip(grads, ref_grads):
        assert g.shape == rg.shape and rel_err(g, rg) <= 1e-5


def test_layer_weights_and_loss_only_backward():
    qs, ks, labels = make_inputs(2, 2, 1, 17, 4, 3, seed=4)
    weights = [0.3, 0.0, 1.0]
    grads = DeferredGrads()
    for i, (q, k) in enumerate(zip(qs, ks)):
        grads.attach(i, q, k)  # q, k used by nothing else: the anchors alone drive the backward
    loss = deferred_aream_loss(grads, labels, scale=0.5, num_prefix_tokens=1, layer_weights=weights)
    got = torch.autograd.grad(2.0 * loss, qs + ks)
    want_loss = aream_loss(qs, ks, labels, scale=0.5, num_prefix_tokens=1, layer_weights=weights)
    want = torch.autograd.grad(2.0 * want_loss, qs + ks)
    assert abs(loss.item() - want_loss.item()) <= 1e-6 * abs(want_loss.item())
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-6
    assert torch.count_nonzero(got[1]) == 0 and torch.count_nonzero(got[4]) == 0  # weight 0 -> no gradient


def test_float64_gradcheck():
    qs, ks, labels = make_inputs(2, 2, 1, 5, 3, 2, dtype=torch.float64, seed=7)

    def fn(*tensors):
        q_list, k_list = list(tensors[:2]), list(tensors[2:])
        return deferred_with_downstream(q_list, k_list, labels, prefix=1, layer_weights=[0.4, 1.2])[0]

    assert torch.autograd.gradcheck(fn, tuple(qs + ks), eps=1e-6, atol=1e-7)


def test_all_ignored_and_one_class():
    qs, ks, labels = make_inputs(2, 2, 1, 17, 4, 2, ignore_frac=1.0)
    grads = DeferredGrads()
    for i, (q, k) in enumerate(zip(qs, ks)):
        grads.attach(i, q, k)
    loss = deferred_aream_loss(grads, labels, scale=0.5, num_prefix_tokens=1)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(loss, qs + ks))

    qs, ks, _ = make_inputs(2, 2, 1, 17, 4, 2, seed=3)
    one_class = torch.full((2, 17), 2)
    one_class[0, :4] = 255
    total, loss = deferred_with_downstream(qs, ks, one_class, prefix=1)
    ref_total, ref = reference_total(qs, ks, one_class, prefix=1)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for g, rg in zip(torch.autograd.grad(total, qs + ks), torch.autograd.grad(ref_total, qs + ks)):
        assert rel_err(g, rg) <= 1e-5


def test_unused_loss_and_no_grad_leave_gradients_alone():
    qs, ks, labels = make_inputs(2, 2, 1, 7, 4, 1)
    grads = DeferredGrads()
    q2, k2 = grads.attach(0, qs[0], ks[0])
    # the loss is never built: the identity node must pass the downstream gradients through unchanged
    gq, gk = torch.autograd.grad((q2 * 3).sum() + (k2 * 2).sum(), (qs[0], ks[0]))
    assert torch.equal(gq, torch.full_like(gq, 3.0)) and torch.equal(gk, torch.full_like(gk, 2.0))
    with torch.no_grad():
        grads = DeferredGrads()
        q3, _ = grads.attach(0, qs[0], ks[0])
        assert q3 is qs[0] and not grads.anchors
        value = deferred_aream_loss(grads, labels, scale=0.5, num_prefix_tokens=1)
    assert abs(value.item() - aream_loss(qs, ks, labels, scale=0.5, num_prefix_tokens=1).item()) < 1e-6


def test_errors():
    qs, ks, labels = make_inputs(1, 2, 1, 7, 4, 1)
    grads = DeferredGrads()
    grads.attach(0, qs[0], ks[0])
    with pytest.raises(ValueError, match="already attached"):
        grads.attach(0, qs[0], ks[0])
    with pytest.raises(ValueError, match="patch_labels must have shape"):
        deferred_aream_loss(grads, labels[:, :5], scale=0.5, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="scale and num_prefix_tokens"):
        deferred_aream_loss(grads, labels)
    with pytest.raises(ValueError, match="no supervised layer"):
        deferred_aream_loss(DeferredGrads(), labels, scale=0.5, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="DeferredGrads whose attach was the forward's qk_hook"):
        deferred_aream_loss(object(), labels, scale=0.5, num_prefix_tokens=1)


def _tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = build_model("mct_deit_small", 4, img_size=64, drop_path=0.0, embed_dim=48, num_heads=3, depth=4)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_path_matches_aream_loss(dtype):
    model = _tiny_model(dtype)
    images = torch.randn(2, 3, 64, 48, dtype=dtype)
    labels = torch.randint(0, 3, (2, 12))
    labels[0, :3] = 255

    def run(defer):
        model.zero_grad()
        deferred = DeferredGrads() if defer else None
        out = model(images, AttentionRequest(supervised_layers=(2, 3)), qk_hook=deferred.attach if defer else None)
        rec = out.records
        if defer:
            loss = deferred_aream_loss(deferred, labels, scale=rec.scale, num_prefix_tokens=rec.num_prefix_tokens,
                                       layer_weights=[0.3, 0.9])
        else:
            loss = aream_loss([rec.qs[2], rec.qs[3]], [rec.ks[2], rec.ks[3]], labels, scale=rec.scale,
                              num_prefix_tokens=rec.num_prefix_tokens, layer_weights=[0.3, 0.9])
        (out.patch_logits.sum() + 0.1 * loss).backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    v_fwd, g_fwd = run(False)
    v_def, g_def = run(True)
    model.zero_grad()
    model(images, AttentionRequest(supervised_layers=(2, 3))).patch_logits.sum().backward()
    g_cls = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert v_fwd == pytest.approx(v_def, rel=1e-6) and set(g_fwd) == set(g_def)
    for name in g_fwd:
        assert rel_err(g_def[name], g_fwd[name]) <= 1e-6, name
    # the AReAM term really reaches the weights through the deferred path
    assert rel_err(g_def["blocks.3.attn.qkv.weight"], g_cls["blocks.3.attn.qkv.weight"]) > 1e-4


def test_gradients_are_made_during_each_layers_backward(monkeypatch):
    """The point of the module: layer l's loss gradient is made after the deeper layers' backward and before
    layer l's own qkv backward -- never all at once at the start of the backward."""
    model = _tiny_model()
    events = []
    real = loss_deferred._layer_grads

    def logged(q, k, config, layer):
        events.append(("loss grad", layer))
        return real(q, k, config, layer)

    monkeypatch.setattr(loss_deferred, "_layer_grads", logged)
    for i, blk in enumerate(model.blocks):
        blk.attn.qkv.weight.register_post_accumulate_grad_hook(lambda p, i=i: events.append(("qkv grad", i)))
    deferred = DeferredGrads()
    out = model(torch.randn(2, 3, 64, 48), AttentionRequest(supervised_layers=(1, 2, 3)), qk_hook=deferred.attach)
    loss = deferred_aream_loss(deferred, torch.randint(0, 3, (2, 12)), scale=out.records.scale,
                               num_prefix_tokens=out.records.num_prefix_tokens)
    assert events == []  # nothing is made in the forward
    (out.patch_logits.sum() + loss).backward()
    assert events == [("loss grad", 3), ("qkv grad", 3), ("loss grad", 2), ("qkv grad", 2),
                      ("loss grad", 1), ("qkv grad", 1), ("qkv grad", 0)]
