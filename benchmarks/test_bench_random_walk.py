"""Random walk T^t x (aream_fast.stage2.random_walk.apply_transition): repeated products vs repeated squaring.

Cases: the AReAM preset on a ViT-S image at 448 px (P = 28 x 28 = 784 patches, 2 present classes + background,
t = 64), the PSA preset at the same size (t = 256), and a small grid with many channels (P = 196, C = 21, t = 256),
where squaring wins. ``choose_method`` ("auto") must pick the faster one of each pair; compare the medians.
"""
import pytest
import torch

from aream_fast.stage2.random_walk import apply_transition, choose_method, transition_matrix

CASES = {"aream-P784-C3-t64": (784, 3, 64), "psa-P784-C3-t256": (784, 3, 256), "P196-C21-t256": (196, 21, 256)}


@pytest.mark.parametrize("method", ["matvec", "square"])
@pytest.mark.parametrize("case", list(CASES))
def test_bench_random_walk(benchmark, case, method):
    p, c, t = CASES[case]
    g = torch.Generator().manual_seed(0)
    a = torch.rand(p, p, generator=g)
    side = int(p ** 0.5)
    trans = transition_matrix((a + a.T) / 2, (side, p // side), beta=8.0)
    x = torch.rand(p, c, generator=g)
    benchmark.extra_info.update(auto_choice=choose_method(t, c, p), threads=torch.get_num_threads())
    out = benchmark.pedantic(apply_transition, args=(trans, x, t), kwargs={"method": method}, rounds=5,
                             warmup_rounds=1)
    ref = apply_transition(trans, x, t, method="square" if method == "matvec" else "matvec")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
