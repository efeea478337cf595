"""One huge label value (1e8, 2**31 - 1) costs nothing (issue 15, item 9): the pair counts are sort-based, so
memory is bounded by the number of patches, not by the largest label; the loss equals the one of the same
partition with small labels, on both backends."""
import json
import subprocess
import sys

import pytest
import torch

from aream_fast import aream_loss, pair_counts
from tests._scripts import REPO

BIG = [10 ** 8, 2 ** 31 - 1]


def _labels(big):
    torch.manual_seed(0)
    small = torch.randint(0, 3, (2, 16))
    large = small.clone()
    large[0, :3] = big  # one extra class, spelled with a huge id / with 7
    large[1, 5] = big
    relabelled = small.clone()
    relabelled[0, :3] = 7
    relabelled[1, 5] = 7
    return large, relabelled


@pytest.mark.parametrize("big", BIG)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_huge_label_gives_the_loss_of_the_same_partition(big, backend, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    large, relabelled = _labels(big)
    torch.manual_seed(1)
    q = torch.randn(2, 2, 17, 16)
    k = torch.randn(2, 2, 17, 16)
    got = aream_loss([q], [k], large, scale=0.25, num_prefix_tokens=1, backend=backend)
    want = aream_loss([q], [k], relabelled, scale=0.25, num_prefix_tokens=1, backend=backend)
    torch.testing.assert_close(got, want)
    assert [int(c) for c in pair_counts(large)] == [int(c) for c in pair_counts(relabelled)]


_PROBE = """
import json, resource, sys, torch
from aream_fast import aream_loss
q = torch.randn(2, 2, 17, 16, requires_grad=True)
k = torch.randn(2, 2, 17, 16, requires_grad=True)
labels = torch.randint(0, 3, (2, 16))
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
aream_loss([q], [k], labels, scale=0.25, num_prefix_tokens=1, backend="torch").backward()  # warm-up
base = peak_mib()
for big in %s:
    labels[0, 0] = big
    aream_loss([q], [k], labels, scale=0.25, num_prefix_tokens=1, backend="torch").backward()
print(json.dumps({"grown_mib": peak_mib() - base}))
""" % BIG


def test_a_huge_label_does_not_grow_memory():
    # a fresh process: its peak RSS is not the test session's; a (B * (max label + 1))-bin count of 1e8 alone
    # would be 1.6 GB
    res = subprocess.run([sys.executable, "-c", _PROBE], cwd=str(REPO), capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["grown_mib"] < 64
