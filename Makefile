# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench profile clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The main job: train AReAM on the built-in synthetic dataset, then write CAMs and print their mIoU.
demo: $(STAMP)
	$(PY) scripts/train.py --amp --compile

# The whole test suite (Triton kernels run through the CPU interpreter).
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m pytest benchmarks/ --benchmark-only

profile: $(STAMP)
	$(PY) benchmarks/profile_memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
