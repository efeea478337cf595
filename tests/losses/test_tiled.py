"""Torch backend of aream_loss against the official-formulation reference: values, gradients, edge cases."""
import pytest
import torch

import aream_fast.losses.tiled as loss_tiled
from aream_fast import AReAMLoss, aream_loss
from aream_fast.official.loss import aream_loss_reference
from tests._qk_inputs import make_inputs


def reference_from_qk(qs, ks, labels, *, scale, prefix, layer_weights=None):
    logits = [(q @ k.transpose(-2, -1)) * scale for q, k in zip(qs, ks)]
    return aream_loss_reference(logits, labels, num_prefix_tokens=prefix, layer_weights=layer_weights)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check_parity(qs, ks, labels, *, prefix, layer_weights=None, stacked=False, tol=1e-5):
    scale = qs[0].shape[-1] ** -0.5
    q_in = torch.stack(qs) if stacked else qs
    k_in = torch.stack(ks) if stacked else ks
    loss = aream_loss(q_in, k_in, labels, scale=scale, num_prefix_tokens=prefix, layer_weights=layer_weights,
                      backend="torch")
    grads = torch.autograd.grad(loss, qs + ks)
    ref = reference_from_qk(qs, ks, labels, scale=scale, prefix=prefix, layer_weights=layer_weights)
    ref_grads = torch.autograd.grad(ref, qs + ks)
    assert loss.dim() == 0
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item()) + 1e-12
    for g, rg in zip(grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == rg.dtype
        assert rel_err(g, rg) <= tol
    return loss, grads


@pytest.mark.parametrize("prefix", [0, 1, 20])
@pytest.mark.parametrize("patches", [7, 17, 196])
def test_parity_fp32(prefix, patches):
    qs, ks, labels = make_inputs(2, 3, prefix, patches, 8, 2, seed=prefix * 1000 + patches)
    check_parity(qs, ks, labels, prefix=prefix)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("weights", [None, [1.0, 1.0, 1.0], [0.3, 0.0, 1.0], "tensor"])
def test_parity_layer_weights_and_stacking(weights, stacked):
    qs, ks, labels = make_inputs(2, 2, 1, 17, 4, 3)
    if weights == "tensor":
        weights = torch.tensor([0.9, 0.2, 0.55])
    check_parity(qs, ks, labels, prefix=1, layer_weights=weights, stacked=stacked)


def test_parity_many_tiles(monkeypatch):
    # Force 8-row tiles so that P = 196 runs through 25 tiles, the last one partial.
    monkeypatch.setattr(loss_tiled, "_TILE_BYTES", 1)
    assert loss_tiled.tile_rows(2, 196) == 8
    qs, ks, labels = make_inputs(2, 3, 1, 196, 8, 2)
    check_parity(qs, ks, labels, prefix=1)


def test_parity_one_class_and_no_ignore():
    qs, ks, labels = make_inputs(2, 2, 1, 17, 4, 2, ignore_frac=0.0, num_classes=1)
    check_parity(qs, ks, labels, prefix=1)
    qs, ks, labels = make_inputs(3, 2, 0, 7, 4, 1, ignore_frac=0.0, num_classes=5)
    check_parity(qs, ks, labels, prefix=0)


@pytest.mark.parametrize("ignored_in_first_image", [0, 5])
def test_parity_ignored_compaction_paths(ignored_in_first_image):
    # Ignored patches are skipped only when every image has some (compacted path); an image without any
    # ignored patch keeps the plain path. Both must match the reference.
    qs, ks, labels = make_inputs(3, 2, 1, 17, 4, 2, ignore_frac=0.0)
    labels[0, :ignored_in_first_image] = 255
    labels[1, 3:9] = 255
    labels[2, ::2] = 255
    check_parity(qs, ks, labels, prefix=1)


def test_parity_merged_head_views():
    # q, k sliced out of a fused qkv projection (timm layout): the merged-head matrices are free views.
    batch, tokens, heads, head_dim = 2, 18, 3, 4
    qkv = torch.randn(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).requires_grad_()
    q, k, _ = qkv.unbind(0)
    labels = torch.randint(0, 3, (batch, tokens - 1))
    check_parity([q], [k], labels, prefix=1)


@pytest.mark.parametrize("tile_bytes", [None, 8 * 3 * 20 * 4])
def test_parity_merged_head_views_with_ignored_patches(monkeypatch, tile_bytes):
    # fused-qkv views AND ignored patches: the compacted rows are gathered from the (B*N, H*d) token rows;
    # the small tile makes several row tiles (8 rows each) per layer
    if tile_bytes is not None:
        monkeypatch.setattr(loss_tiled, "_TILE_BYTES", tile_bytes)
    batch, tokens, heads, head_dim = 3, 22, 3, 4
    g = torch.Generator().manual_seed(5)
    qkvs = [torch.randn(batch, tokens, 3, heads, head_dim, generator=g).permute(2, 0, 3, 1, 4).requires_grad_()
            for _ in range(2)]
    qs, ks = [x[0] for x in qkvs], [x[1] for x in qkvs]
    assert loss_tiled._token_rows(qs[0]) is not None  # the gather path under test
    labels = torch.randint(0, 3, (batch, tokens - 2), generator=g)
    labels[0, 1:7] = 255
    labels[1, ::3] = 255
    labels[2, -5:] = 255
    check_parity(qs, ks, labels, prefix=2)


def test_all_ignored_is_exactly_zero():
    qs, ks, labels = make_inputs(2, 2, 1, 17, 4, 2, ignore_frac=1.0)
    loss = aream_loss(qs, ks, labels, scale=0.5, num_prefix_tokens=1, backend="torch")
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, qs + ks)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_float64_gradcheck():
    qs, ks, labels = make_inputs(2, 2, 1, 5, 3, 2, dtype=torch.float64)

    def fn(*tensors):
        return aream_loss(list(tensors[:2]), list(tensors[2:]), labels, scale=0.7, num_prefix_tokens=1,
                          layer_weights=[1.0, 0.4], backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(qs + ks))
    check_parity(qs, ks, labels, prefix=1, tol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    qs, ks, labels = make_inputs(2, 2, 1, 17, 8, 2, dtype=dtype)
    loss = aream_loss(qs, ks, labels, scale=8 ** -0.5, num_prefix_tokens=1, backend="torch")
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, qs + ks)
    assert all(g.dtype == dtype for g in grads)
    q32 = [q.detach().float().requires_grad_() for q in qs]
    k32 = [k.detach().float().requires_grad_() for k in ks]
    ref = reference_from_qk(q32, k32, labels, scale=8 ** -0.5, prefix=1)
    ref_grads = torch.autograd.grad(ref, q32 + k32)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())  # same fp32 math on the same values
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= 1e-2  # only the final cast to fp16 / bf16


