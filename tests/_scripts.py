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
