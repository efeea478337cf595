"""Fused Triton AReAM loss (kernels/aream_loss.py) against a materialised reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set in tests/conftest.py before triton is imported): fp32
and fp64 only, tiny odd shapes, 16x16 tiles so that P = 7, 17, 35 cover single, ragged and multi-tile cases.
With ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the compiled kernels on the GPU, and the
fp16/bf16, torch.compile and race tests at the bottom run too (they skip visibly otherwise):
``TRITON_INTERPRET=0 pytest tests/kernels/test_kernel_aream_loss.py``.
"""
from __future__ import annotations

import os

import pytest
import torch

from aream_fast.kernels.aream_loss import _head_groups, _pair_counts, aream_layer_grads_triton, aream_loss_triton

pytestmark = pytest.mark.interpret

IGNORE = 255
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# interpreter -> CPU tensors; compiled Triton -> CUDA tensors
DEVICE = "cpu" if _INTERPRETING else ("cuda" if torch.cuda.is_available() else None)


@pytest.fixture(autouse=True)
def _need_a_triton_device():
    if DEVICE is None:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


def materialised_loss(q, k, patch_labels, *, scale, num_prefix_tokens, layer_weights=None, ignore_index=IGNORE):
    """Official AReAM loss (docs/semantics.md, Affinity loss) written independently of the kernel: builds the (L, B, H, N, N) logits,
    the head mean, the B x P x P pair labels and counts them directly. q, k (L, B, H, N, d)."""
    c = num_prefix_tokens
    logits = torch.einsum("lbhid,lbhjd->lbhij", q, k) * scale
    s = torch.sigmoid(logits.mean(dim=2)[:, :, c:, c:])  # (L, B, P, P)
    valid = patch_labels != ignore_index
    pair_valid = valid[:, :, None] & valid[:, None, :]
    same = (patch_labels[:, :, None] == patch_labels[:, None, :]) & pair_valid
    diff = pair_valid & ~same
    n_pos = same.sum() + 1
    n_neg = diff.sum() + 1
    per_layer = 0.5 * ((1 - s) * same).sum(dim=(1, 2, 3)) / n_pos + 0.5 * (s * diff).sum(dim=(1, 2, 3)) / n_neg
    if layer_weights is not None:
        per_layer = per_layer * layer_weights.to(per_layer)
    return per_layer.mean()


