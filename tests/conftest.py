"""Test configuration. TRITON_INTERPRET must be set before anything imports triton, so it is set here,
at the top of the first module pytest imports (``make test`` sets it too)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Collapse Triton autotune configs to one under the interpreter (see kernels/*).
os.environ.setdefault("AREAM_FAST_SKIP_AUTOTUNE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fixed_thread_count(monkeypatch):
    """Pin OMP_NUM_THREADS for every test: training runs (and their subprocesses) that a test compares, e.g. an
    uninterrupted and a resumed run, then use the same thread count (the same float reduction order)."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())))
