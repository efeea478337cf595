"""Test helpers for the repository's scripts: the repository root and a loader for ``scripts/*.py`` files."""
import importlib.util
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str, name: str) -> types.ModuleType:
    """Import ``REPO / relpath`` (e.g. ``"scripts/evaluate.py"``) as a fresh module called ``name``."""
    path = REPO / relpath
    if not path.is_file():
        raise FileNotFoundError(f"script {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_root(tmp_path_factory, *, num_train: int, num_val: int, image_size: int) -> str:
    """A synthetic dataset (VOC layout) written under a fresh temporary folder; returns its root."""
    from aream_fast.data import ensure_synthetic

    root = tmp_path_factory.mktemp("syn") / "synthetic"
    ensure_synthetic(root, num_train=num_train, num_val=num_val, image_size=image_size, progress=False)
    return str(root)


def start_until_losses(cmd, metrics: Path, losses: int, *, timeout: float, env=None, poll: float = 0.05):
    """Start ``cmd`` (a training command) from the repository root and return the running process once
    ``metrics`` (its metrics.jsonl) holds ``losses`` loss rows; fails if it exits or times out first."""
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"loss"') >= losses:
            break
        time.sleep(poll)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    return proc