def _inputs(n_layers, batch, heads, n_tokens, dim, num_prefix, *, num_classes=3, ignore_frac=0.2,
            dtype=torch.float32, device=None):
    device = DEVICE if device is None else device
    q = torch.randn(n_layers, batch, heads, n_tokens, dim, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(n_layers, batch, heads, n_tokens, dim, dtype=dtype, device=device, requires_grad=True)
    labels = torch.randint(0, num_classes, (batch, n_tokens - num_prefix), device=device)
    labels[torch.rand(labels.shape, device=device) < ignore_frac] = IGNORE
    return q, k, labels


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _loss_and_grads(fn, q, k, labels, **kw):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    loss = fn(q, k, labels, **kw)
    dq, dk = torch.autograd.grad(loss, (q, k))
    return loss.detach(), dq, dk


# (L, B, H, N, d, C): P = N - C
CASES = [
    pytest.param(1, 2, 2, 8, 16, 1, id="P7-C1-d16-L1"),
    pytest.param(3, 2, 2, 17, 24, 0, id="P17-C0-d24-L3"),
    pytest.param(2, 1, 3, 27, 16, 20, id="P7-C20-d16-L2"),
    pytest.param(1, 1, 2, 36, 24, 1, id="P35-C1-d24-3tiles"),
]


@pytest.mark.parametrize("n_layers,batch,heads,n_tokens,dim,num_prefix", CASES)
def test_matches_materialised_reference_fp32(n_layers, batch, heads, n_tokens, dim, num_prefix):
    q, k, labels = _inputs(n_layers, batch, heads, n_tokens, dim, num_prefix)
    weights = torch.linspace(0.2, 1.5, n_layers, device=DEVICE) if n_layers > 1 else None
    kw = dict(scale=dim ** -0.5, num_prefix_tokens=num_prefix, layer_weights=weights)
    loss, dq, dk = _loss_and_grads(aream_loss_triton, q, k, labels, **kw)
    ref, dq_ref, dk_ref = _loss_and_grads(materialised_loss, q, k, labels, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert _rel_err(loss, ref) <= 1e-5, (loss.item(), ref.item())
    assert _rel_err(dq, dq_ref) <= 1e-5
    assert _rel_err(dk, dk_ref) <= 1e-5
    # prefix-token rows get exactly zero gradient
    assert torch.all(dq[..., :num_prefix, :] == 0) and torch.all(dk[..., :num_prefix, :] == 0)


def test_matches_team_reference_on_logits():
    """Parity with aream_fast.official.loss.aream_loss_reference (the LOSS engineer's official-form reference on
    materialised (B, H, N, N) logits), values and gradients, with layer weights and ignored patches."""
    from aream_fast.official.loss import aream_loss_reference

    n_layers, batch, heads, n_tokens, dim, num_prefix = 2, 2, 2, 19, 16, 2
    q, k, labels = _inputs(n_layers, batch, heads, n_tokens, dim, num_prefix, ignore_frac=0.3)
    weights = torch.tensor([0.25, 1.75], device=DEVICE)
    scale = dim ** -0.5

    def team_ref(q, k, labels, **kw):
        logits = [torch.einsum("bhid,bhjd->bhij", q[i], k[i]) * scale for i in range(n_layers)]
        return aream_loss_reference(logits, labels, num_prefix_tokens=num_prefix, layer_weights=weights)

    kw = dict(scale=scale, num_prefix_tokens=num_prefix, layer_weights=weights)
    loss, dq, dk = _loss_and_grads(aream_loss_triton, q, k, labels, **kw)
    ref, dq_ref, dk_ref = _loss_and_grads(team_ref, q, k, labels)
    assert _rel_err(loss, ref) <= 1e-5
    assert _rel_err(dq, dq_ref) <= 1e-5
    assert _rel_err(dk, dk_ref) <= 1e-5


def test_public_loss_triton_backend_matches_torch_backend():
    """aream_fast.losses.aream.aream_loss(backend="triton") routes a list of per-layer (B, H, N, d) tensors to this
    kernel; it must agree with the torch backend. One image is fully ignored (batch-global counts)."""
    from aream_fast.losses.aream import aream_loss

    q, k, labels = _inputs(2, 3, 2, 11, 16, 1)
    labels[1] = IGNORE
    qs, ks = list(q.detach().unbind(0)), list(k.detach().unbind(0))
    for t in qs + ks:
        t.requires_grad_(True)
    kw = dict(scale=0.25, num_prefix_tokens=1, layer_weights=[0.5, 1.0])
    fused = aream_loss(qs, ks, labels, backend="triton", **kw)
    grads_fused = torch.autograd.grad(fused, qs + ks)
    tiled = aream_loss(qs, ks, labels, backend="torch", **kw)
    grads_tiled = torch.autograd.grad(tiled, qs + ks)
    assert _rel_err(fused, tiled) <= 1e-5
    for a, b in zip(grads_fused, grads_tiled):
        assert _rel_err(a, b) <= 1e-5


def test_single_class_has_no_negative_pairs():
    q, k, labels = _inputs(1, 2, 2, 10, 16, 1, num_classes=1, ignore_frac=0.0)
    kw = dict(scale=0.25, num_prefix_tokens=1)
    loss, dq, dk = _loss_and_grads(aream_loss_triton, q, k, labels, **kw)
    ref, dq_ref, dk_ref = _loss_and_grads(materialised_loss, q, k, labels, **kw)
    assert _rel_err(loss, ref) <= 1e-5
    assert _rel_err(dq, dq_ref) <= 1e-5 and _rel_err(dk, dk_ref) <= 1e-5


def test_all_ignored_gives_zero_loss_and_grads():
    q, k, labels = _inputs(2, 2, 2, 9, 16, 1)
    labels.fill_(IGNORE)
    loss, dq, dk = _loss_and_grads(aream_loss_triton, q, k, labels, scale=0.25, num_prefix_tokens=1)
    assert loss.item() == 0.0
    assert torch.all(dq == 0) and torch.all(dk == 0)
    assert torch.isfinite(loss) and torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_custom_ignore_index():
    q, k, labels = _inputs(1, 2, 2, 9, 16, 1)
    labels[labels == IGNORE] = -1
    kw = dict(scale=0.3, num_prefix_tokens=1, ignore_index=-1)
    loss, dq, dk = _loss_and_grads(aream_loss_triton, q, k, labels, **kw)
    ref, dq_ref, dk_ref = _loss_and_grads(materialised_loss, q, k, labels, **kw)
    assert _rel_err(loss, ref) <= 1e-5 and _rel_err(dq, dq_ref) <= 1e-5 and _rel_err(dk, dk_ref) <= 1e-5


def test_pair_counts_match_bincount_and_team_helper():
    labels = torch.randint(0, 5, (3, 23), device=DEVICE)
    labels[torch.rand(labels.shape, device=DEVICE) < 0.3] = IGNORE
    n_pos, n_neg = _pair_counts(labels, IGNORE)
    valid = labels != IGNORE
    same = 0
    for b in range(labels.shape[0]):
        same += int((torch.bincount(labels[b][valid[b]]) ** 2).sum())
    total = int((valid.sum(1) ** 2).sum())
    assert (int(n_pos), int(n_neg)) == (same + 1, total - same + 1)
    from aream_fast.losses.pairs import pair_counts

    team = pair_counts(labels, ignore_index=IGNORE)
    assert (int(n_pos), int(n_neg)) == (int(team[0]), int(team[1]))


def test_gradcheck_float64():
    """tl.dot takes float64 under the interpreter, so the kernels run (and accumulate) in float64 here."""
    q, k, labels = _inputs(2, 1, 2, 5, 3, 1, dtype=torch.float64, ignore_frac=0.25)
    weights = torch.tensor([0.4, 1.3], dtype=torch.float64, device=DEVICE)

    def fn(q, k):
        return aream_loss_triton(q, k, labels, scale=0.8, num_prefix_tokens=1, layer_weights=weights)

    assert fn(q, k).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (q, k), fast_mode=True, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_backward_is_deterministic():
    q, k, labels = _inputs(2, 2, 2, 20, 24, 1)
    kw = dict(scale=24 ** -0.5, num_prefix_tokens=1)
    first = _loss_and_grads(aream_loss_triton, q, k, labels, **kw)
    second = _loss_and_grads(aream_loss_triton, q, k, labels, **kw)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_no_grad_forward_and_frozen_keys():
    """Forward under no_grad (evaluation, Liger #930-style) and a frozen k (only q requires grad)."""
    q, k, labels = _inputs(1, 2, 2, 9, 16, 1)
    kw = dict(scale=0.25, num_prefix_tokens=1)
    with torch.no_grad():
        value = aream_loss_triton(q, k, labels, **kw)
    assert not value.requires_grad
    q_leaf = q.detach().clone().requires_grad_(True)
    loss = aream_loss_triton(q_leaf, k.detach(), labels, **kw)
    loss.backward()
    assert torch.equal(loss.detach(), value)
    q_ref = q.detach().clone().requires_grad_(True)
    materialised_loss(q_ref, k.detach(), labels, **kw).backward()
    assert _rel_err(q_leaf.grad, q_ref.grad) <= 1e-5


def test_grad_output_scaling_and_noncontiguous_input():
    """A non-unit upstream gradient scales dq/dk; a transposed (non-contiguous) q is handled."""
    q, k, labels = _inputs(1, 2, 2, 9, 16, 1)
    q_nc = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(True)
    assert not q_nc.is_contiguous()
    loss = aream_loss_triton(q_nc, k, labels, scale=0.25, num_prefix_tokens=1)
    (3.5 * loss).backward()
    q_ref = q.detach().clone().requires_grad_(True)
    ref = materialised_loss(q_ref, k.detach(), labels, scale=0.25, num_prefix_tokens=1)
    (3.5 * ref).backward()
    assert _rel_err(q_nc.grad, q_ref.grad) <= 1e-5


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda q, k, y: (q[0], k[0], y), "q must be stacked"),
        (lambda q, k, y: (q, k[..., :-1], y), "k must have q's shape"),
        (lambda q, k, y: (q, k.double(), y), "k must have q's dtype"),
        (lambda q, k, y: (q, k, y.int()), "patch_labels must be int64"),
        (lambda q, k, y: (q, k, y[:, :-1]), r"patch_labels must have shape \(B, P\)"),
    ],
)
def test_bad_input_raises(change, match):
    q, k, labels = _inputs(1, 1, 1, 5, 16, 1)
    q, k, labels = change(q.detach(), k.detach(), labels)
    with pytest.raises(ValueError, match=match):
        aream_loss_triton(q, k, labels, scale=0.25, num_prefix_tokens=1)


