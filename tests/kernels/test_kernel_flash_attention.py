"""Triton flash attention (kernels/flash_attention.py) against eager softmax attention.

CPU: the kernels run through TRITON_INTERPRET=1 (set by tests/conftest.py) in fp32 on tiny ragged shapes.
GPU-only tests (fp16/bf16 parity at ViT lengths, torch.compile fullgraph) skip visibly without CUDA.
"""
import pytest
import torch

from aream_fast.kernels.flash_attention import attention_apply_triton, class_attention_from_lse, flash_attention

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

# (B, H, N, d, C): odd N, N = block multiple (unmasked path), N < block, d below its power-of-two block.
SHAPES = [
    (1, 2, 7, 16, 0),
    (2, 2, 17, 24, 1),
    (2, 2, 21, 16, 3),
    (1, 2, 32, 16, 1),
    (1, 1, 1, 24, 0),
    (1, 2, 5, 16, 5),
]


def _qkv(B, H, N, D, dtype=torch.float32, device="cpu", noncontiguous=False):
    """q, k, v (B, H, N, d); with noncontiguous=True they are views of a (B, N, 3, H, d) qkv tensor, as in a ViT."""
    if noncontiguous:
        qkv = torch.randn(B, N, 3, H, D, device=device).to(dtype).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]
    return tuple(torch.randn(B, H, N, D, device=device).to(dtype) for _ in range(3))


def _eager(q, k, v, scale, C):
    """Reference in float64: O (B,H,N,d), lse (B,H,N), class attention (B,C,P) = head-mean softmax rows."""
    z = (q.double() @ k.double().transpose(-1, -2)) * scale
    attn = z.softmax(-1)
    return attn @ v.double(), torch.logsumexp(z, -1), attn[:, :, :C, C:].mean(1)


@pytest.mark.interpret
@pytest.mark.parametrize("B,H,N,D,C", SHAPES)
def test_forward_matches_eager(B, H, N, D, C):
    q, k, v = _qkv(B, H, N, D)
    scale = D ** -0.5
    o, lse, cls = flash_attention(q, k, v, scale=scale, num_prefix_tokens=C, return_lse=True,
                                  return_class_attention=True)
    ro, rl, rc = _eager(q, k, v, scale, C)
    assert o.shape == (B, H, N, D) and o.dtype == torch.float32
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32
    assert cls.shape == (B, C, N - C) and cls.dtype == torch.float32
    torch.testing.assert_close(o.double(), ro, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), rl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls.double(), rc, rtol=1e-5, atol=1e-7)


@pytest.mark.interpret
def test_forward_vit_length_197_noncontiguous():
    """N = 197 (ViT-S/16 at 224², one class token), q/k/v strided views of a fused qkv tensor."""
    q, k, v = _qkv(1, 1, 197, 16, noncontiguous=True)
    assert not q.is_contiguous()
    o, lse, cls = flash_attention(q, k, v, scale=0.25, num_prefix_tokens=1, return_lse=True,
                                  return_class_attention=True)
    ro, rl, rc = _eager(q, k, v, 0.25, 1)
    torch.testing.assert_close(o.double(), ro, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), rl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls.double(), rc, rtol=1e-5, atol=1e-7)


@pytest.mark.interpret
def test_return_conventions():
    q, k, v = _qkv(1, 2, 9, 16)
    o = flash_attention(q, k, v, scale=0.25)
    assert isinstance(o, torch.Tensor) and o.shape == q.shape
    o2, lse, cls = flash_attention(q, k, v, scale=0.25, return_lse=True)
    assert cls is None and lse.shape == (1, 2, 9)
    assert torch.equal(o, o2)
    o3, lse3, cls3 = flash_attention(q, k, v, scale=0.25, num_prefix_tokens=2, return_class_attention=True)
    assert lse3 is None and cls3.shape == (1, 2, 7)
    o4, _, cls4 = flash_attention(q, k, v, scale=0.25, num_prefix_tokens=0, return_class_attention=True)
    assert cls4.shape == (1, 0, 9)


