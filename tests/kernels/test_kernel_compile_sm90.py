"""Static GPU evidence without a GPU: Triton kernels compiled ahead of time for sm_90 at the training shape
(ViT-S/16 448 px: B=64, H=6, d=64, N=804, 20 class tokens, L=5; ``aream_fast.kernels.aot_sm90``).

The interpreter never runs Triton's compiler, so this is the only CPU-side check that the real kernels build.
For each compiled config it asserts: it compiles, 0 bytes spilled, shared memory within the H100 per-block
limit, and wgmma where the tile and precision allow it (tensor-core dots with an M block >= 64).

CI runs a representative part (the first kept config of every kernel in bf16, and of both loss kernels for
exact fp32 and TF32: ~20 compiles, well under a minute); ``make compile-check`` compiles every kept config of
every kernel for bf16, fp32-ieee and fp32-tf32 (about 125 compiles, ~6-10 minutes on 2 shared cores) and writes
the table that benchmarks/RESULTS.md carries.
"""
import json
import os
import subprocess
import sys

import pytest

ALL_KERNELS = {"_aream_fwd_kernel", "_aream_grad_kernel", "_flash_fwd_kernel", "_class_attn_kernel",
               "_bwd_preprocess_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel", "_attention_apply_kernel"}
H100_SMEM_LIMIT = 227 * 1024


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _sweep(*args: str) -> list[dict]:
    """Rows of ``python -m aream_fast.kernels.aot_sm90 --json - ARGS`` in a fresh process (compiler mode)."""
    env = dict(os.environ, TRITON_INTERPRET="0", AREAM_FAST_SKIP_AUTOTUNE="0", CUDA_VISIBLE_DEVICES="")
    env.pop("AREAM_FAST_LOSS_CONFIG", None)
    res = subprocess.run([sys.executable, "-m", "aream_fast.kernels.aot_sm90", "--json", "-", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no compile results (rc {res.returncode}): {res.stderr[-3000:]}"
    return rows


def _check(row: dict) -> list[str]:
    name = f"{row['kernel']} {row['variant']} {row['block_m']}x{row['block_n']} w{row['num_warps']} s{row['num_stages']}"
    problems = []
    if row["spill_stores"] or row["spill_loads"]:
        problems.append(f"{name}: spills {row['spill_stores']}/{row['spill_loads']} bytes")
    if row["shared_bytes"] > H100_SMEM_LIMIT:
        problems.append(f"{name}: {row['shared_bytes']} bytes of shared memory")
    if row["wgmma_expected"] and not row["wgmma"]:
        problems.append(f"{name}: mma.sync instead of wgmma")
    return problems


@pytest.fixture(scope="module")
def rows():
    if not os.path.exists(_ptxas()):
        pytest.skip(f"triton wheel without ptxas ({_ptxas()})")
    return (_sweep("--variants", "bf16", "--max-configs", "1")
            + _sweep("--variants", "fp32-ieee", "fp32-tf32", "--max-configs", "1",
                     "--kernels", "_aream_fwd_kernel", "_aream_grad_kernel"))


def test_every_kernel_compiles_for_sm90(rows):
    assert {r["kernel"] for r in rows if r["variant"] == "bf16"} == ALL_KERNELS
    assert {(r["kernel"], r["variant"]) for r in rows if r["kernel"].startswith("_aream")} == {
        (k, v) for k in ("_aream_fwd_kernel", "_aream_grad_kernel") for v in ("bf16", "fp32-ieee", "fp32-tf32")}
    assert all(r["registers"] > 0 for r in rows)


def test_no_spills_smem_within_h100_limit_wgmma_where_possible(rows):
    problems = [p for r in rows for p in _check(r)]
    assert not problems, "\n".join(problems)


def test_tensor_core_tiles_use_wgmma(rows):
    """The loss and flash kernels' tensor-core tiles all have M >= 64, so wgmma is expected and seen there;
    exact fp32 runs on FMA units (no wgmma) by design."""
    for r in rows:
        if r["kernel"] in ("_aream_fwd_kernel", "_aream_grad_kernel", "_flash_fwd_kernel", "_flash_bwd_dq_kernel",
                           "_flash_bwd_dkdv_kernel") and r["variant"] != "fp32-ieee":
            assert r["wgmma_expected"] and r["wgmma"], r
        if r["variant"] == "fp32-ieee":
            assert not r["wgmma_expected"], r
