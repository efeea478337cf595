"""``aream_fast.kernels`` from a plain checkout (``PYTHONPATH=<repo>``, nothing installed): the mapping in
``aream_fast/__init__.py`` (``_map_checkout_kernels``). Run in a fresh ``python -S`` (no site-packages, so no
installed or editable copy of the package can answer) on a copy of the two package folders."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import importlib.util, sys
import aream_fast
import aream_fast.kernels as kernels
assert aream_fast.kernels is kernels
print(kernels.__file__)
print(importlib.util.find_spec("aream_fast.kernels.aream_loss").origin)
print("triton" in sys.modules)
"""


def test_kernels_import_from_plain_checkout(tmp_path):
    for folder in ("aream_fast", "kernels"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-S", "-c", _PROBE], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    assert res.returncode == 0, res.stderr
    init, loss, triton_loaded = res.stdout.split()
    assert Path(init) == tmp_path / "kernels" / "__init__.py"
    assert Path(loss) == tmp_path / "kernels" / "aream_loss.py"
    assert triton_loaded == "False"  # the mapping imports no kernel module


def test_no_mapping_without_kernels_folder(tmp_path):
    """Without a kernels/ folder beside the package the import fails as usual (nothing is invented)."""
    shutil.copytree(REPO / "aream_fast", tmp_path / "aream_fast", ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-S", "-c", "import aream_fast.kernels"], cwd=tmp_path,
                         capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    assert res.returncode != 0 and "No module named 'aream_fast.kernels'" in res.stderr
