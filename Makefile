# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-stage1 test test-fast bench profile compile-check gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The main job: the whole pipeline on the built-in synthetic dataset (stage one -> CAM seeds -> pseudo masks ->
# segmentation network + its ground-truth upper bound -> inference), ending by printing runs/demo/report.md.
# Run it again after an interruption: finished steps are kept.
DEMO_OUT ?= runs/demo
demo: $(STAMP)
	$(PY) scripts/run_pipeline.py --out $(DEMO_OUT)

# Stage one only (a few minutes): train AReAM, write the train CAM seeds, print their mIoU.
demo-stage1: $(STAMP)
	$(PY) scripts/run_pipeline.py --out $(DEMO_OUT)-stage1 --stage1-only

# The whole test suite (Triton kernels run through the CPU interpreter).
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m pytest benchmarks/ --benchmark-only

profile: $(STAMP)
	$(PY) benchmarks/profile_memory.py

# Every kept autotune config of every Triton kernel compiled ahead of time for sm_90 at the training shape (no GPU
# needed; ptxas from the triton wheel): fails on spills, shared memory over the H100 limit, or no wgmma where the
# tile allows it. CI runs a representative part (tests/kernels/test_kernel_compile_sm90.py).
compile-check: $(STAMP)
	mkdir -p build
	TRITON_INTERPRET=0 AREAM_FAST_SKIP_AUTOTUNE=0 $(PY) -m aream_fast.kernels.aot_sm90 \
		--json build/sm90_configs.jsonl --markdown build/sm90_configs.md

# The one command for a lent GPU machine: its own preinstalled python3/torch/triton (nothing is installed, the
# checkout is put on the path), <= 8 minutes; writes $(GPU_OUT)/gpu_results.md and gpu_results.json.
GPU_PY ?= python3
GPU_OUT ?= .
gpu-check:
	env -u TRITON_INTERPRET -u AREAM_FAST_SKIP_AUTOTUNE PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} \
		$(GPU_PY) scripts/gpu_check.py --out $(GPU_OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
