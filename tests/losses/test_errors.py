"""aream_loss input validation: every bad input is a ValueError naming the argument and what it got."""
import pytest
import torch

from aream_fast import aream_loss


def inputs(batch=2, heads=2, tokens=9, head_dim=4, layers=2):
    qs = [torch.randn(batch, heads, tokens, head_dim) for _ in range(layers)]
    ks = [torch.randn(batch, heads, tokens, head_dim) for _ in range(layers)]
    labels = torch.randint(0, 3, (batch, tokens - 1))
    return qs, ks, labels


def call(qs, ks, labels, **kw):
    kw.setdefault("scale", 0.5)
    kw.setdefault("num_prefix_tokens", 1)
    kw.setdefault("backend", "torch")
    return aream_loss(qs, ks, labels, **kw)


def test_empty_layer_list():
    _, _, labels = inputs()
    with pytest.raises(ValueError, match="qs must hold at least one"):
        call([], [], labels)


def test_layer_count_mismatch():
    qs, ks, labels = inputs()
    with pytest.raises(ValueError, match="same number of layers, got 2 and 1"):
        call(qs, ks[:1], labels)


def test_shape_mismatch_names_argument_and_shapes():
    qs, ks, labels = inputs()
    ks[1] = torch.randn(2, 2, 9, 5)
    with pytest.raises(ValueError, match=r"ks\[1\] has shape \(2, 2, 9, 5\), expected \(2, 2, 9, 4\)"):
        call(qs, ks, labels)


def test_wrong_rank_and_stacked_rank():
    qs, ks, labels = inputs()
    with pytest.raises(ValueError, match=r"qs\[0\] must have shape \(B, H, N, d\), got \(2, 9, 4\)"):
        call([q[:, 0] for q in qs], [k[:, 0] for k in ks], labels)
    with pytest.raises(ValueError, match=r"stacked \(L, B, H, N, d\).*\(2, 2, 9, 4\)"):
        call(qs[0], ks[0], labels)


def test_dtype_mismatch():
    qs, ks, labels = inputs()
    ks[0] = ks[0].double()
    with pytest.raises(ValueError, match=r"ks\[0\] has dtype torch.float64, expected torch.float32"):
        call(qs, ks, labels)


def test_integer_q_rejected():
    qs, ks, labels = inputs()
    with pytest.raises(ValueError, match="float16, bfloat16, float32 or float64"):
        call([q.long() for q in qs], [k.long() for k in ks], labels)


def test_device_mismatch():
    qs, ks, labels = inputs()
    ks[1] = ks[1].to("meta")
    with pytest.raises(ValueError, match=r"ks\[1\] is on meta, expected cpu"):
        call(qs, ks, labels)


def test_patch_count_mismatch():
    qs, ks, labels = inputs()
    with pytest.raises(ValueError, match=r"patch_labels must have shape \(B, P\) = \(2, 7\).*got \(2, 8\)"):
        call(qs, ks, labels, num_prefix_tokens=2)
    with pytest.raises(ValueError, match=r"patch_labels must have shape \(B, P\) = \(2, 8\).*got \(3, 8\)"):
        call(qs, ks, torch.zeros(3, 8, dtype=torch.long))


def test_labels_dtype_and_range():
    qs, ks, labels = inputs()
    with pytest.raises(ValueError, match="patch_labels must be an integer"):
        call(qs, ks, labels.float())
    labels[0, 3] = -2
    with pytest.raises(ValueError, match=r"patch_labels .*values >= 0 or ignore_index=255, got min -2"):
        call(qs, ks, labels)


def test_layer_weights_length():
    qs, ks, labels = inputs()
    with pytest.raises(ValueError, match="layer_weights .*expected length 2, got length 3"):
        call(qs, ks, labels, layer_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="layer_weights must be finite"):
        call(qs, ks, labels, layer_weights=[1.0, float("nan")])


def test_non_finite_values():
    qs, ks, labels = inputs()
    qs[1][0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"qs\[1\] \(shape \(2, 2, 9, 4\)\) contains NaN or infinite"):
        call(qs, ks, labels)
    qs, ks, labels = inputs()
    ks[0][1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"ks\[0\].*NaN or infinite"):
        call(qs, ks, labels)


def test_bad_scalars_and_backend():
    qs, ks, labels = inputs()
    with pytest.raises(ValueError, match="scale must be a positive finite"):
        call(qs, ks, labels, scale=0.0)
    with pytest.raises(ValueError, match="num_prefix_tokens must be a non-negative int"):
        call(qs, ks, labels, num_prefix_tokens=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        call(qs, ks, labels, backend="cuda")


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    qs, ks, labels = inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors.*TRITON_INTERPRET=1"):
        call(qs, ks, labels, backend="triton")


def test_numpy_scalar_scale_is_accepted_and_bool_refused():
    import numpy as np

    qs, ks, labels = inputs()
    torch.testing.assert_close(call(qs, ks, labels, scale=np.float32(0.5)), call(qs, ks, labels, scale=0.5))
    with pytest.raises(ValueError, match="scale must be a positive finite"):
        call(qs, ks, labels, scale=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_is_a_clear_error(backend, monkeypatch):
    """issue 15 item 6: create_graph=True through aream_loss raises instead of zero second-order terms."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors run the kernel in Triton's interpreter
    torch.manual_seed(0)
    qs, ks, labels = inputs(head_dim=16, layers=1)
    q = qs[0].requires_grad_()
    loss = call([q], ks, labels, backend=backend)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(loss, q, create_graph=True)
    (grad,) = torch.autograd.grad(call([q], ks, labels, backend=backend), q)  # first order is unchanged
    assert grad.abs().sum() > 0


def test_double_backward_through_the_deferred_loss_is_a_clear_error():
    from aream_fast.losses.deferred import DeferredGrads, deferred_aream_loss

    torch.manual_seed(0)
    qs, ks, labels = inputs(layers=1)
    q = qs[0].requires_grad_()
    grads = DeferredGrads()
    q_used, k_used = grads.attach(0, q, ks[0])
    loss = deferred_aream_loss(grads, labels, scale=0.5, num_prefix_tokens=1, backend="torch")
    total = loss + 0.0 * (q_used.sum() + k_used.sum())  # the attention's use of q, k
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(total, q, create_graph=True)