def test_upstream_gradient_scaling_and_retain_graph():
    qs, ks, labels = make_inputs(2, 2, 1, 7, 4, 2)
    loss = aream_loss(qs, ks, labels, scale=0.5, num_prefix_tokens=1, backend="torch")
    (3.0 * loss).backward(retain_graph=True)
    first = [t.grad.clone() for t in qs + ks]
    loss.backward(retain_graph=True)
    loss.backward()
    for t, g in zip(qs + ks, first):
        assert torch.allclose(t.grad, g * 5 / 3, rtol=1e-6, atol=1e-12)
    ref = reference_from_qk(qs, ks, labels, scale=0.5, prefix=1)
    ref_grads = torch.autograd.grad(3.0 * ref, qs + ks)
    for g, rg in zip(first, ref_grads):
        assert rel_err(g, rg) <= 1e-5


def test_no_grad_forward_matches():
    qs, ks, labels = make_inputs(2, 2, 1, 17, 4, 2)
    with torch.no_grad():
        loss = aream_loss(qs, ks, labels, scale=0.5, num_prefix_tokens=1, backend="torch")
    detached = aream_loss([q.detach() for q in qs], [k.detach() for k in ks], labels, scale=0.5,
                          num_prefix_tokens=1, backend="torch")
    ref = reference_from_qk(qs, ks, labels, scale=0.5, prefix=1)
    assert loss.requires_grad is False and detached.requires_grad is False
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert loss.item() == detached.item()


def test_auto_backend_on_cpu_is_torch_and_module_wrapper():
    qs, ks, labels = make_inputs(2, 2, 1, 7, 4, 2)
    auto = aream_loss(qs, ks, labels, scale=0.5, num_prefix_tokens=1)
    torch_ = aream_loss(qs, ks, labels, scale=0.5, num_prefix_tokens=1, backend="torch")
    module = AReAMLoss(scale=0.5, num_prefix_tokens=1, layer_weights=[1.0, 1.0], backend="auto")
    assert auto.item() == torch_.item() == module(qs, ks, labels).item()


def test_torch_compile_fullgraph_matches_eager():
    qs, ks, labels = make_inputs(2, 2, 1, 17, 4, 2)
    weights = torch.tensor([0.7, 1.0])

    def fn(q_list, k_list, y):
        return aream_loss(q_list, k_list, y, scale=0.5, num_prefix_tokens=1, layer_weights=weights,
                          backend="torch")

    eager = fn(qs, ks, labels)
    eager_grads = torch.autograd.grad(2.0 * eager, qs + ks)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    out = compiled(qs, ks, labels)
    grads = torch.autograd.grad(2.0 * out, qs + ks)
    assert abs(out.item() - eager.item()) <= 1e-6 * abs(eager.item())
    for g, eg in zip(grads, eager_grads):
        assert rel_err(g, eg) <= 1e-6
    with torch.no_grad():
        assert abs(compiled(qs, ks, labels).item() - eager.item()) <= 1e-6 * abs(eager.item())
