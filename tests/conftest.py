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
