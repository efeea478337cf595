"""Shared pieces of the reliability tests: a tiny synthetic dataset, the scripts loaded as modules, a tiny run."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")

# 16 train images of 48 px, batch 4 -> 4 steps/epoch, 2 epochs; AReAM from epoch 1; depth 2 (refine 0, loss 1)
TINY = ["--synthetic-train-size", "16", "--synthetic-val-size", "6", "--image-size", "48", "--embed-dim", "32",
        "--depth", "2", "--num-heads", "2", "--batch-size", "4", "--epochs", "2", "--cls-epochs", "1",
        "--seed", "3", "--threads", "1"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script_engine_tests", os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def step_rows(run_dir):
    return [r for r in rows(run_dir) if "loss" in r]


@pytest.fixture(scope="session")
def train_script():
    return load_script("train")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    from aream_fast.data import ensure_synthetic

    root = tmp_path_factory.mktemp("syn") / "synthetic"
    ensure_synthetic(root, num_train=16, num_val=6, image_size=48, progress=False)
    return str(root)