def test_bad_layer_weights_and_prefix_raise():
    q, k, labels = _inputs(2, 1, 1, 5, 16, 1)
    with pytest.raises(ValueError, match="layer_weights"):
        aream_loss_triton(q, k, labels, scale=0.25, num_prefix_tokens=1, layer_weights=torch.ones(3))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        aream_loss_triton(q, k, labels, scale=0.25, num_prefix_tokens=5)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    import aream_fast.kernels.aream_loss as module

    monkeypatch.setattr(module, "_INTERPRET", False)
    q, k, labels = _inputs(1, 1, 1, 5, 16, 1, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        module.aream_loss_triton(q, k, labels, scale=0.25, num_prefix_tokens=1)


def test_layer_grads_entry_point_matches_loss_autograd():
    """aream_layer_grads_triton (the deferred per-layer gradient) = the loss's autograd gradient of that layer,
    also for q / k given as strided views of a packed (B, N, 3, H, d) qkv tensor (used without a copy)."""
    n_layers, batch, heads, n_tokens, dim, num_prefix = 3, 2, 3, 19, 16, 2
    q, k, labels = _inputs(n_layers, batch, heads, n_tokens, dim, num_prefix)
    weights = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
    kw = dict(scale=dim ** -0.5, num_prefix_tokens=num_prefix)
    _, dq, dk = _loss_and_grads(aream_loss_triton, q, k, labels, layer_weights=weights, **kw)
    for layer in range(n_layers):
        qkv = torch.stack([q[layer].detach(), k[layer].detach()], dim=0).permute(1, 3, 0, 2, 4).contiguous()
        q_view, k_view = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) views, shared strides
        assert not q_view.is_contiguous() and q_view.stride() == k_view.stride()
        got_q, got_k = aream_layer_grads_triton(q_view, k_view, labels, weight=float(weights[layer]) / n_layers,
                                                **kw)
        assert got_q.shape == (batch, heads, n_tokens, dim)
        torch.testing.assert_close(got_q, dq[layer], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(got_k, dk[layer], rtol=1e-5, atol=1e-9)
        assert got_q[:, :, :num_prefix].abs().max() == 0


def test_layer_grads_entry_point_rejects_stacked_input():
    q, k, labels = _inputs(2, 1, 1, 9, 16, 1)
    with pytest.raises(ValueError, match="one layer's"):
        aream_layer_grads_triton(q, k, labels, scale=0.25, num_prefix_tokens=1, weight=1.0)


def test_head_groups_cover_all_heads():
    """Backward head groups: balanced, every head in exactly one group (2 heads per group under the
    interpreter, so H = 3 runs a ragged second group in the parity tests above)."""
    for heads in range(1, 13):
        per, n_groups = _head_groups(heads, 16)
        assert per * n_groups >= heads > per * (n_groups - 1)
        assert per <= (2 if _INTERPRETING else 16)


def test_fp16_minority_pair_gradients_do_not_underflow():
    """Review C1: when one pair class dominates the batch, the normalised coefficient n_small / n_large is tiny
    (here 1 / 3845, all patches of one class), and with confident logits (S (1 - S) ~ 3e-4) G ~ 9e-8 is at the
    bottom of fp16's subnormal range. The fp16 gradients, scaled as a GradScaler would, must still match the
    fp32 reference computed from the same fp16-rounded inputs (G cast to fp16 before the second dot, as before
    the fix, misses by tens of per cent)."""
    batch, n_tokens, dim, num_prefix = 4, 32, 16, 1
    base = torch.full((dim,), 2.0 ** 0.5)  # scale * q . k ~ 8 for every pair
    q = (base + 0.1 * torch.randn(1, batch, 1, n_tokens, dim)).to(device=DEVICE, dtype=torch.float16)
    k = (base + 0.1 * torch.randn(1, batch, 1, n_tokens, dim)).to(device=DEVICE, dtype=torch.float16)
    labels = torch.zeros(batch, n_tokens - num_prefix, dtype=torch.int64, device=DEVICE)  # no negative pairs
    kw = dict(scale=dim ** -0.5, num_prefix_tokens=num_prefix)

    def scaled(fn):
        return lambda *a, **k: fn(*a, **k) * 2.0 ** 16

    _, dq, dk = _loss_and_grads(scaled(aream_loss_triton), q, k, labels, **kw)
    _, dq_ref, dk_ref = _loss_and_grads(scaled(materialised_loss), q.float(), k.float(), labels, **kw)
    assert dq.dtype == torch.float16
    assert _rel_err(dq.float(), dq_ref) < 5e-3
    assert _rel_err(dk.float(), dk_ref) < 5e-3


def test_ops_check_stride_assumptions():
    """Review C2: the triton_ops called directly reject q / k with different strides or a non-unit d-stride."""
    from aream_fast.kernels.aream_loss import _aream_loss_fwd

    q, k, labels = _inputs(1, 1, 1, 9, 16, 1)
    coefs = torch.tensor([-1.0, 1.0, 0.1], device=DEVICE)
    with pytest.raises(ValueError, match="share strides"):
        _aream_loss_fwd(q.detach(), k.detach().transpose(-1, -2).contiguous().transpose(-1, -2), labels, coefs,
                        0.25, 1, IGNORE)


def test_pinned_config_parses_and_rejects(monkeypatch):
    """Review C3: AREAM_FAST_LOSS_CONFIG pins one config; malformed values raise a clear ValueError."""
    from aream_fast.kernels.aream_loss import _parse_pinned

    cfg = _parse_pinned("64,128,8,3")
    assert (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages) == (64, 128, 8, 3)
    for bad in ("64,64,8", "a,b,c,d", "48,64,8,2"):
        with pytest.raises(ValueError, match="AREAM_FAST_LOSS_CONFIG"):
            _parse_pinned(bad)


# ----------------------------------------------------------------------------------------------------- CUDA only

def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if _INTERPRETING:
        pytest.skip("needs CUDA without TRITON_INTERPRET=1 (compiled kernels)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2), (torch.float32, 1e-5)])
def test_cuda_low_precision_matches_fp32_reference(dtype, tol):
    _needs_cuda()
    # ViT-S/16 at 224 (N = 197, one class token) and an odd N with MCTformer-style 20 prefix tokens
    for n_layers, batch, heads, n_tokens, dim, num_prefix in [(3, 2, 6, 197, 64, 1), (2, 2, 3, 61, 24, 20)]:
        q, k, labels = _inputs(n_layers, batch, heads, n_tokens, dim, num_prefix, num_classes=4, device="cuda")
        q_lp, k_lp = q.detach().to(dtype), k.detach().to(dtype)
        kw = dict(scale=dim ** -0.5, num_prefix_tokens=num_prefix)
        loss, dq, dk = _loss_and_grads(aream_loss_triton, q_lp, k_lp, labels, **kw)
        # truth in fp32 from the same rounded inputs; baseline = materialised loss in the low precision
        ref, dq_ref, dk_ref = _loss_and_grads(materialised_loss, q_lp.float(), k_lp.float(), labels, **kw)
        assert dq.dtype == dtype and loss.dtype == torch.float32
        assert _rel_err(loss, ref) <= tol
        assert _rel_err(dq.float(), dq_ref) <= 5 * tol
        assert _rel_err(dk.float(), dk_ref) <= 5 * tol


@pytest.mark.gpu
def test_cuda_torch_compile_fullgraph_matches_eager():
    _needs_cuda()
    q, k, labels = _inputs(2, 2, 6, 197, 64, 1, device="cuda")
    weights = torch.tensor([0.5, 1.0], device="cuda")
    kw = dict(scale=0.125, num_prefix_tokens=1, layer_weights=weights)

    def fn(q, k, labels):
        return aream_loss_triton(q, k, labels, **kw)

    eager = _loss_and_grads(fn, q, k, labels)
    compiled = _loss_and_grads(torch.compile(fn, fullgraph=True), q, k, labels)
    for a, b in zip(compiled, eager):
        assert _rel_err(a, b) <= 1e-5


@pytest.mark.gpu
def test_cuda_backward_repeat_bit_equal():
    """Race-condition check (flash-attention style): repeated backward passes on awkward shapes are bit-equal."""
    _needs_cuda()
    for n_tokens in (197, 785, 18):
        q, k, labels = _inputs(2, 2, 4, n_tokens, 48, 1, device="cuda", dtype=torch.bfloat16)
        kw = dict(scale=48 ** -0.5, num_prefix_tokens=1)
        first = _loss_and_grads(aream_loss_triton, q, k, labels, **kw)
        for _ in range(3):
            again = _loss_and_grads(aream_loss_triton, q, k, labels, **kw)
            for a, b in zip(first, again):
                assert torch.equal(a, b)
