"""apply_aream_to_timm: unchanged model output, recorder loss equals the reference on eager logits,
gradients reach the qkv weights, and remove() undoes the patch."""
import pytest
import torch

timm = pytest.importorskip("timm")

from aream_fast import apply_aream_to_timm, aream_loss_reference  # noqa: E402


def tiny_vit(**kw):
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                          num_classes=5, **kw)
    return model.eval()


def eager_logits(model, images, layers):
    """Pre-softmax logits Z = scale * q k^T of the given blocks, the official (materialised) way."""
    logits = {}
    hooks = []
    for i in layers:
        attn = model.blocks[i].attn

        def hook(module, args, _out, i=i):
            x = args[0]
            b, n, _ = x.shape
            qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
            q, k, _ = qkv.unbind(0)
            logits[i] = (q @ k.transpose(-2, -1)) * module.scale

        hooks.append(attn.register_forward_hook(hook))
    model(images)
    for h in hooks:
        h.remove()
    return [logits[i] for i in layers]


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_patched_output_loss_and_grads(reg_tokens):
    model = tiny_vit(reg_tokens=reg_tokens)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    labels = torch.randint(0, 3, (2, 16))
    labels[0, :5] = 255
    layers = [1, 2]
    ref = aream_loss_reference(eager_logits(model, images, layers), labels,
                               num_prefix_tokens=model.num_prefix_tokens)
    ref.backward()
    ref_grads = [model.blocks[i].attn.qkv.weight.grad.clone() for i in range(3)]
    model.zero_grad(set_to_none=True)

    recorder = apply_aream_to_timm(model, supervised_layers=layers)
    out = model(images)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert len(recorder.qs) == 2 and recorder.qs[0].shape == (2, 2, 16 + 1 + reg_tokens, 16)
    assert recorder.num_prefix_tokens == 1 + reg_tokens and recorder.scale == 16 ** -0.5
    loss = recorder.loss(labels)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    loss.backward()
    for i in range(3):
        grad = model.blocks[i].attn.qkv.weight.grad
        if i <= max(layers):  # supervised blocks and the blocks feeding them
            assert grad.abs().sum() > 0
            torch.testing.assert_close(grad, ref_grads[i], rtol=1e-4, atol=1e-7)

    recorder.remove()
    assert "forward" not in model.blocks[1].attn.__dict__
    with pytest.raises(RuntimeError, match="run the model forward"):
        recorder.qs
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)


def test_weights_and_clear():
    model = tiny_vit()
    recorder = apply_aream_to_timm(model, range(3))
    images = torch.randn(1, 3, 32, 32)
    model(images)
    labels = torch.randint(0, 2, (1, 16))
    weighted = recorder.loss(labels, layer_weights=[0.0, 0.0, 1.0])
    last_only = aream_loss_reference(eager_logits(model, images, [2]), labels, num_prefix_tokens=1)
    assert abs(weighted.item() - last_only.item() / 3) <= 1e-5 * abs(last_only.item())
    recorder.clear()
    with pytest.raises(RuntimeError, match="run the model forward"):
        recorder.loss(labels)
    recorder.remove()


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_deferred_loss_grad_matches_plain(reg_tokens):
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 3, (2, 16))
    labels[1, 4:9] = 255
    results = []
    for defer in (False, True):
        model = tiny_vit(reg_tokens=reg_tokens)
        recorder = apply_aream_to_timm(model, [1, 2], defer_loss_grad=defer)
        for _ in range(2):  # a second forward replaces the first one's records and identity nodes
            out = model(images)
        loss = recorder.loss(labels, layer_weights=[0.5, 1.0])
        (out.sum() * 1e-2 + loss).backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        recorder.remove()
    (v_plain, g_plain), (v_def, g_def) = results
    assert v_def == pytest.approx(v_plain, rel=1e-6)
    for a, b in zip(g_def, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_bad_arguments():
    model = tiny_vit()
    with pytest.raises(ValueError, match="at least one block"):
        apply_aream_to_timm(model, [])
    with pytest.raises(ValueError, match=r"in \[0, 3\), got \[1, 3\]"):
        apply_aream_to_timm(model, [1, 3])
    with pytest.raises(ValueError, match="timm.models.VisionTransformer"):
        apply_aream_to_timm(torch.nn.Linear(2, 2), [0])
    recorder = apply_aream_to_timm(model, [0])
    with pytest.raises(ValueError, match="already patched"):
        apply_aream_to_timm(model, [1])
    recorder.remove()


@pytest.mark.parametrize("defer", [False, True])
def test_a_no_grad_forward_before_the_loss_keeps_the_training_records(defer):
    """issue 15 item 5: a torch.no_grad() forward (e.g. pseudo labels) between the training forward and
    recorder.loss() must not leave the loss without gradient."""
    model = tiny_vit().train()
    recorder = apply_aream_to_timm(model, [1, 2], defer_loss_grad=defer)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 16))
    model(images)
    expected = recorder.loss(labels).detach()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    loss = recorder.loss(labels)
    assert loss.requires_grad
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0


def test_a_loss_from_a_no_grad_forward_only_is_a_clear_error():
    model = tiny_vit()
    recorder = apply_aream_to_timm(model, [2])
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        recorder.loss(torch.randint(0, 5, (2, 16)))  # a value under no_grad is fine
    with pytest.raises(RuntimeError, match="forward without autograd"):
        recorder.loss(torch.randint(0, 5, (2, 16)))
    recorder.clear()
    model(torch.randn(2, 3, 32, 32))
    assert recorder.loss(torch.randint(0, 5, (2, 16))).requires_grad
