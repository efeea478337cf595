"""aream_fast.models.attention: class->patch rows and attention-apply against materialised attention, and SDPA's
memory at a large N (docs/semantics.md, "Fast path", item 5: V narrower than the head width makes CPU SDPA fall back to
N x N)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from aream_fast.models.attention import Attention, class_patch_attention
from aream_fast.pseudo_labels.refine import attention_apply
from tests._scripts import REPO


def _dense_mean_softmax(q, k, scale):
    return ((q @ k.transpose(-2, -1)) * scale).softmax(-1).mean(1)  # (B, N, N)


@pytest.mark.parametrize("c", [1, 5])
def test_class_patch_attention_matches_dense(c):
    q, k = torch.randn(2, 3, c + 12, 8), torch.randn(2, 3, c + 12, 8)
    scale = 8 ** -0.5
    ref = _dense_mean_softmax(q, k, scale)[:, :c, c:]
    torch.testing.assert_close(class_patch_attention(q, k, c, scale), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kk,c,weights", [(3, 4, None), (20, 4, [0.3, 1.0, 0.0]), (8, 1, [2.0, 0.5, 1.0]),
                                          (17, 0, None)])
def test_attention_apply_matches_dense(kk, c, weights):
    b, h, p, d = 2, 3, 15, 8  # K=20 > d=8: three chunks of width d; K=8: one exact chunk
    n_layers = 3
    qs = [torch.randn(b, h, c + p, d) for _ in range(n_layers)]
    ks = [torch.randn(b, h, c + p, d) for _ in range(n_layers)]
    values = torch.rand(b, kk, p)
    scale = d ** -0.5
    w = weights or [1.0] * n_layers
    r = sum(wl * _dense_mean_softmax(q, k, scale)[:, c:, c:] for q, k, wl in zip(qs, ks, w)) / n_layers
    ref = torch.einsum("bmn,bkn->bkm", r, values)
    out = attention_apply(qs, ks, values, num_prefix_tokens=c, scale=scale, layer_weights=weights)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    stacked = attention_apply(torch.stack(qs), torch.stack(ks), values, num_prefix_tokens=c, scale=scale,
                              layer_weights=None if weights is None else torch.tensor(weights))
    torch.testing.assert_close(stacked, ref, rtol=0, atol=1e-6)


def test_attention_apply_bad_inputs():
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="values must be"):
        attention_apply([q], [q], torch.rand(1, 3, 7), num_prefix_tokens=2, scale=0.5)
    with pytest.raises(ValueError, match="layer_weights"):
        attention_apply([q], [q], torch.rand(1, 3, 8), num_prefix_tokens=2, scale=0.5, layer_weights=[1, 2])
    with pytest.raises(ValueError, match="same number of layers"):
        attention_apply([q, q], [q], torch.rand(1, 3, 8), num_prefix_tokens=2, scale=0.5)
    with pytest.raises(ValueError, match="ks"):
        attention_apply([q], [torch.randn(1, 2, 9, 4)], torch.rand(1, 3, 8), num_prefix_tokens=2, scale=0.5)


def test_attention_block_matches_dense_and_rejects_unknown_backend():
    attn = Attention(24, 3)
    x = torch.randn(2, 13, 24)
    out, q, k, ca = attn(x, 3, True)
    qh, kh, vh = attn.qkv_heads(x)
    a = ((qh @ kh.transpose(-2, -1)) * attn.scale).softmax(-1)
    ref = attn.proj((a @ vh).transpose(1, 2).reshape(2, 13, 24))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ca, a.mean(1)[:, :3, 3:], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="attention_backend"):
        Attention(24, 3, backend="flash")


_MEMORY_PROBE = r"""
import json, sys, torch
torch.set_num_threads(1)
from aream_fast.pseudo_labels.refine import attention_apply
mode, n, h, d, kk = sys.argv[1], int(sys.argv[2]), 6, 64, 20
c = 20
q, k = torch.randn(1, h, n, d), torch.randn(1, h, n, d)
values = torch.rand(1, kk, n - c)
def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
def run(q, k, values):
    if mode == "apply":
        attention_apply([q], [k], values, num_prefix_tokens=c, scale=d ** -0.5)
    else:  # control: SDPA with a narrow V (width K): the math fallback the padding avoids
        v = torch.zeros(1, h, q.shape[2], kk)
        torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)
run(q[:, :, :64], k[:, :, :64], values[:, :, :44])  # warm-up: load kernels / thread pools first
# reset the peak RSS (VmHWM) to the current RSS: ru_maxrss would carry the forking parent's peak over exec
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status_kib("VmRSS")
run(q, k, values)
print(json.dumps({"delta_bytes": (status_kib("VmHWM") - base) * 1024}))
"""


def _probe(mode, n):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, mode, str(n)], capture_output=True, text=True,
                         env=env, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])["delta_bytes"]


@pytest.mark.slow
def test_attention_apply_memory_stays_far_below_n_squared():
    n, h = 4096, 6
    nn_bytes = n * n * h * 4  # one (1, H, N, N) fp32 attention: 402 MB
    ours = _probe("apply", n)
    narrow = _probe("narrow", n)
    # the control proves the probe sees an N x N fallback; ours must stay far below one N x N attention
    assert narrow > nn_bytes / 2, f"control SDPA with narrow V used only {narrow / 2**20:.0f} MiB"
    assert ours < nn_bytes / 8, f"attention_apply used {ours / 2**20:.0f} MiB (N x N x H x 4 = {nn_bytes / 2**20:.0f})"


def test_importing_and_running_the_model_does_not_import_triton():
    code = ("import sys, torch\n"
            "from aream_fast.models import build_model\n"
            "from aream_fast.models.records import AttentionRequest\n"
            "m = build_model('mct_deit_small', 3, img_size=32, embed_dim=24, num_heads=2, depth=2,"
            " attention_backend='triton')\n"
            "m(torch.randn(1, 3, 32, 32), AttentionRequest(refine_layers=(0,), class_attention_layers=(0, 1)))\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "xformers"])
def test_cuda_backends_match_sdpa(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if backend == "xformers":
        pytest.importorskip("xformers", reason="xformers is an optional extra")
    from aream_fast.models import build_model
    from aream_fast.models.records import AttentionRequest

    ref = build_model("mct_deit_small", 5, img_size=64, drop_path=0.0, embed_dim=96, num_heads=3, depth=3).cuda().eval()
    fast = build_model("mct_deit_small", 5, img_size=64, drop_path=0.0, embed_dim=96, num_heads=3, depth=3,
                       attention_backend=backend).cuda().eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 80, device="cuda")
    req = AttentionRequest(supervised_layers=(2,), refine_layers=(0,), class_attention_layers=(0, 1, 2))
    a, b = ref(x, req), fast(x, req)
    torch.testing.assert_close(b.class_logits, a.class_logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b.records.class_attention, a.records.class_attention, rtol=1e-3, atol=1e-4)