def _grads(fn, q, k, v, g_o, g_lse):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = fn(q, k, v)
    loss = (o * g_o).sum() if g_lse is None else (o * g_o).sum() + (lse * g_lse).sum()
    return torch.autograd.grad(loss, (q, k, v))


def _triton_fn(scale):
    def fn(q, k, v):
        o, lse, _ = flash_attention(q, k, v, scale=scale, num_prefix_tokens=1, return_lse=True,
                                    return_class_attention=True)
        return o, lse
    return fn


def _eager_fn(scale):
    def fn(q, k, v):
        z = (q @ k.transpose(-1, -2)) * scale
        return z.softmax(-1) @ v, torch.logsumexp(z, -1)
    return fn


@pytest.mark.interpret
@pytest.mark.parametrize("B,H,N,D", [(1, 2, 7, 16), (2, 2, 21, 24), (1, 2, 32, 16)])
@pytest.mark.parametrize("with_lse_grad", [False, True])
def test_backward_matches_eager(B, H, N, D, with_lse_grad):
    q, k, v = (t.double().float() for t in _qkv(B, H, N, D, noncontiguous=(N == 21)))
    scale = D ** -0.5
    g_o = torch.randn(B, H, N, D)
    g_lse = torch.randn(B, H, N) if with_lse_grad else None
    got = _grads(_triton_fn(scale), q, k, v, g_o, g_lse)
    ref = _grads(_eager_fn(scale), q.double(), k.double(), v.double(), g_o.double(),
                 None if g_lse is None else g_lse.double())
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        assert a.shape == (B, H, N, D) and a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.interpret
def test_backward_lse_only_and_class_attention_not_differentiable():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 11, 16))
    o, lse, cls = flash_attention(q, k, v, scale=0.25, num_prefix_tokens=2, return_lse=True,
                                  return_class_attention=True)
    assert o.requires_grad and lse.requires_grad and not cls.requires_grad
    dq, dk, dv = torch.autograd.grad(lse.sum(), (q, k, v), allow_unused=True)
    rq, rk = torch.autograd.grad(torch.logsumexp((q @ k.transpose(-1, -2)) * 0.25, -1).sum(), (q, k))
    torch.testing.assert_close(dq, rq, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(dk, rk, rtol=1e-5, atol=2e-6)
    assert dv is None or torch.count_nonzero(dv) == 0


@pytest.mark.interpret
def test_backward_with_broadcast_grad_output():
    """out.sum() hands the backward an expanded dO (all strides 0)."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 10, 24))
    got = torch.autograd.grad(flash_attention(q, k, v, scale=0.2).sum(), (q, k, v))
    ref = torch.autograd.grad((((q @ k.transpose(-1, -2)) * 0.2).softmax(-1) @ v).sum(), (q, k, v))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


@pytest.mark.interpret
def test_backward_is_deterministic():
    q, k, v = _qkv(2, 2, 19, 24)
    g_o = torch.randn_like(q)
    g_lse = torch.randn(2, 2, 19)
    first = _grads(_triton_fn(24 ** -0.5), q, k, v, g_o, g_lse)
    second = _grads(_triton_fn(24 ** -0.5), q, k, v, g_o, g_lse)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _apply_reference(q, k, values, scale, C):
    """mean_h softmax(scale q kᵀ)[C:, C:] @ valuesᵀ, in the values layout (B, K, P), float64."""
    attn = ((q.double() @ k.double().transpose(-1, -2)) * scale).softmax(-1)[:, :, C:, C:]  # (B,H,P,P)
    return (attn @ values.double().transpose(1, 2).unsqueeze(1)).mean(1).transpose(1, 2)


@pytest.mark.interpret
@pytest.mark.parametrize("B,H,N,D,C,K", [(1, 2, 7, 16, 0, 3), (2, 2, 18, 24, 1, 5), (2, 2, 21, 16, 3, 20),
                                         (1, 2, 35, 16, 3, 2)])
def test_attention_apply_matches_eager(B, H, N, D, C, K):
    q, k, v = _qkv(B, H, N, D)
    values = torch.rand(B, K, N - C)
    scale = D ** -0.5
    _, lse, _ = flash_attention(q, k, v, scale=scale, return_lse=True)
    out = attention_apply_triton(q, k, lse, values, scale=scale, num_prefix_tokens=C)
    assert out.shape == (B, K, N - C) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _apply_reference(q, k, values, scale, C), rtol=1e-5, atol=1e-6)
    # Any exact LSE works (e.g. one from SDPA); non-contiguous values too.
    lse_ref = torch.logsumexp((q @ k.transpose(-1, -2)) * scale, -1)
    values_t = values.transpose(1, 2).contiguous().transpose(1, 2)
    out2 = attention_apply_triton(q, k, lse_ref, values_t, scale=scale, num_prefix_tokens=C)
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)


@pytest.mark.interpret
def test_attention_apply_layers_weighted_mean():
    """L layers in one launch: 1/L Σ_l w_l · mean_h softmax(Z_l)[C:, C:] @ valuesᵀ (weights not renormalised)."""
    B, H, N, D, C, K, L = 2, 2, 13, 16, 2, 3, 3
    qs = torch.randn(L, B, H, N, D)
    ks = torch.randn(L, B, H, N, D)
    lses = torch.logsumexp((qs @ ks.transpose(-1, -2)) * 0.25, -1)
    values = torch.rand(B, K, N - C)
    weights = [0.5, 2.0, 1.25]
    ref = sum(w * _apply_reference(qs[i], ks[i], values, 0.25, C) for i, w in enumerate(weights)) / L
    stacked = attention_apply_triton(qs, ks, lses, values, scale=0.25, num_prefix_tokens=C, layer_weights=weights)
    torch.testing.assert_close(stacked.double(), ref, rtol=1e-5, atol=1e-6)
    listed = attention_apply_triton(list(qs), list(ks), list(lses), values, scale=0.25, num_prefix_tokens=C,
                                    layer_weights=torch.tensor(weights))
    assert torch.equal(listed, stacked)
    uniform = attention_apply_triton(qs, ks, lses, values, scale=0.25, num_prefix_tokens=C)
    ref_uniform = sum(_apply_reference(qs[i], ks[i], values, 0.25, C) for i in range(L)) / L
    torch.testing.assert_close(uniform.double(), ref_uniform, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer_weights"):
        attention_apply_triton(qs, ks, lses, values, scale=0.25, num_prefix_tokens=C, layer_weights=[1.0])
    with pytest.raises(ValueError, match="same number of layers"):
        attention_apply_triton(qs, ks[:2], lses, values, scale=0.25, num_prefix_tokens=C)


@pytest.mark.interpret
def test_bad_inputs_raise_value_error():
    q, k, v = _qkv(1, 2, 9, 16)
    with pytest.raises(ValueError, match="q must be a \\(B, H, N, d\\)"):
        flash_attention(q[0], k, v, scale=0.25)
    with pytest.raises(ValueError, match="k must have the shape"):
        flash_attention(q, k[:, :, :5], v, scale=0.25)
    with pytest.raises(ValueError, match="v must match"):
        flash_attention(q, k, v.double(), scale=0.25)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        flash_attention(q.double(), k.double(), v.double(), scale=0.25)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        flash_attention(q, k, v, scale=0.25, num_prefix_tokens=10)
    with pytest.raises(ValueError, match="scale"):
        flash_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 1, 3, 160)
        flash_attention(big, big, big, scale=0.1)
    lse = torch.zeros(1, 2, 9)
    with pytest.raises(ValueError, match="lse must be"):
        attention_apply_triton(q, k, lse[:, :1], torch.rand(1, 3, 8), scale=0.25, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="values must be a \\(B, K, P\\)"):
        attention_apply_triton(q, k, lse, torch.rand(1, 3, 9), scale=0.25, num_prefix_tokens=1)


@pytest.mark.interpret
@pytest.mark.parametrize("B,H,N,D,C", [(2, 2, 17, 24, 3), (1, 3, 21, 16, 1)])
def test_class_attention_from_external_lse(B, H, N, D, C):
    """The class-attention kernel fed with an LSE computed elsewhere (here torch.logsumexp, padded to a longer
    last dim as some SDPA backends return it) matches the eager head-mean softmax rows; q, k strided views."""
    q, k, v = _qkv(B, H, N, D, noncontiguous=True)
    scale = D ** -0.5
    lse = torch.logsumexp((q @ k.transpose(-1, -2)) * scale, -1)
    padded = torch.full((B, H, N + 5), float("nan"))
    padded[..., :N] = lse
    got = class_attention_from_lse(q, k, padded, scale=scale, num_prefix_tokens=C)
    _, _, ref = _eager(q, k, v, scale, C)
    assert got.shape == (B, C, N - C) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
    _, _, from_flash = flash_attention(q, k, v, scale=scale, num_prefix_tokens=C, return_class_attention=True)
    torch.testing.assert_close(got, from_flash, rtol=1e-6, atol=1e-8)


def test_class_attention_from_lse_rejects_bad_lse():
    q, k, _ = _qkv(1, 2, 9, 16)
    with pytest.raises(ValueError, match="lse must be float32"):
        class_attention_from_lse(q, k, torch.zeros(1, 2, 8), scale=0.25, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="lse must be float32"):
        class_attention_from_lse(q, k, torch.zeros(1, 2, 9, dtype=torch.float64), scale=0.25, num_prefix_tokens=1)


def test_autotune_pruning_keeps_valid_configs():
    """The GPU config spaces (built here with autotune on) are per kernel and pruned by precision and sequence
    length; dK/dV owns a key block of at least 64 (wgmma), no 4-warp 128x64 tile in the backward (it spills)."""
    from aream_fast.kernels import flash_attention as fa

    saved = fa._SKIP_AUTOTUNE
    fa._SKIP_AUTOTUNE = False
    try:
        configs = {kind: fa._configs(kind) for kind in ("fwd", "dq", "dkdv")}
    finally:
        fa._SKIP_AUTOTUNE = saved
    assert {kind: len(c) for kind, c in configs.items()} == {"fwd": 21, "dq": 16, "dkdv": 12}

    def kept(kind, dtype, prec, n):
        args = {"Q": torch.empty(1, dtype=dtype), "N_CTX": n}
        cfgs = fa._prune_by_length(configs[kind], args, kind, DOT_PREC=prec)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in cfgs}

    assert kept("fwd", torch.float16, "tf32", 785) == {(64, 32, 4), (64, 64, 4), (128, 32, 4), (128, 64, 4),
                                                       (128, 64, 8), (128, 128, 8)}
    assert kept("dq", torch.bfloat16, "tf32", 804) == {(64, 32, 4), (64, 64, 4), (128, 32, 4), (128, 64, 8)}
    assert kept("dkdv", torch.bfloat16, "tf32", 804) == {(32, 64, 4), (64, 64, 4), (32, 128, 8), (64, 128, 8)}
    assert kept("dkdv", torch.float32, "tf32", 804) == {(32, 64, 4), (32, 128, 8)}  # TF32: 64 inner rows spill
    assert (128, 32, 4) not in kept("dq", torch.float32, "tf32", 804)
    for kind in configs:
        exact = {(32, 16, 4)} if kind == "dkdv" else {(32, 16, 4), (32, 32, 4)}
        assert kept(kind, torch.float32, "ieee", 197) == exact  # exact fp32: small tiles
        assert kept(kind, torch.float32, "tf32", 197) <= kept(kind, torch.float16, "tf32", 197)
        assert len(kept(kind, torch.bfloat16, "tf32", 17)) == 1  # nothing fits: one fallback config


# ---------------------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,D,C", [(197, 64, 1), (785, 64, 1), (216, 32, 20), (17, 24, 3)])
def test_gpu_low_precision_parity(dtype, N, D, C):
    """flash-attn rule: |kernel − fp64 truth| ≤ 2 × |eager same-precision − truth| (+ a small floor)."""
    B, H = 2, 6
    q, k, v = (t.requires_grad_() for t in _qkv(B, H, N, D, dtype=dtype, device="cuda", noncontiguous=True))
    scale = D ** -0.5
    g_o = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
    o, lse, cls = flash_attention(q, k, v, scale=scale, num_prefix_tokens=C, return_lse=True,
                                  return_class_attention=True)
    got = torch.autograd.grad((o * g_o).sum(), (q, k, v))
    ro, rl, rc = _eager(q, k, v, scale, C)
    truth = torch.autograd.grad((ro * g_o.double()).sum(), (q, k, v))
    z = (q @ k.transpose(-1, -2)) * scale
    lo = z.softmax(-1) @ v
    low = torch.autograd.grad((lo * g_o).sum(), (q, k, v))
    floor = 1e-3 if dtype == torch.float16 else 1e-2
    assert (o.double() - ro).abs().max() <= 2 * (lo.double() - ro).abs().max() + floor
    torch.testing.assert_close(lse.double(), rl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls.double(), rc, rtol=1e-2, atol=1e-4)
    for name, a, t, l in zip(("dq", "dk", "dv"), got, truth, low):
        err, base = (a.double() - t).abs().max(), (l.double() - t).abs().max()
        assert err <= 2 * base + floor, f"{name}: {err} > 2 × {base}"
    values = torch.rand(B, 20, N - C, device="cuda")
    with torch.no_grad():
        out = attention_apply_triton(q, k, lse, values, scale=scale, num_prefix_tokens=C)
    torch.testing.assert_close(out.double(), _apply_reference(q.detach(), k.detach(), values, scale, C),
                               rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_gpu_backward_repeat_bit_equal():
    q, k, v = _qkv(2, 6, 785, 64, dtype=torch.float16, device="cuda")
    g_o = torch.randn_like(q)
    first = _grads(_triton_fn(0.125), q, k, v, g_o, None)
    for _ in range(3):
        for a, b in zip(first, _grads(_triton_fn(0.125), q, k, v, g_o, None)):
            assert torch.equal(a, b)


@pytest.mark.gpu
@needs_cuda
def test_gpu_torch_compile_fullgraph_matches_eager():
    q, k, v = _qkv(2, 6, 197, 64, dtype=torch.float16, device="cuda")
    g_o = torch.randn_like(q)
    values = torch.rand(2, 20, 196, device="cuda")

    def step(q, k, v, values):
        o, lse, cls = flash_attention(q, k, v, scale=0.125, num_prefix_tokens=1, return_lse=True,
                                      return_class_attention=True)
        with torch.no_grad():
            refined = attention_apply_triton(q.detach(), k.detach(), lse.detach(), values, scale=0.125,
                                             num_prefix_tokens=1)
        return o, lse, cls, refined

    compiled = torch.compile(step, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves_c = [t.clone().requires_grad_() for t in (q, k, v)]
    eager_out = step(*leaves, values)
    comp_out = compiled(*leaves_c, values)
    # Compiled autotuning may pick another tile config than eager (another fp32 summation order): one fp16 ulp.
    for a, b in zip(eager_out, comp_out):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3)
    ge = torch.autograd.grad((eager_out[0] * g_o).sum(), leaves)
    gc = torch.autograd.grad((comp_out[0] * g_o).sum(), leaves_c)
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3)
