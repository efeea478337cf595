"""Benchmark configuration shared by every file in benchmarks/ (run with ``pytest benchmarks/ --benchmark-only``).

* ``device``: "cuda" when a GPU is present (the Triton path is measured), else "cpu" (the torch path).
* Every benchmark JSON carries the machine: device name, CPU model, nproc, torch and triton versions
  (``pytest_benchmark_update_machine_info``), so ``--benchmark-json`` results are self-describing.

Peak memory of a case goes into ``benchmark.extra_info`` (see ``memory.py``).
"""
import os
import sys

import pytest
import torch


from benchmarks import memory  # noqa: E402


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(memory.machine_info())
