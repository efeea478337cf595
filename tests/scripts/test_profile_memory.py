"""benchmarks/profile_memory.py: one fresh subprocess per case, peak memory / step time recorded, out-of-memory and
timeouts recorded as such (the curve ends there), CSV + markdown + PNG written. Tiny model (D 32, 4 blocks)."""
import csv
import importlib.util
import json
import os

import pytest

TINY = json.dumps({"embed_dim": 32, "depth": 4, "num_heads": 2})


from benchmarks import profile_memory as prof


def _args(tmp_path, *extra):
    return prof.parse_args(["--batch", "2", "--steps", "1", "--model-kwargs", TINY, "--num-classes", "3",
                            "--supervised-layers", "2", "3", "--threads", "1", "--out", str(tmp_path / "m"),
                            *extra])


@pytest.mark.slow
def test_profile_end_to_end_writes_csv_markdown_plot(tmp_path):
    assert prof.main(["--batch", "2", "--steps", "1", "--model-kwargs", TINY, "--num-classes", "3",
                      "--supervised-layers", "2", "3", "--threads", "1", "--out", str(tmp_path / "m"),
                      "--sizes", "32", "--modes", "official", "ours"]) == 0
    with open(tmp_path / "m.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["size"], r["status"]) for r in rows] == [("official", "32", "ok"), ("ours", "32", "ok")]
    for r in rows:
        assert float(r["peak_mem_mib"]) > 0 and float(r["step_time_s"]) > 0
        assert r["device"]  # "cpu (<model>)" or the CUDA device name
        assert r["torch"] not in ("", "absent") and r["triton"] != ""
        assert r["nproc"] == str(os.cpu_count())
    assert float(rows[0]["mem_vs_official"]) == 1.0
    assert float(rows[1]["mem_vs_official"]) == pytest.approx(
        float(rows[1]["peak_mem_mib"]) / float(rows[0]["peak_mem_mib"]), abs=1e-3)
    md = (tmp_path / "m.md").read_text()
    assert "| 32 | official | ok |" in md and "torch" in md
    assert (tmp_path / "m.png").stat().st_size > 1000


@pytest.mark.slow
def test_memory_cap_records_oom_and_ends_the_curve(tmp_path):
    # a 5 MiB cap: the first step's allocations exceed it; the parent kills the child -> "oom", not a crash
    args = _args(tmp_path, "--sizes", "32", "64", "--modes", "official", "--mem-limit-gb", "0.005",
                 "--steps", "40")
    rows = prof.profile(args)
    assert [(r["size"], r["status"]) for r in rows] == [(32, "oom"), (64, "skipped")]
    assert "oom at 32px" in rows[1]["note"]


@pytest.mark.slow
def test_timeout_is_recorded(tmp_path):
    args = _args(tmp_path, "--sizes", "32", "--modes", "cls-only", "--timeout", "0.2")
    rows = prof.profile(args)
    assert rows[0]["status"] == "timeout"


def test_ratios_table_and_plot_from_rows(tmp_path):
    base = dict(batch=4, model="m", supervised_layers="7 8", num_classes=20, nproc=2, torch="t", triton="tr",
                mem_limit_gb=12, device="cpu (x)", note="")
    rows = [
        dict(base, mode="official", size=448, status="ok", peak_mem_mib=1000.0, step_time_s=10.0),
        dict(base, mode="cls-only", size=448, status="ok", peak_mem_mib=200.0, step_time_s=2.0),
        dict(base, mode="ours", size=448, status="ok", peak_mem_mib=250.0, step_time_s=3.0),
        dict(base, mode="official", size=640, status="oom", note="RSS grew past the cap"),
        dict(base, mode="ours", size=640, status="ok", peak_mem_mib=400.0, step_time_s=6.0),
    ]
    prof.add_ratios(rows)
    assert rows[2]["mem_vs_official"] == 0.25 and rows[2]["time_vs_official"] == 0.3
    assert rows[2]["mem_vs_cls_only"] == 1.25 and rows[2]["time_vs_cls_only"] == 1.5
    assert "mem_vs_official" not in rows[4]  # no ratio against an official step that ran out of memory
    md = prof.markdown_table(rows)
    assert "| 640 | official | **oom** |" in md and "| 448 | ours | ok | 250.0 | 3.0 | 0.25× |" in md
    prof.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
    prof.write_csv(rows, str(tmp_path / "p.csv"))
    assert (tmp_path / "p.csv").read_text().splitlines()[0].startswith("mode,size,batch,status")
    assert prof.main(["--replot", str(tmp_path / "p.csv"), "--out", str(tmp_path / "r")]) == 0  # CSV round trip
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_bad_arguments_exit():
    with pytest.raises(SystemExit):
        prof.parse_args(["--sizes", "100"])
    with pytest.raises(SystemExit):
        prof.parse_args(["--batch", "0"])
    with pytest.raises(SystemExit):
        prof.parse_args(["--model-kwargs", "[1, 2]"])


def test_old_mode_names_are_aliases(tmp_path):
    args = _args(tmp_path, "--modes", "baseline", "ours", "limit")
    assert args.modes == ["official", "ours", "cls-only"]
    assert _args(tmp_path, "--mode", "limit").mode == "cls-only"
    with pytest.raises(SystemExit):
        _args(tmp_path, "--modes", "fast")
