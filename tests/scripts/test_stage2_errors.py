"""The stage-two scripts turn bad roots, files and flag values into one ``error:`` line (issue 15, item 12):
make_pseudo_masks.py, train_seg.py, infer_seg.py through main_guard; nothing is trained or written."""
import pytest

from aream_fast.engine.errors import main_guard
from tests._scripts import load_script, synthetic_root


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    base = tmp_path_factory.mktemp("stage2_errors")
    root = synthetic_root(tmp_path_factory, num_train=4, num_val=2, image_size=32)
    (base / "garbage.pth").write_bytes(b"not a checkpoint")
    (base / "cams").mkdir()
    return {"root": root, "base": str(base), "garbage": str(base / "garbage.pth"), "cams": str(base / "cams"),
            "absent": str(base / "absent")}


CASES = [
    ("make_pseudo_masks", ["--cam-dir", "{cams}", "--data-root", "{absent}", "--out-dir", "{base}/pm"],
     "does not exist"),
    ("make_pseudo_masks", ["--cam-dir", "{cams}", "--data-root", "{root}", "--out-dir", "{base}/pm"],
     "no CAM evaluation"),
    ("make_pseudo_masks", ["--cam-dir", "{cams}", "--data-root", "{root}", "--out-dir", "{base}/pm",
                           "--bg-threshold", "0.3", "--crf", "nosuch"], "--crf must be one of"),
    ("infer_seg", ["--checkpoint", "{absent}.pth", "--data-root", "{root}", "--out", "{base}/inf"], "not found"),
    ("infer_seg", ["--checkpoint", "{garbage}", "--data-root", "{root}", "--out", "{base}/inf"],
     "not a readable PyTorch checkpoint"),
    ("train_seg", ["--gt-upper-bound", "--lr", "nan"], "--lr must be a finite number"),
    ("train_seg", ["--gt-upper-bound", "--dataset", "voc", "--data-root", "{absent}"], "does not exist"),
    ("train_seg", ["--masks", "{absent}", "--data-root", "{root}", "--run-dir", "{base}/seg"],
     "--masks folder"),
    ("train_seg", ["--gt-upper-bound", "--data-root", "{root}", "--batch-size", "2", "--pretrained", "{garbage}",
                   "--run-dir", "{base}/seg2"], "not a readable PyTorch checkpoint"),
]


@pytest.mark.parametrize("script, argv, message", CASES, ids=[f"{s}-{m}" for s, _, m in CASES])
def test_one_error_line(script, argv, message, places, capsys):
    module = load_script(f"scripts/{script}.py", f"{script}_errors")
    try:
        status = main_guard(module.main, [a.format(**places) for a in argv])
    except SystemExit as exc:  # argparse: usage lines, then "<prog>: error: ..."
        status = exc.code
    assert status in (1, 2)
    lines = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert len(lines) == 1 and message in lines[0], lines
